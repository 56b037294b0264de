"""A mixed batch: one frozen base, each example through the adapter it names (PEFT's adapter_names).

    y_i = W0 x_i + b + s_n · B_n A_n x_i                       for n = names[i]   ("__base__": no adapter)
    y_i = g_n ⊙ (W0 x_i + s_n · B_n A_n x_i) + b               DoRA, g_n = m_n / ‖W0 + s_n·B_n A_n‖

The base matmul runs once for the whole batch; each adapter adds its two thin matmuls on its own rows only,
so the batch costs about one base forward plus one adapter's worth of work, not one forward per adapter.
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
    bias = layer.base_layer.bias
    out = y.clone()  # one copy, rows overwritten in place group by group
    for name in dict.fromkeys(names):
        ad = adapter_view(layer, name) if name != BASE else None
        if ad is None:  # "__base__", or an adapter this layer does not carry
            continue
        rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
        xr = ad.lora_dropout(x[rows]).to(ad.A.dtype)
        yr = y[rows] + (ad.scaling * (xr @ ad.A.t() @ ad.B.t())).to(y.dtype)
        if ad.magnitude is not None:
            g = (ad.magnitude / layer.weight_norm(ad).to(ad.magnitude.dtype)).to(y.dtype)
            yr = g * yr if bias is None else g * (yr - bias.to(y.dtype)) + bias.to(y.dtype)
        out.index_copy_(0, rows, yr)
    return out
