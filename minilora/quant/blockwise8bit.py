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

"Nearest" follows bitsandbytes' CPU rule (so the bytes are equal), the rule double quantization
(quant/double.py) uses for its absmax too: s = clamp(x · (1/absmax), -1, 1) is snapped to a grid of 65,536
points over [-1, 1] and a table built once per map gives the code nearest each grid point.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .codebooks import dynamic_code
from .dispatch import fast_path
from .format import BLOCKSIZE_8BIT, check_blocksize, check_float_tensor


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


def quantize_groups(y: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q_i = table[trunc((s_i + 1)/2 · GRID + 0.5)], s_i = clamp(y_i · (1/c_g), -1, 1), c_g = max |y| in group g.

    Returns (q uint8 (n,), c float32 (groups,)); code is a sorted 256-value map; blocksize the blocksize rule.
    """
    check_blocksize(blocksize)
    y = y.reshape(-1).float()
    table = grid_table(tuple(code.float().tolist())).to(y.device)
    fast = fast_path()
    if fast is not None:
        return fast.quantize_groups(y, table, blocksize)
    n = y.numel()
    q = torch.empty(n, dtype=torch.uint8, device=y.device)
    c = torch.empty(math.ceil(n / blocksize), dtype=torch.float32, device=y.device)
    full = n - n % blocksize
    quantize_rows(y[:full].view(-1, blocksize), table, q[:full].view(-1, blocksize), c[:full // blocksize])
    if full < n:  # ragged last group
        quantize_rows(y[full:].view(1, -1), table, q[full:].view(1, -1), c[-1:])
    return q, c


def dequantize_groups(q: torch.Tensor, c: torch.Tensor, code: torch.Tensor, blocksize: int,
                      offset: torch.Tensor | float = 0.0) -> torch.Tensor:
    """y'_i = code[q_i] · c_{i // blocksize} + offset (float32, rounded after the product and after the sum)."""
    check_blocksize(blocksize)
    q, code = q.reshape(-1), code.float().to(q.device)
    offset = torch.as_tensor(offset, dtype=torch.float32, device=q.device)
    fast = fast_path()
    if fast is not None:
        return fast.dequantize_groups(q, c, code, blocksize, offset)
    n = q.numel()
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    full = n - n % blocksize
    dequantize_rows(q[:full].view(-1, blocksize), c[:full // blocksize], code, offset, out[:full].view(-1, blocksize))
    if full < n:
        dequantize_rows(q[full:].view(1, -1), c[-1:], code, offset, out[full:].view(1, -1))
    return out



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


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = BLOCKSIZE_8BIT, signed: bool = True) -> Blockwise8bitState:
    """x (any shape, fp32/fp16/bf16) -> codes (uint8, x's shape) and absmax (fp32, one per block of the flat x).
    The rounding rule is quantize_groups' (double quantization stores its absmax the same way)."""
    check_float_tensor(x, "x")
    check_blocksize(blocksize)
    if not torch.isfinite(x).all():
        raise ValueError("x has a non-finite value (inf or nan): 8-bit blockwise quantization needs finite input")
    codes, absmax = quantize_groups(x.detach(), dynamic_map(signed).to(x.device), blocksize)
    return Blockwise8bitState(codes.reshape(x.shape), absmax, blocksize, signed, x.dtype)


def dequantize_blockwise_8bit(state: Blockwise8bitState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x'_i = map[code_i] · absmax_{i // blocksize}, computed in float32, returned in dtype (default: x's dtype)."""
    n = state.codes.numel()
    if state.absmax.numel() != math.ceil(n / state.blocksize):
        raise ValueError(f"absmax has {state.absmax.numel()} values, expected {math.ceil(n / state.blocksize)} "
                         f"for {n} codes in blocks of {state.blocksize}")
    out = dequantize_groups(state.codes, state.absmax.float(), dynamic_map(state.signed),
                                           state.blocksize)
    return out.reshape(state.codes.shape).to(dtype or state.dtype)
