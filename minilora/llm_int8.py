"""LLM.int8() (Dettmers et al., 2022): an int8 matmul with the few outlier input features kept in 16 bits.

Vector-wise quantization: one absmax per row of X (per token) and one per output row of W (per column of the
paper's X·W), so the int32 product of the codes is rescaled by the outer product of the two:

    C_x = round(127 · X_i / cx_i),   cx_i = max_j |X_ij|  over the regular columns j
    C_w = round(127 · W_o / cw_o),   cw_o = max_j |W_oj|
    Y   ≈ (C_x · C_wᵀ)_int32 · cx cwᵀ / 127²                    the int8 part
        + X_O16 · W_O16ᵀ                                          outlier columns O in 16-bit
    O   = { j : |X_ij| >= threshold for some row i }              (threshold 6.0: the paper's value)

Outlier features are few but systematic (the same hidden dimensions in every token); rounding them together
with the rest would stretch every row's scale. The weight is stored only as int8 (C_w, cw), as bitsandbytes'
inference layer stores it (has_fp16_weights=False): the outlier columns of W are dequantized int8 weights,
8 + 32/in bits per parameter. (The paper's description keeps a 16-bit W for them; bitsandbytes does not.)

The 16-bit outlier part is what makes LLM.int8() fast, so it is kept in compute_dtype (float16 by default) and
not silently widened: a finite input whose result overflows compute_dtype (float16 holds |x| <= 65504) is an
OverflowError naming the dtype and the remedy (compute_dtype=torch.bfloat16 or torch.float32). NaN or Inf
input passes through as NaN/Inf, as in nn.Linear; non-finite weights or biases are refused at construction.

The int32 accumulation is emulated with a float64 matmul of the integer codes: exact, since every partial
sum is an integer of magnitude below in_features · 127² < 2^53.
"""
from __future__ import annotations

import torch
import torch.nn as nn

TINY = 1e-30


def vectorwise_quantize(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (C = round(127 · a / absmax) int8, absmax float32). A row of zeros gets codes 0."""
    absmax = a.abs().amax(-1).float()
    codes = torch.round(a.float() * (127 / absmax.clamp(min=TINY))[..., None]).clamp(-127, 127).to(torch.int8)
    return codes, absmax


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of the input features j with |x_ij| >= threshold in some row i (none when threshold is 0)."""
    if threshold <= 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    return torch.nonzero((x.abs() >= threshold).any(0)).view(-1)


def int8_matmul_outliers(x: torch.Tensor, weight_codes: torch.Tensor, weight_absmax: torch.Tensor,
                         threshold: float = 6.0, compute_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Y = X · Wᵀ by LLM.int8(): x (n, in) in compute_dtype; returns (n, out) float32 (see the module docstring)."""
    x = x.to(compute_dtype)
    cols = outlier_columns(x, threshold)
    regular = x.clone()
    regular[:, cols] = 0
    x_codes, x_absmax = vectorwise_quantize(regular)
    acc = x_codes.double() @ weight_codes.double().T                # the int32 accumulator, exactly
    y = acc.float() * (x_absmax[:, None] * weight_absmax[None, :]) / (127 * 127)
    if cols.numel():
        w_outliers = (weight_codes[:, cols].float() * (weight_absmax[:, None] / 127)).to(compute_dtype)
        y = y + (x[:, cols] @ w_outliers.T).float()                  # the 16-bit part
    return y


def check_no_overflow(y: torch.Tensor, x: torch.Tensor, where: str) -> None:
    """Finite weights and a finite x give a finite y unless a dtype overflowed: say which, never return inf/NaN."""
    if not torch.isfinite(y).all() and torch.isfinite(x).all():
        raise OverflowError(f"Int8Linear's output overflowed {where} (|x| up to {x.abs().max().item():.3g}; "
                            f"float16 holds up to 65504): use compute_dtype=torch.bfloat16 or torch.float32, "
                            f"or scale the input down")


class Int8Linear(nn.Module):
    """A frozen linear layer stored as LLM.int8() int8 weights: Y = int8_matmul_outliers(X, C_w, cw) + b."""

    def __init__(self, weight_codes: torch.Tensor, weight_absmax: torch.Tensor, bias: torch.Tensor | None,
                 threshold: float = 6.0, compute_dtype: torch.dtype = torch.float16):
        super().__init__()
        if weight_codes.dtype != torch.int8 or weight_codes.dim() != 2:
            raise ValueError(f"weight_codes must be a 2-D int8 tensor, got {weight_codes.dtype} {tuple(weight_codes.shape)}")
        if weight_absmax.shape != weight_codes.shape[:1]:
            raise ValueError(f"weight_absmax must hold one value per output row ({weight_codes.shape[0]}), "
                             f"got shape {tuple(weight_absmax.shape)}")
        if not torch.isfinite(weight_absmax).all() or (weight_absmax < 0).any():
            raise ValueError("weight_absmax must be finite and >= 0 (one absmax per output row)")
        if bias is not None and not torch.isfinite(bias).all():
            raise ValueError("bias holds NaN or Inf; Int8Linear needs a finite bias")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise ValueError(f"threshold must be a number >= 0 (0: no outlier decomposition), got {threshold!r}")
        if compute_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"compute_dtype must be float16, bfloat16 or float32, got {compute_dtype}")
        self.out_features, self.in_features = weight_codes.shape
        self.threshold, self.compute_dtype = float(threshold), compute_dtype
        self.register_buffer("weight_codes", weight_codes)
        self.register_buffer("weight_absmax", weight_absmax.float())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0,
                    compute_dtype: torch.dtype = torch.float16) -> "Int8Linear":
        """Quantize linear.weight row by row (C_w, cw); the bias is kept as it is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if not torch.isfinite(linear.weight).all():
            raise ValueError(f"linear.weight holds NaN or Inf ({linear}); LLM.int8() needs finite weights")
        codes, absmax = vectorwise_quantize(linear.weight.detach())
        return cls(codes, absmax, linear.bias, threshold, compute_dtype)

    @property
    def quantized_nbytes(self) -> int:
        """Bytes stored for the weight: int8 codes + one float32 absmax per output row."""
        return self.weight_codes.numel() + 4 * self.weight_absmax.numel()

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_codes.float() * (self.weight_absmax[:, None] / 127)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() == 0:
            raise ValueError(f"x must have at least one dimension (..., {self.in_features}), got a 0-dim tensor")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input must have {self.in_features} features in the last dim, got {tuple(x.shape)}")
        y = int8_matmul_outliers(x.reshape(-1, self.in_features), self.weight_codes, self.weight_absmax,
                                 self.threshold, self.compute_dtype)
        if self.bias is not None:
            y = y + self.bias.float()
        check_no_overflow(y, x, f"compute_dtype={self.compute_dtype}")
        y = y.to(x.dtype)
        check_no_overflow(y, x, f"the input's dtype {x.dtype}")
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}, "
                f"compute_dtype={self.compute_dtype}")
