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

import functools
import math
from dataclasses import dataclass

import torch

from .blockwise import fast_path
from .codebooks import dynamic_code
from .format import NESTED_BLOCKSIZE, check_blocksize
from .int8 import dequantize_int8, quantize_int8

GRID = 65535  # the 8-bit grid has GRID + 1 points, 2/GRID apart


@functools.lru_cache(maxsize=4)
def grid_table(code_values: tuple[float, ...]) -> torch.Tensor:
    """(GRID + 1,) uint8: for grid point g_k = 2k/GRID - 1 (float32), the number of code midpoints below it."""
    code = torch.tensor(code_values, dtype=torch.float32)
    mids = (code[:-1] + code[1:]) * 0.5
    k = torch.arange(GRID + 1, dtype=torch.float32)
    g = (k + k) / torch.full_like(k, GRID) - 1  # element-wise IEEE division, then the shift
    return torch.bucketize(g, mids).to(torch.uint8)


def quantize_rows(rows: torch.Tensor, table: torch.Tensor, q_out: torch.Tensor, c_out: torch.Tensor) -> None:
    """One group per row: c = max |row|, q = table[trunc((clamp(row · (1/c), -1, 1) + 1)/2 · GRID + 0.5)]."""
    c = torch.amax(rows.abs(), 1, out=c_out)                                 # (groups,)
    inv = torch.where(c > 0, 1 / c, 0.0)[:, None]                           # no floor: inf for c < 2.9e-39
    t = (rows * inv).clamp_(-1, 1).nan_to_num_(nan=-1.0)                    # 0 · inf = NaN gets index 0
    t = t.add_(1).mul_(0.5)                                                  # float32, as the reference
    # t · GRID + 0.5 with one rounding (a fused multiply-add): exact in float64 since t is a multiple of
    # 2^-25 below 1, then rounded once to float32; float -> int truncates.
    k = t.double().mul_(GRID).add_(0.5).float().to(torch.int32)
    torch.index_select(table, 0, k.view(-1), out=q_out.view(-1))
    q_out[c == 0] = 0                                                        # all-zero group: codes 0


def dequantize_rows(q_rows: torch.Tensor, c_rows: torch.Tensor, code: torch.Tensor, offset: torch.Tensor,
                    out_rows: torch.Tensor) -> None:
    """One group per row: out = code[q] · c + offset (float32, rounded after the product and after the sum)."""
    torch.index_select(code, 0, q_rows.reshape(-1).int(), out=out_rows.view(-1))
    out_rows.mul_(c_rows[:, None]).add_(offset)


def quantize_blockwise_8bit(y: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """q_i = table[trunc((s_i + 1)/2 · GRID + 0.5)], s_i = clamp(y_i · (1/c_g), -1, 1), c_g = max |y| in group g.

    Returns (q uint8 (n,), c float32 (groups,)); code is a sorted 256-value map; blocksize the blocksize rule.
    """
    check_blocksize(blocksize)
    y = y.reshape(-1).float()
    table = grid_table(tuple(code.float().tolist())).to(y.device)
    fast = fast_path()
    if fast is not None:
        return fast.quantize_blockwise_8bit(y, table, blocksize)
    n = y.numel()
    q = torch.empty(n, dtype=torch.uint8, device=y.device)
    c = torch.empty(math.ceil(n / blocksize), dtype=torch.float32, device=y.device)
    full = n - n % blocksize
    quantize_rows(y[:full].view(-1, blocksize), table, q[:full].view(-1, blocksize), c[:full // blocksize])
    if full < n:  # ragged last group
        quantize_rows(y[full:].view(1, -1), table, q[full:].view(1, -1), c[-1:])
    return q, c


def dequantize_blockwise_8bit(q: torch.Tensor, c: torch.Tensor, code: torch.Tensor,
                              blocksize: int = NESTED_BLOCKSIZE, offset: torch.Tensor | float = 0.0) -> torch.Tensor:
    """y'_i = code[q_i] · c_{i // blocksize} + offset (float32, rounded after the product and after the sum)."""
    check_blocksize(blocksize)
    q, code = q.reshape(-1), code.float().to(q.device)
    offset = torch.as_tensor(offset, dtype=torch.float32, device=q.device)
    fast = fast_path()
    if fast is not None:
        return fast.dequantize_blockwise_8bit(q, c, code, blocksize, offset)
    n = q.numel()
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    full = n - n % blocksize
    dequantize_rows(q[:full].view(-1, blocksize), c[:full // blocksize], code, offset, out[:full].view(-1, blocksize))
    if full < n:
        dequantize_rows(q[full:].view(1, -1), c[-1:], code, offset, out[full:].view(1, -1))
    return out


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
    a8, nested_absmax = quantize_blockwise_8bit(absmax - offset, nested_code, blocksize)
    return a8, offset, nested_absmax, nested_code


def dequantize_absmax_8bit(a8: torch.Tensor, offset: torch.Tensor | float, nested_absmax: torch.Tensor,
                           nested_code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """a'_i = nested_code[a8_i] · nested_absmax[i // blocksize] + offset (float32)."""
    return dequantize_blockwise_8bit(a8, nested_absmax, nested_code, blocksize, offset)


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
