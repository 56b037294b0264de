"""A mixed batch: one frozen base, each example through the adapter it names (PEFT's adapter_names).

    y_i = W0 x_i + b + s_n · B_n A_n x_i                       for n = names[i]   ("__base__": no adapter)
    y_i = g_n ⊙ (W0 x_i + s_n · B_n A_n x_i) + b               DoRA, g_n = m_n / ‖W0 + s_n·B_n A_n‖

The base matmul runs once for the whole batch; each adapter adds its two thin matmuls on its own rows only,
so the batch costs about one base forward plus one adapter's worth of work, not one forward per adapter.
Machinery: a LoRA layer's forward calls mixed_batch_forward while layer.row_adapters holds the names.
"""
from __future__ import annotations

import torch

BASE = "__base__"


def adapter_parts(layer, name: str):
    """(A, B, scaling, dropout, magnitude or None) of the adapter `name` on this layer, or None if it has none."""
    if name == getattr(layer, "adapter_name", "default"):
        return (layer.lora_A, layer.lora_B, layer.scaling, layer.lora_dropout,
                getattr(layer, "lora_magnitude_vector", None))
    parked = getattr(layer, "parked_adapters", {})
    if name in parked:
        p = parked[name]
        return p.A, p.B, p.settings["scaling"], p.lora_dropout, p.magnitude
    return None


def mixed_batch_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """Row i of x (its first dimension) through the adapter layer.row_adapters[i] names, on one base matmul."""
    names = layer.row_adapters
    if getattr(layer, "merged", False):
        raise RuntimeError("adapter_names: a layer has its adapter merged into the weight; unmerge() it first")
    if x.shape[0] != len(names):
        raise ValueError(f"adapter_names has {len(names)} names for a batch of {x.shape[0]} examples")
    y = layer.base_layer(x)
    bias = layer.base_layer.bias
    out = y.clone()
    for name in dict.fromkeys(names):
        parts = adapter_parts(layer, name) if name != BASE else None
        if parts is None:
            continue
        a, b, s, dropout, magnitude = parts
        rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
        xr = dropout(x[rows]).to(a.dtype)
        yr = y[rows] + (s * (xr @ a.t() @ b.t())).to(y.dtype)
        if magnitude is not None:
            with torch.no_grad():
                norm = torch.linalg.vector_norm(layer.dense_base_weight() + s * (b.float() @ a.float()), dim=1)
            g = (magnitude / norm.to(magnitude.dtype)).to(y.dtype)
            yr = g * yr if bias is None else g * (yr - bias.to(y.dtype)) + bias.to(y.dtype)
        out = out.index_copy(0, rows, yr)
    return out
