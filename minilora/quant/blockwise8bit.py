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

"Nearest" follows bitsandbytes' CPU rule (so the bytes are equal): s = clamp(x · (1/absmax), -1, 1) is
snapped to a grid of 65,536 points over [-1, 1] and a table built once per map gives the code nearest each
grid point. A block of zeros has absmax 0 and codes pointing at 0.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

GRID = 65535  # the grid over [-1, 1] has GRID + 1 points
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=2)
def dynamic_map(signed: bool = True) -> torch.Tensor:
    """(256,) float32, sorted: the signed or unsigned dynamic 8-bit map (derivation in the module docstring)."""
    values = [0.0, 1.0]
    for e in range(7):
        bins = 2 ** e if signed else 2 ** (e + 1)
        edges = torch.linspace(0.1, 1.0, bins + 1)       # float32
        centres = (edges[:-1] + edges[1:]) / 2.0
        values += (10.0 ** (e - 6) * centres).tolist()
        if signed:
            values += (-(10.0 ** (e - 6)) * centres).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.lru_cache(maxsize=2)
def _grid_table(signed: bool) -> torch.Tensor:
    """(GRID + 1,) uint8: for grid point g_k = 2k/GRID - 1, the index of the map value nearest to it."""
    code = dynamic_map(signed)
    mids = (code[:-1] + code[1:]) * 0.5
    k = torch.arange(GRID + 1, dtype=torch.float32)
    g = (k + k) / torch.full_like(k, GRID) - 1
    return torch.bucketize(g, mids).to(torch.uint8)


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


def _check_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 64 or blocksize > 4096 \
            or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in 64 … 4096, got {blocksize!r}")
    return blocksize


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = 256, signed: bool = True) -> Blockwise8bitState:
    """x (any shape, fp32/fp16/bf16) -> codes (uint8, x's shape) and absmax (fp32, one per block of the flat x)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    blocksize = _check_blocksize(blocksize)
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    pad = -n % blocksize                                                 # the ragged last block: zeros can't
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)  # raise its absmax
    absmax = blocks.abs().amax(dim=1)                                    # (n_blocks,)
    inv = torch.where(absmax > 0, 1 / absmax, 0.0)[:, None]
    s = (blocks * inv).clamp_(-1, 1)
    # (s + 1)/2 · GRID + 0.5 in float64 then once to float32, truncated: the grid point at or below
    k = ((s + 1) * 0.5).nan_to_num_(0.5).double().mul_(GRID).add_(0.5).float().to(torch.int64)
    codes = _grid_table(signed).to(x.device)[k]
    codes[absmax == 0] = 0                                               # an all-zero block: code 0
    if not torch.isfinite(absmax).all():
        raise ValueError("x has a non-finite value (inf or nan): 8-bit blockwise quantization needs finite input")
    return Blockwise8bitState(codes.reshape(-1)[:n].reshape(x.shape), absmax, blocksize, signed, x.dtype)


def dequantize_blockwise_8bit(state: Blockwise8bitState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x'_i = map[code_i] · absmax_{i // blocksize}, computed in float32, returned in dtype (default: x's dtype)."""
    n = state.codes.numel()
    if state.absmax.numel() != math.ceil(n / state.blocksize):
        raise ValueError(f"absmax has {state.absmax.numel()} values, expected {math.ceil(n / state.blocksize)} "
                         f"for {n} codes in blocks of {state.blocksize}")
    values = dynamic_map(state.signed).to(state.codes.device)[state.codes.reshape(-1).long()]
    scale = state.absmax.float().repeat_interleave(state.blocksize)[:n]
    return (values * scale).reshape(state.codes.shape).to(dtype or state.dtype)
