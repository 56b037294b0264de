"""Counting parameters: what a model really trains, and the lecture's back-of-the-envelope LoRA table.

The lecture's table treats a whole model of N parameters as one square matrix W (d × d, d = √N). LoRA on
it adds A (r × d) and B (d × r): 2·r·√N trainable parameters, e.g. 2 · 1 · √(7·10⁹) ≈ 167K for 7B at rank 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn

from .nf4_linear import NF4Linear

SLIDE_MODELS = {"7B": 7e9, "13B": 13e9, "70B": 70e9, "180B": 180e9}
SLIDE_RANKS = (1, 2, 8, 16, 512, 1024, 8192)


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} "
                f"|| trainable%: {self.percent:.4f}")


def count_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameters, each shared (tied) tensor counted once.

    An NF4Linear counts its out × in weights toward the total, the weights its packed codes stand for; the
    packed tensors are not parameters themselves, even where they are held as frozen ones (minilora.parallel.fsdp
    shards them so)."""
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    seen = {id(t) for m in nf4 for n, t in m.named_parameters(recurse=False) if n != "bias"}
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    total += sum(m.out_features * m.in_features for m in nf4)
    return ParamCount(trainable, total)


def lora_params_square(n_params: float, r: int) -> float:
    """Trainable parameters of rank-r LoRA on one square matrix holding n_params weights: 2·r·√N."""
    if n_params <= 0 or r <= 0:
        raise ValueError(f"n_params and r must be positive, got {n_params}, {r}")
    return 2 * r * math.sqrt(n_params)


def format_count(n: float) -> str:
    """167332 -> '167K', 1.37e9 -> '1.4B', in the slide's style: K and M as integers, B with one decimal."""
    if n >= 1e9:
        s = f"{n / 1e9:.1f}"
        return (s[:-2] if s.endswith(".0") else s) + "B"
    if n >= 1e6:
        return f"{round(n / 1e6)}M"
    if n >= 1e3:
        return f"{round(n / 1e3)}K"
    return str(round(n))


def slide_table() -> dict[str, dict[str, float]]:
    """Rank ('1', ..., '8192', 'Full') -> model ('7B', ...) -> trainable parameters, by 2·r·√N."""
    table = {str(r): {m: lora_params_square(n, r) for m, n in SLIDE_MODELS.items()} for r in SLIDE_RANKS}
    table["Full"] = dict(SLIDE_MODELS)
    return table


def linear_shapes_gpt2(n_layer: int = 12, n_embd: int = 768) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear layer of a GPT-2-shaped model, by GPT-2's module names."""
    shapes = {}
    for i in range(n_layer):
        shapes[f"h.{i}.attn.c_attn"] = (n_embd, 3 * n_embd)
        shapes[f"h.{i}.attn.c_proj"] = (n_embd, n_embd)
        shapes[f"h.{i}.mlp.c_fc"] = (n_embd, 4 * n_embd)
        shapes[f"h.{i}.mlp.c_proj"] = (4 * n_embd, n_embd)
    return shapes


def linear_shapes_llama(n_layer: int = 32, hidden: int = 4096, intermediate: int = 11008,
                        n_head: int = 32, n_kv_head: int = 32) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear layer of a LLaMA-shaped model (LLaMA-2 7B by default)."""
    kv = hidden // n_head * n_kv_head
    shapes = {}
    for i in range(n_layer):
        p = f"layers.{i}"
        shapes.update({f"{p}.self_attn.q_proj": (hidden, hidden), f"{p}.self_attn.k_proj": (hidden, kv),
                       f"{p}.self_attn.v_proj": (hidden, kv), f"{p}.self_attn.o_proj": (hidden, hidden),
                       f"{p}.mlp.gate_proj": (hidden, intermediate), f"{p}.mlp.up_proj": (hidden, intermediate),
                       f"{p}.mlp.down_proj": (intermediate, hidden)})
    return shapes


def lora_params_real(shapes: dict[str, tuple[int, int]], targets: list[str], r: int) -> int:
    """Σ over targeted layers of r·(in + out): the exact LoRA parameter count of a real architecture."""
    chosen = [s for name, s in shapes.items() if any(name == t or name.endswith("." + t) for t in targets)]
    if not chosen:
        raise ValueError(f"targets {targets} match none of the layers")
    return sum(r * (i + o) for i, o in chosen)
