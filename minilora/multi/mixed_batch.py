"""A mixed batch: one frozen base, each example through the adapter it names (PEFT's adapter_names).

    y_i = W0 x_i + b + s_n · B_n A_n x_i                       for n = names[i]   ("__base__": no adapter)
    y_i = g_n ⊙ (W0 x_i + s_n · B_n A_n x_i) + b               DoRA, g_n = m_n / ‖W0 + s_n·B_n A_n‖

The base matmul runs once for the whole batch, and so does the adapter term: the adapters are stacked into one
of rank Σ r_n, A = [A_1; A_2; ...] and B = [s_1 B_1, s_2 B_2, ...], and each example keeps only its own
adapter's columns of X Aᵀ (a 0/1 mask) before the product with Bᵀ. A batch of two adapters of rank 8 thus
costs one forward with a rank-16 adapter: no gathering of rows, no forward per adapter.
Machinery: a LoRA layer's forward calls mixed_batch_forward while layer.row_adapters holds the names
(set by model(idx, adapter_names=...) or switch.adapter_batch).
"""
from __future__ import annotations

import torch

from .named import BASE, adapter_view


def mixed_batch_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """Row i of x (its first dimension) through the adapter layer.row_adapters[i] names, on one base matmul."""
    names = layer.row_adapters
    if getattr(layer, "merged", False):
        raise RuntimeError("adapter_names: a layer has its adapter merged into the weight; unmerge() it first")
    if x.shape[0] != len(names):
        raise ValueError(f"adapter_names has {len(names)} names for a batch of {x.shape[0]} examples")
    y = layer.base_layer(x)
    views = [v for n in dict.fromkeys(names) if n != BASE and (v := adapter_view(layer, n)) is not None]
    if not views:  # every example runs the base here ("__base__", or adapters this layer does not carry)
        return y
    column = {v.name: i + 1 for i, v in enumerate(views)}  # 0: no adapter on this layer
    which = torch.tensor([column.get(n, 0) for n in names], device=x.device)
    owner = torch.cat([torch.full((v.r,), i + 1, device=x.device) for i, v in enumerate(views)])
    keep = (which[:, None] == owner[None, :]).view(len(names), *[1] * (x.dim() - 2), -1)  # (batch, ..., Σr)
    xa = torch.cat([v.lora_dropout(x).to(v.A.dtype) @ v.A.t() for v in views], dim=-1)
    b_stacked = torch.cat([v.scaling * v.B for v in views], dim=1)                          # (out, Σr)
    delta = ((xa * keep.to(xa.dtype)) @ b_stacked.t()).to(y.dtype)
    if all(v.magnitude is None for v in views):
        return y + delta
    ones = torch.ones(y.shape[-1], device=y.device, dtype=y.dtype)
    g = torch.stack([ones, *[ones if v.magnitude is None else
                             (v.magnitude / layer.weight_norm(v).to(v.magnitude.dtype)).to(y.dtype) for v in views]])
    g = g[which].view(len(names), *[1] * (x.dim() - 2), -1)                                  # (batch, ..., out)
    bias = layer.base_layer.bias
    return g * (y + delta) if bias is None else g * (y - bias.to(y.dtype) + delta) + bias.to(y.dtype)
