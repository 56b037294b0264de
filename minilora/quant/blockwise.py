"""Blockwise 4-bit quantization: one absmax per block, nearest code, two codes per byte.

For block b of `blocksize` consecutive elements (the flattened tensor; a ragged last block gets its own):

    absmax_b = max_j |x_j|                      (float32)
    s_j      = x_j · (1 / absmax_b)             (scaled into [-1, 1])
    q_j      = index of the nearest code to s_j (ties to the lower code, see nearest.py)
    byte_k   = q_{2k} · 16 + q_{2k+1}           (first element in the HIGH nibble; an odd count is
                                                 padded with the code of 0)
    w_j      = code[q_j] · absmax_b             (dequantize, in float32, then cast to the dtype)

This is bitsandbytes' 4-bit layout, byte for byte (its ragged last block divides, x / absmax, and so
does this one). Outlier elements only stretch their own block's scale.

The work is done in chunks of CHUNK elements (chunks.py) so that the temporaries stay in the CPU cache.
"""
from __future__ import annotations

import functools
import math
import threading

import torch

from . import hugepages
from .chunks import CHUNK, run_chunked
from .nearest import check_code, nearest_index, nearest_table

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEQUANT_CHUNK = 1 << 19  # elements per dequantize step: 2^16 ... 2^21 measured, 2^19 ... 2^21 alike and best
TINY = 1e-38             # absmax is clamped to this before 1/absmax (all-zero blocks give s = 0)


