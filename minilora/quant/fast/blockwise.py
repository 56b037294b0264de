"""Blockwise 4-bit (de)quantization, fast on a CPU: the same bytes as ../blockwise.py, computed in chunks.

What changes against the reference, and why (figures in chunks.py and hugepages.py):

- quantize walks the full blocks in chunks of CHUNK elements (chunks.py), slices of them on a pool of
  threads; every temporary of a chunk lives in one set of scratch buffers (_Buffers), so it stays in cache.
- the nearest code is found with a bin grid (nearest.py): two table look-ups and a compare per element
  instead of a binary search (torch.bucketize).
- dequantize looks each byte up once in a 256-entry table of float32 PAIRS (high nibble first) and scales the
  pairs by their block's absmax in place: in the output for float32; for 16-bit outputs in the float32 scratch,
  then copied into the output, rounded once (a mixed-dtype mul measured slower than these two passes). The byte
  indices and looked-up pairs live in per-thread scratch buffers kept between calls, and large outputs come from
  the huge-page cache.

The ragged last block (fewer than blocksize elements) is left to the reference: it is at most one block.
tests/test_quant_fast.py proves every output byte-equal to the reference.
"""
from __future__ import annotations

import functools
import threading

import torch

from . import hugepages
from .chunks import CHUNK, run_chunked
from .nearest import nearest_table
from .. import blockwise as reference
from ..format import TINY, ceil_div

DEQUANT_CHUNK = 1 << 19  # elements per dequantize step: 2^16 ... 2^21 measured, 2^19 ... 2^21 alike and best


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


def quantize_full_blocks(flat: torch.Tensor, code: torch.Tensor, blocksize: int, packed: torch.Tensor,
                         absmax: torch.Tensor) -> None:
    """Fill packed[:full // 2] and absmax[:full // blocksize] for the full blocks of flat (full = a multiple of
    blocksize): absmax_b = max |x|, s = x · (1/absmax_b), q = nearest code, byte = 16·q_even + q_odd.
    A non-finite absmax raises ValueError."""
    table = nearest_table(code, flat.device)
    full = flat.numel() - flat.numel() % blocksize

    def work(begin: int, end: int) -> None:
        bufs = _Buffers(min(CHUNK, end - begin), flat.device)
        x_chunks = flat[begin:end].view(-1, blocksize).split(CHUNK // blocksize)       # (blocks, blocksize)
        a_chunks = absmax[begin // blocksize:end // blocksize].split(CHUNK // blocksize)
        byte_chunks = packed[begin // 2:end // 2].split(CHUNK // 2)
        for xb, a_out, bytes_out in zip(x_chunks, a_chunks, byte_chunks):
            xb = xb.float()
            a = torch.maximum(xb.amax(1), xb.amin(1).neg(), out=a_out).abs_()     # max |x|, no copy of |x|
            if not torch.isfinite(a).all():  # NaN and Inf propagate into the block maximum
                raise ValueError("x contains NaN or Inf; quantization needs finite values")
            s = torch.mul(xb, (1.0 / a.clamp(min=TINY))[:, None], out=bufs.s[:xb.numel()].view_as(xb))
            q = _nearest_into(s.view(-1), table, bufs).view(-1, 2)             # (pairs, 2) uint8
            torch.add(q[:, 1], q[:, 0], alpha=16, out=bytes_out)               # first element: high nibble

    run_chunked(full, work, flat.device)


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


def empty(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The output tensor: from the huge-page cache when large and on the CPU."""
    return hugepages.empty(n, dtype, device)


def dequantize_full_blocks(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                           out: torch.Tensor) -> None:
    """out[:full] = code[q_j] · absmax_{j // blocksize} in float32, cast to out's dtype, for the full blocks
    (full = out.numel() rounded down to a multiple of blocksize). packed, absmax float32 and out are flat."""
    lut = _pair_table(tuple(code.tolist()), packed.device)
    full = out.numel() - out.numel() % blocksize
    dtype = out.dtype

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
            else:                         # look up into a float32 buffer, scale it there, then write the
                p = torch.index_select(lut, 0, i, out=pairs[:len(b)])  # product rounded once (copy_ rounds)
                o.copy_(p.view(torch.float32).view(-1, blocksize).mul_(a))

    run_chunked(full, work, packed.device, DEQUANT_CHUNK)


def quantize_blockwise_4bit(flat: torch.Tensor, code: torch.Tensor, blocksize: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.quantize_blocks(flat, code, blocksize), fast: the full blocks here, the ragged one there."""
    n = flat.numel()
    full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(ceil_div(n, blocksize), dtype=torch.float32, device=flat.device)
    quantize_full_blocks(flat, code, blocksize, packed, absmax)
    if full < n:
        packed[full // 2:], absmax[-1:] = reference.quantize_blocks(flat[full:], code, blocksize)
    return packed, absmax


def dequantize_blockwise_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                              n: int, dtype: torch.dtype) -> torch.Tensor:
    """reference.dequantize_blocks(...).to(dtype), fast: flat (n,) in dtype; packed and absmax (float32) flat."""
    out = empty(n, dtype, packed.device)
    full = n - n % blocksize
    dequantize_full_blocks(packed, absmax, code, blocksize, out)
    if full < n:
        out[full:] = reference.dequantize_blocks(packed[full // 2:], absmax[-1:], code, blocksize, n - full)
    return out
