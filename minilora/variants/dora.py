"""DoRA: LoRA's update split into a direction and a magnitude, W = m · (W0 + s·B A) / ‖W0 + s·B A‖.

The norm is taken per output unit (each row of the (out × in) weight, the paper's "column-wise" norm of
W as in × out), so the layer first normalises every output row of W0 + s·B A to length 1 and then scales it
by its own trainable length m (one number per output, initialised to ‖W0‖ so the layer starts as the base):

    y = g ⊙ (W0 x + s·B A x) + b,        g = m / ‖W0 + s·B A‖   (the norm held constant in backward)

As the DoRA paper (Liu et al., 2024, section 4.3) and PEFT do, the norm is detached from the gradient.
The same class works over a dense base (DoRALinear) and over an NF4 base (QDoRALinear, the norm of the
dequantized weight). With dropout on the adapter input, W0 x sees the clean input (PEFT passes the dropped
input through W0 for the rescaling term too); the two agree whenever dropout is off, as in evaluation.

A DoRA layer may also carry plain LoRA adapters beside its DoRA ones (multi/named.py): while a plain one is
mounted, lora_magnitude_vector is None and the layer is LoRA's, y = W0 x + b + s·B A x.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..inject import register_lora_wrapper
from ..lora import LoRALinear
from ..nf4_linear import NF4Linear
from ..qlora import QLoRALinear


class DoRA:
    """Mixed into a LoRA layer class: adds the magnitude m (lora_magnitude_vector, PEFT's name) and rescales."""

    def __init__(self, base: nn.Module, *args, **kwargs):
        super().__init__(base, *args, **kwargs)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())  # m = ‖W0 + s·B A‖: starts as the base
        self._merged_scale = None

    def dense_base_weight(self) -> torch.Tensor:
        """W0 as a dense fp32 (out, in) matrix: the weight itself, or the dequantized NF4 weight."""
        base = self.base_layer
        if isinstance(base, NF4Linear):
            return base.dequantized_weight(torch.float32)
        return base.weight.float()

    def weight_norm(self, adapter=None) -> torch.Tensor:
        """‖W0 + s·B A‖ per output row, fp32, detached (a constant for backward), for the mounted adapter or for
        `adapter` (a record with A, B and scaling, as multi.named.adapter_view gives)."""
        with torch.no_grad():
            delta = (super().delta_weight() if adapter is None
                     else adapter.scaling * (adapter.B.float() @ adapter.A.float()))
            return torch.linalg.vector_norm(self.dense_base_weight() + delta, dim=1)

    def magnitude_scale(self) -> torch.Tensor:
        """g = m / ‖W0 + s·B A‖, one factor per output."""
        return self.lora_magnitude_vector / self.weight_norm().to(self.lora_magnitude_vector.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)                      # W0 x + b + s·B A x (or, merged, the merged layer)
        if (self.merged or self.disabled or self.row_adapters is not None  # (a mixed batch rescales its own rows)
                or self.lora_magnitude_vector is None):                    # (a plain LoRA adapter is mounted)
            return y
        g, b = self.magnitude_scale().to(y.dtype), self.base_layer.bias
        return g * y if b is None else g * (y - b.to(y.dtype)) + b.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """What merging adds to W0: g ⊙ (W0 + s·B A) − W0, fp32 (s·B A while a plain adapter is mounted)."""
        if self.lora_magnitude_vector is None:
            return super().delta_weight()
        w0 = self.dense_base_weight()
        return self.magnitude_scale().float().detach()[:, None] * (w0 + super().delta_weight()) - w0

    @torch.no_grad()
    def merge(self) -> None:
        plain = self.lora_magnitude_vector is None  # unmerge divides by g (W0 is gone from the weight)
        self._merged_scale = None if plain else self.magnitude_scale().float()
        super().merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 = W / g − s·B A for a dense base; an NF4 base was never changed (its dense copy just goes)."""
        if not self.merged or isinstance(self.base_layer, NF4Linear) or self._merged_scale is None:
            return super().unmerge()
        w = self.base_layer.weight
        w.copy_((w.float() / self._merged_scale[:, None] - super().delta_weight()).to(w.dtype))
        self.merged, self._merged_scale = False, None

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


class DoRALinear(DoRA, LoRALinear):
    """DoRA over a dense nn.Linear."""


class QDoRALinear(DoRA, QLoRALinear):
    """DoRA over a frozen NF4 base: the magnitude's norm is that of the dequantized weight plus s·B A."""


register_lora_wrapper(nn.Linear, DoRALinear, dora=True)
register_lora_wrapper(NF4Linear, QDoRALinear, dora=True)
