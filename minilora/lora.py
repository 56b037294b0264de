"""LoRA: a frozen weight W0 plus a trainable low-rank update, h = W0 x + (alpha / r) · B A x.

A (r × in) starts random and B (out × r) starts at zero, so at initialisation the wrapped layer is exactly
the base layer; training moves only A and B. After training, W0 + scaling · B A can be folded into one
matrix (merge) so inference costs nothing extra.

Variants build on this layer: DoRA (variants/dora.py) rescales its output rows, PiSSA (variants/lora_init.py)
starts A and B from W0's principal singular directions, and named adapters share one base (multi/).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .multi.mixed_batch import mixed_batch_forward
from .variants.lora_init import pissa

INITS = ("kaiming", "gaussian", "pissa")


class LoRALinear(nn.Module):
    """y = base(x) + scaling · B (A dropout(x)), scaling = alpha / r (rsLoRA: alpha / sqrt(r)).

    base: a frozen nn.Linear (its parameters get requires_grad=False).
    init: "kaiming" (A ~ Kaiming-uniform, the default), "gaussian" (A ~ N(0, 1/r²), the slides' normal init) or
    "pissa" (A, B from W0's top r singular directions, W0 keeps the rest: variants/lora_init.py).
    adapter_name names this adapter when several share the base; disabled switches it off (multi/named.py).
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming"):
        super().__init__()
        in_features, out_features = getattr(base, "in_features", None), getattr(base, "out_features", None)
        if in_features is None or out_features is None:
            raise TypeError(f"base must be a linear layer with in_features/out_features, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r (LoRA rank) must be a positive int, got {r!r}")
        if r > min(in_features, out_features):
            raise ValueError(f"r (LoRA rank) = {r} exceeds min(in_features, out_features) = "
                             f"{min(in_features, out_features)}: the update would not be low-rank")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if not isinstance(use_rslora, bool):
            raise ValueError(f"use_rslora must be True or False, got {use_rslora!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.use_rslora, self.init = r, alpha, use_rslora, init
        self.scaling = self.scaling_for(r, alpha, use_rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype = self._adapter_dtype(base)
        device = next(iter([*base.parameters(), *base.buffers()]), torch.empty(0)).device
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        self.merged = False
        self.adapter_name, self.disabled, self.row_adapters = "default", False, None
        self.reset_lora_parameters()

    @staticmethod
    def scaling_for(r: int, alpha: float, use_rslora: bool = False) -> float:
        """s = alpha / r (rsLoRA: alpha / sqrt(r))."""
        return alpha / math.sqrt(r) if use_rslora else alpha / r

    @staticmethod
    def _adapter_dtype(base: nn.Module) -> torch.dtype:
        """Adapters live in the base's compute dtype (a quantized base declares one), else its weight's dtype."""
        if isinstance(getattr(base, "compute_dtype", None), torch.dtype):
            return base.compute_dtype
        w = getattr(base, "weight", None)
        return w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else torch.float32

    def reset_lora_parameters(self) -> None:
        """A random, B = 0: the update B A is zero, so the layer starts as the base layer (PiSSA: see pissa_init)."""
        if self.init == "pissa":
            return self.pissa_init()
        with torch.no_grad():
            if self.init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # same law nn.Linear uses
            else:
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            self.lora_B.zero_()

    @torch.no_grad()
    def pissa_init(self) -> None:
        """W0 = W_res + scaling · B A with B A the top-r part of W0's SVD: the layer still computes W0 x."""
        w = getattr(self.base_layer, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise ValueError(f"init='pissa' needs the base's dense weight, {type(self.base_layer).__name__} has "
                             f"none: quantize after the split (add_qlora(..., init='pissa'))")
        a, b, w_res = pissa(w, self.r, self.scaling)
        self.lora_A.copy_(a)
        self.lora_B.copy_(b)
        w.copy_(w_res.to(w.dtype))

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling · B A, shape (out, in), computed in fp32."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """scaling · (dropout(x) Aᵀ) Bᵀ: two thin matmuls, never the full (out × in) update."""
        x = self.lora_dropout(x).to(self.lora_A.dtype)
        return (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_adapters is not None:  # a mixed batch: each example names its adapter (multi/)
            return mixed_batch_forward(self, x)
        base = self.base_layer
        if self.merged or self.disabled:
            return base(x)
        if type(base) is nn.Linear and not (base._forward_hooks or base._forward_pre_hooks) \
                and base.weight.dtype == self.lora_A.dtype:
            y = F.linear(x.reshape(-1, self.in_features), base.weight, base.bias)  # (rows, out), fresh and not
            add = y.addmm_                                 # kept by F.linear's backward: the adapter term goes in
        else:
            y = base(x)
            if y.dtype != self.lora_A.dtype:
                return y + self.lora_forward(x).to(y.dtype)
            add = functools.partial(torch.addmm, y.reshape(-1, self.out_features))  # into a copy of y
        # speed: the same sum as one addmm, y + scaling · (x_d Aᵀ) Bᵀ, so that neither the (rows, out) product
        # nor its scaled copy is written (and backward scales only the (rows, r) gradient)
        xa = (self.lora_dropout(x).to(self.lora_A.dtype) @ self.lora_A.t()).reshape(-1, self.r)
        return add(xa, self.lora_B.t(), alpha=self.scaling).view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + scaling · B A, in place (a weight shared with another module, such as a tied lm_head's,
        changes there too: merge_lora unties it first). Merging twice would add the update twice: an error."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge: adapter is already merged (call unmerge() first)")
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - scaling · B A, undoing merge()."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: adapter is not merged")
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def merged_layer(self) -> nn.Module:
        """The base layer with the update folded in (a plain nn.Linear), for merge_lora."""
        if not self.merged:
            self.merge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"
