"""Double quantization: the block absmax values (c1) are quantized a second time.

QLoRA format (what bitsandbytes stores), for the per-block absmax vector a (one float32 per 64 weights):

    offset  = mean(a)                                    float32
    y       = a - offset                                 centred, so the signed 8-bit map is used fully
    c2_g    = max |y| over group g of 256 values         float32 ("nested absmax")
    a8_i    = nearest(dynamic_code, y_i / c2_{i//256})   uint8
    a'_i    = dynamic_code[a8_i] · c2_{i//256} + offset  dequantized absmax

Storage per weight: 8/64 bits for a8 plus 32/(64·256) bits for c2 instead of 32/64 bits for a.

Code choice (8-bit), the rule bitsandbytes' CPU path uses: s = clamp(y · (1/c2), -1, 1) is snapped to
a grid of 65536 points over [-1, 1], k = trunc((s + 1)/2 · 65535 + 0.5), and a table built once gives
the code nearest to the grid point g_k = 2k/65535 - 1 (the number of code midpoints below g_k). So
|s - code| <= G8/2 + 1/65535, where G8 = 0.9/64 is the largest gap of the dynamic map; codes closer
together than the grid step (only near 0) are not told apart. A group whose values are all 0 (c2 = 0)
gets index 0; its values dequantize to exactly the offset. As in bitsandbytes, 1/c2 has no floor: below
c2 = 2.9e-39 it is inf, y · inf clamps to ±1, and 0 · inf (NaN) gets index 0.

Error of the dequantized absmax: |a'_i - a_i| <= c2 · (G8/2 + 1/65535) + float32 rounding (bounds.py).

The lecture's simpler variant, int8 absmax applied twice, is `double_quantize_int8` (teaching mode).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .blockwise8bit import dequantize_groups, quantize_groups
from .codebooks import dynamic_code
from .format import NESTED_BLOCKSIZE
from .int8 import dequantize_int8, quantize_int8

def quantize_absmax(absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of absmax: returns (a8 uint8, offset 0-dim fp32, nested_absmax fp32, nested_code).

    offset = mean(a) (0 for an empty a); a8, nested_absmax = 8-bit blockwise(a - offset, dynamic map).
    The mean is taken in float32, as bitsandbytes does; when that sum overflows (absmax values near the
    float32 maximum) it is taken in float64 and rounded, so that every finite input has a finite offset.
    """
    absmax = absmax.reshape(-1).float()
    offset = absmax.mean() if absmax.numel() else torch.zeros((), device=absmax.device)
    if not torch.isfinite(offset):
        offset = absmax.double().mean().float()
    nested_code = dynamic_code(absmax.device)
    a8, nested_absmax = quantize_groups(absmax - offset, nested_code, blocksize)
    return a8, offset, nested_absmax, nested_code


def dequantize_absmax_8bit(a8: torch.Tensor, offset: torch.Tensor | float, nested_absmax: torch.Tensor,
                           nested_code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """a'_i = nested_code[a8_i] · nested_absmax[i // blocksize] + offset (float32)."""
    return dequantize_groups(a8, nested_absmax, nested_code, blocksize, offset)


# ---- teaching mode: the lecture's int8 double quantization ---------------------------------------

@dataclass
class Int8DoubleQuant:
    """Weights in int8 (blockwise absmax), the block constants c1 in int8, one float32 c2.

    Lecture example: a 5x5 float32 matrix (100 bytes) in blocks of 5 -> 25 bytes of int8 weights +
    5 bytes of int8 constants + 4 bytes for c2 = 34 bytes.
    """
    q: torch.Tensor          # int8, the weights' shape
    c1: torch.Tensor         # int8, one per block: round(127 · absmax_b / c2)
    c2: torch.Tensor         # float32 scalar: max over blocks of absmax_b
    blocksize: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Exact storage: q and c1 one byte each, c2 four bytes."""
        return self.q.numel() + self.c1.numel() + 4


def double_quantize_int8(x: torch.Tensor, blocksize: int) -> Int8DoubleQuant:
    """W_int8 = round(127 · W / c1_b) per block; c1 = absmax_b is then quantized the same way: round(127 · c1 / c2)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if isinstance(x, torch.Tensor) and x.numel() == 0:
        raise ValueError("x is empty: double quantization needs at least one element (there is no c2 to store)")
    q, absmax = quantize_int8(x, blocksize)
    c1, c2 = quantize_int8(absmax, None)
    return Int8DoubleQuant(q, c1, c2.reshape(()), blocksize, x.dtype)


def double_dequantize_int8(state: Int8DoubleQuant) -> torch.Tensor:
    """W' = q · c1' / 127 with c1' = c1 · c2 / 127: dequantize the constants, then the weights."""
    absmax = dequantize_int8(state.c1, state.c2.reshape(1), None)
    return dequantize_int8(state.q, absmax, state.blocksize).to(state.dtype)
