"""Affine (zero-point) round-to-nearest quantization with a group size, the lecture's q = round(x / S + Z).

Absmax puts 0 in the middle of a symmetric grid; the affine grid instead spans each group's own [min, max]
(0 included, so that a zero weight stays exactly zero), with 2^bits levels:

    xmin = min(min_j x_j, 0),  xmax = max(max_j x_j, 0)      over one group of `groupsize` consecutive
    S    = (xmax - xmin) / (2^bits - 1)                        elements along the last dim
    Z    = round(-xmin / S)                                    the integer that stands for 0
    q_j  = clamp(round(x_j / S + Z), 0, 2^bits - 1)            the stored code
    x'_j = S · (q_j - Z)                                       dequantized; |x_j - x'_j| <= S / 2

Storage (AffineState): codes packed 8 // bits to a byte for bits <= 4 (first element in the highest field,
as the 4-bit formats store their high nibble first), one byte each for 5..8 bits; S in float32 and Z in
uint8 per group. int4 with groupsize 128: 4 + (32 + 8) / 128 = 4.3125 bits per parameter.
GPTQ (gptq.py) quantizes onto this same grid; the helpers grid_params / to_codes / from_codes are shared.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .format import FLOAT_DTYPES as _STORED_DTYPES
from .format import check_float_tensor

FLOAT_DTYPES = _STORED_DTYPES + (torch.float64,)  # affine also takes float64 input (calibration math)


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int from 2 to 8, got {bits!r}")
    return bits


def check_groupsize(groupsize: int | None, columns: int) -> int:
    """groupsize must be a positive int dividing the last dim (`columns`); None means one group per row."""
    if groupsize is None:
        return columns
    if isinstance(groupsize, bool) or not isinstance(groupsize, int) or groupsize < 1:
        raise ValueError(f"groupsize must be a positive int or None (one group per row), got {groupsize!r}")
    if columns % groupsize:
        raise ValueError(f"groupsize={groupsize} does not divide the last dimension ({columns})")
    return groupsize


def check_float(x: torch.Tensor, name: str = "x") -> None:
    check_float_tensor(x, name, FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a 0-dim tensor")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf; quantization needs finite values")


def grid_params(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, Z) of the affine grid over the last dim of x: S = (xmax - xmin) / (2^bits - 1), Z = round(-xmin / S).

    A group that is all zeros gets S = 1, Z = 0 (any S reproduces it exactly)."""
    maxq = 2 ** bits - 1
    xmin = x.amin(-1).clamp(max=0)
    xmax = x.amax(-1).clamp(min=0)
    scale = (xmax - xmin) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def to_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round(x / S + Z), 0, 2^bits - 1), elementwise (S and Z broadcast against x)."""
    return torch.round(x / scale + zero).clamp(0, 2 ** bits - 1)


def from_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x' = S · (q - Z)."""
    return scale * (q - zero)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (any shape, values < 2^bits) -> flat uint8, 8 // bits per byte for bits <= 4, first in the high field."""
    flat = q.reshape(-1).to(torch.uint8)
    per_byte = 8 // bits if bits <= 4 else 1
    if per_byte == 1:
        return flat.clone()
    width = 8 // per_byte
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % per_byte)).view(-1, per_byte)
    shifts = torch.arange(per_byte - 1, -1, -1, dtype=torch.uint8) * width     # high field first
    return (flat << shifts).sum(1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack: flat uint8 codes, numel of them."""
    per_byte = 8 // bits if bits <= 4 else 1
    if per_byte == 1:
        return packed[:numel]
    width = 8 // per_byte
    shifts = torch.arange(per_byte - 1, -1, -1, dtype=torch.uint8) * width
    return ((packed[:, None] >> shifts) & (2 ** width - 1)).reshape(-1)[:numel]


@dataclass
class AffineState:
    """A tensor stored as affine codes: x' = scale[g] · (q - zero[g]) for the groups g along its last dim."""
    codes: torch.Tensor      # uint8, packed (see pack)
    scale: torch.Tensor      # float32 (*shape[:-1], shape[-1] // groupsize)
    zero: torch.Tensor       # uint8, same shape as scale
    shape: torch.Size
    bits: int
    groupsize: int
    dtype: torch.dtype       # the original dtype; dequantize returns it

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors: packed codes + scales + zero points."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel if self.numel else 0.0


def state_from_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, groupsize: int,
                     dtype: torch.dtype) -> AffineState:
    """Pack integer codes q (any float/int dtype, x's shape) with per-group scale and zero into an AffineState."""
    return AffineState(pack(q, bits), scale.float(), zero.to(torch.uint8), torch.Size(q.shape), bits, groupsize,
                       dtype)


def quantize_affine(x: torch.Tensor, bits: int = 4, groupsize: int | None = 128) -> AffineState:
    """q = round(x / S + Z) per group of `groupsize` consecutive elements along the last dim (round to nearest).

    x: a floating-point tensor; bits: 2..8; groupsize: divides x.shape[-1], or None for one group per row."""
    check_bits(bits)
    check_float(x)
    gs = check_groupsize(groupsize, x.shape[-1])
    groups = x.detach().double().reshape(*x.shape[:-1], x.shape[-1] // gs, gs)   # (..., n_groups, gs)
    scale, zero = grid_params(groups, bits)
    scale = scale.float().double()        # quantize with the scale exactly as stored (float32)
    q = to_codes(groups, scale[..., None], zero[..., None], bits)
    return state_from_codes(q.reshape(x.shape), scale, zero, bits, gs, x.dtype)


def dequantize_affine(state: AffineState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x' = S · (q - Z), in the original shape and dtype (or `dtype`)."""
    if not isinstance(state, AffineState):
        raise TypeError(f"state must be an AffineState, got {type(state).__name__}")
    q = unpack(state.codes, state.bits, state.numel).float()
    *lead, cols = state.shape
    groups = q.reshape(*lead, cols // state.groupsize, state.groupsize)
    x = from_codes(groups, state.scale[..., None], state.zero.float()[..., None])
    return x.reshape(state.shape).to(dtype or state.dtype)