def check_blocksize(blocksize: int, name: str = "blocksize") -> int:
    """blocksize must be a power of two from 32 to 4096."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{name} must be an int (a power of two from 32 to 4096), got {blocksize!r}")
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"{name} must be a power of two from 32 to 4096, got {blocksize}")
    return blocksize


def check_float_tensor(x: torch.Tensor, name: str = "x") -> None:
    """x must be a float32, float16 or bfloat16 tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def quantize_blockwise_4bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = 64
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """q = nearest(code, x_b / absmax_b) per block b; returns (packed uint8 ((n+1)//2,), absmax fp32 (blocks,)).

    x: float32/float16/bfloat16 tensor of any shape (flattened row-major); NaN or Inf raise ValueError.
    An empty x gives two empty tensors. Blocks of zeros get absmax 0 and the code of 0.
    """
    check_float_tensor(x)
    check_blocksize(blocksize)
    table = nearest_table(check_code(code), x.device)
    flat = x.detach().reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(math.ceil(n / blocksize), dtype=torch.float32, device=x.device)

    def work(begin: int, end: int) -> None:
        bufs = _Buffers(min(CHUNK, end - begin), x.device)
        x_chunks = flat[begin:end].view(-1, blocksize).split(CHUNK // blocksize)       # (blocks, blocksize)
        a_chunks = absmax[begin // blocksize:end // blocksize].split(CHUNK // blocksize)
        byte_chunks = packed[begin // 2:end // 2].split(CHUNK // 2)
        for xb, a_out, bytes_out in zip(x_chunks, a_chunks, byte_chunks):
            xb = xb.float()
            a = torch.maximum(xb.amax(1), xb.amin(1).neg(), out=a_out).abs_()     # max |x|, no copy of |x|
            _check_finite(a)
            s = torch.mul(xb, (1.0 / a.clamp(min=TINY))[:, None], out=bufs.s[:xb.numel()].view_as(xb))
            q = _nearest_into(s.view(-1), table, bufs).view(-1, 2)             # (pairs, 2) uint8
            torch.add(q[:, 1], q[:, 0], alpha=16, out=bytes_out)               # first element: high nibble

    run_chunked(full, work, x.device)
    if full < n:  # the ragged last block
        tail = flat[full:].float()
        a = tail.abs().max()
        _check_finite(a)
        absmax[-1] = a
        q = nearest_index(tail / a.clamp(min=TINY), table)
        if q.numel() % 2:
            q = torch.cat([q, q.new_full((1,), table.zero_index)])
        packed[full // 2:] = q[0::2] * 16 + q[1::2]
    return packed, absmax


def _check_finite(absmax: torch.Tensor) -> None:
    # NaN and Inf propagate into the block maximum, so checking absmax checks every element
    if not torch.isfinite(absmax).all():
        raise ValueError("x contains NaN or Inf; quantization needs finite values")


class _Buffers:
    """Scratch tensors reused by every chunk (s, t, q, the looked-up midpoint, the comparison)."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.s = torch.empty(size, dtype=torch.float32, device=device)
        self.f = torch.empty(size, dtype=torch.float32, device=device)
        self.t = torch.empty(size, dtype=torch.int32, device=device)
        self.q = torch.empty(size, dtype=torch.uint8, device=device)
        self.gt = torch.empty(size, dtype=torch.bool, device=device)


def _nearest_into(s: torch.Tensor, table, bufs: _Buffers) -> torch.Tensor:
    """nearest_index(s) with every temporary in bufs: q = base[t] + (s > mid[t]), t = trunc(s·K) + K."""
    m = s.numel()
    f, t, q, gt = bufs.f[:m], bufs.t[:m], bufs.q[:m], bufs.gt[:m]
    torch.mul(s, table.K, out=f)
    t.copy_(f).add_(table.K)                     # float -> int32 truncates toward zero; |s| <= 1 + 2^-23
    torch.index_select(table.base, 0, t, out=q)
    torch.index_select(table.mid, 0, t, out=f)
    return q.add_(torch.gt(s, f, out=gt))


@functools.lru_cache(maxsize=16)
def _pair_table(code_values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(256,) int64 whose 8 bytes are the float32 pair (code[byte >> 4], code[byte & 15])."""
    code = torch.tensor(code_values, dtype=torch.float32)
    byte = torch.arange(256)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1)  # (256, 2), high nibble first
    return pairs.contiguous().view(torch.int64).view(256).to(device)


_per_thread = threading.local()


def _scratch(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This thread's (int32 byte indices, int64 looked-up pairs) buffers of at least size elements, kept
    between calls: fresh ones would be fresh pages on every call of a training step. Made outside inference
    mode, so that they can be written in and out of it."""
    bufs = getattr(_per_thread, "bufs", {})
    _per_thread.bufs = bufs
    idx, pairs = bufs.get(device, (None, None))
    if idx is None or len(idx) < size:
        with torch.inference_mode(False):
            idx = torch.empty(size, dtype=torch.int32, device=device)
            pairs = torch.empty(size, dtype=torch.int64, device=device)
        bufs[device] = (idx, pairs)
    return idx, pairs


def dequantize_blockwise_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                              shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32
                              ) -> torch.Tensor:
    """w_j = code[q_j] · absmax_{j // blocksize} in float32, cast to dtype and reshaped to shape.

    Per chunk: each byte is looked up once in a 256-entry table of float32 pairs (high nibble first), the
    pairs are multiplied by their block's absmax in place, in float32, and written out (cast to dtype).
    Large outputs come from the huge-page cache (hugepages.py).
    """
    check_blocksize(blocksize)
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed must be uint8 with {(n + 1) // 2} bytes for shape {tuple(shape)}, "
                         f"got {packed.numel()} of {packed.dtype}")
    if absmax.numel() != math.ceil(n / blocksize):
        raise ValueError(f"absmax must hold {math.ceil(n / blocksize)} values, got {absmax.numel()}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    code = check_code(code)
    lut = _pair_table(tuple(code.tolist()), packed.device)
    packed, absmax = packed.reshape(-1), absmax.reshape(-1).float()
    out = hugepages.empty(n, dtype, packed.device)
    full = n - n % blocksize

    def work(begin: int, end: int) -> None:
        # all chunk views made up front (few Python calls per chunk): bytes, (blocks, 1) scales, (blocks, bs) outputs
        byte_chunks = packed[begin // 2:end // 2].split(DEQUANT_CHUNK // 2)
        scale_chunks = absmax[begin // blocksize:end // blocksize, None].split(DEQUANT_CHUNK // blocksize)
        out_chunks = out[begin:end].view(-1, blocksize).split(DEQUANT_CHUNK // blocksize)
        idx, pairs = _scratch(len(byte_chunks[0]), packed.device)
        for b, a, o in zip(byte_chunks, scale_chunks, out_chunks):
            i = idx[:len(b)].copy_(b)
            if dtype == torch.float32:    # look up straight into the output, scale it there
                torch.index_select(lut, 0, i, out=o.view(-1).view(torch.int64))
                o.mul_(a)
            else:                         # look up and scale in a small float32 buffer, then cast once
                p = torch.index_select(lut, 0, i, out=pairs[:len(b)])
                o.copy_(p.view(torch.float32).view(-1, blocksize).mul_(a))

    run_chunked(full, work, packed.device, DEQUANT_CHUNK)
    if full < n:  # the ragged last block, nibble by nibble
        tail = packed[full // 2:].long()
        q = torch.stack([tail >> 4, tail & 15], dim=1).view(-1)[:n - full]
        out[full:] = code.to(packed.device)[q] * absmax[-1]
    return out.view(shape)
