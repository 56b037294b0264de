"""Blockwise 8-bit quantization with the dynamic maps: the storage of 8-bit optimizer state.

Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (2021). A tensor x is cut into blocks of
`blocksize` values; each block keeps its absmax in float32 and one byte per value:

    absmax_b = max |x_i| over block b                                   float32, one per block
    code_i   = nearest(map, x_i / absmax_b)                              uint8, x's shape
    x'_i     = map[code_i] · absmax_b                                    dequantized

The map is a dynamic 8-bit type (Dettmers, "8-Bit Approximations for Parallelism in Deep Learning"):
a decade picked by the leading zeros, then a linear fraction with more bins for larger magnitudes.
    signed   (Adam's first moment, m):  ±10^(e-6) · bin centres, e = 0..6, 2^e bins per sign;   + 0 and 1
    unsigned (Adam's second moment, v):  10^(e-6) · bin centres, e = 0..6, 2^(e+1) bins;         + 0 and 1
v ≥ 0 always, so the unsigned map spends the sign bit on twice the resolution.

"Nearest" follows bitsandbytes' CPU rule (so the bytes are equal), the one double quantization already
uses for its absmax (quant/double.py): s = clamp(x · (1/absmax), -1, 1) is snapped to a grid of 65,536
points over [-1, 1] and a table built once per map gives the code nearest each grid point.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from . import double
from .codebooks import dynamic_code
from .format import check_blocksize, check_float_tensor


@functools.lru_cache(maxsize=2)
def dynamic_map(signed: bool = True) -> torch.Tensor:
    """(256,) float32, sorted. Signed: codebooks.dynamic_code. Unsigned: the same decades with twice the bins,
    10^(e-6) · (0.1 + (j + ½) · 0.9 / 2^(e+1)), e = 0..6, j < 2^(e+1): 2·(1+2+…+64) = 254 values, plus 0 and 1."""
    if signed:
        return dynamic_code()
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2 ** (e + 1) + 1)   # float32
        values += (10.0 ** (e - 6) * (edges[:-1] + edges[1:]) / 2.0).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclass(eq=False)
class Blockwise8bitState:
    """codes: uint8 with x's shape; absmax: float32 (n_blocks,); what dequantization needs besides them."""
    codes: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    signed: bool
    dtype: torch.dtype

    def __eq__(self, other) -> bool:
        return (isinstance(other, Blockwise8bitState) and (self.blocksize, self.signed, self.dtype)
                == (other.blocksize, other.signed, other.dtype) and torch.equal(self.codes, other.codes)
                and torch.equal(self.absmax, other.absmax))

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.absmax.numel()


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = 256, signed: bool = True) -> Blockwise8bitState:
    """x (any shape, fp32/fp16/bf16) -> codes (uint8, x's shape) and absmax (fp32, one per block of the flat x).
    The rounding rule is double quantization's (quant/double.py, which stores its absmax this way)."""
    check_float_tensor(x, "x")
    check_blocksize(blocksize)
    if not torch.isfinite(x).all():
        raise ValueError("x has a non-finite value (inf or nan): 8-bit blockwise quantization needs finite input")
    codes, absmax = double.quantize_blockwise_8bit(x.detach(), dynamic_map(signed).to(x.device), blocksize)
    return Blockwise8bitState(codes.reshape(x.shape), absmax, blocksize, signed, x.dtype)


def dequantize_blockwise_8bit(state: Blockwise8bitState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x'_i = map[code_i] · absmax_{i // blocksize}, computed in float32, returned in dtype (default: x's dtype)."""
    n = state.codes.numel()
    if state.absmax.numel() != math.ceil(n / state.blocksize):
        raise ValueError(f"absmax has {state.absmax.numel()} values, expected {math.ceil(n / state.blocksize)} "
                         f"for {n} codes in blocks of {state.blocksize}")
    out = double.dequantize_blockwise_8bit(state.codes, state.absmax.float(), dynamic_map(state.signed),
                                           state.blocksize)
    return out.reshape(state.codes.shape).to(dtype or state.dtype)
