"""The 8-bit blockwise groups, fast: ../blockwise8bit.py's rows, walked in chunks.

Each group of blocksize values is one row of the reference's per-row functions (quantize_rows /
dequantize_rows); here the full groups are cut into chunks of CHUNK elements and the chunks into slices on
the thread pool (chunks.py). The per-row arithmetic is the reference's own, so the bytes are the same.
"""
from __future__ import annotations

import math

import torch

from .chunks import CHUNK, run_chunked
from ..blockwise8bit import dequantize_rows, quantize_rows


def quantize_groups(y: torch.Tensor, table: torch.Tensor, blocksize: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """blockwise8bit.quantize_groups for a flat float32 y, given the grid table: (q uint8 (n,), c fp32 (groups,))."""
    n = y.numel()
    q = torch.empty(n, dtype=torch.uint8, device=y.device)
    c = torch.empty(math.ceil(n / blocksize), dtype=torch.float32, device=y.device)
    full = n - n % blocksize
    per = CHUNK // blocksize

    def work(begin: int, end: int) -> None:
        for rows, q_out, c_out in zip(y[begin:end].view(-1, blocksize).split(per),
                                      q[begin:end].view(-1, blocksize).split(per),
                                      c[begin // blocksize:end // blocksize].split(per)):
            quantize_rows(rows, table, q_out, c_out)

    run_chunked(full, work, y.device)
    if full < n:  # ragged last group
        quantize_rows(y[full:].view(1, -1), table, q[full:].view(1, -1), c[-1:])
    return q, c


def dequantize_groups(q: torch.Tensor, c: torch.Tensor, code: torch.Tensor, blocksize: int,
                              offset: torch.Tensor) -> torch.Tensor:
    """blockwise8bit.dequantize_groups for a flat q, float32 code and 0-dim float32 offset on q's device."""
    n = q.numel()
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    full = n - n % blocksize
    per = CHUNK // blocksize

    def work(begin: int, end: int) -> None:
        for q_rows, c_rows, out_rows in zip(q[begin:end].view(-1, blocksize).split(per),
                                            c[begin // blocksize:end // blocksize].split(per),
                                            out[begin:end].view(-1, blocksize).split(per)):
            dequantize_rows(q_rows, c_rows, code, offset, out_rows)

    run_chunked(full, work, q.device)
    if full < n:
        dequantize_rows(q[full:].view(1, -1), c[-1:], code, offset, out[full:].view(1, -1))
    return out
