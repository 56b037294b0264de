"""Run a function over a long range in chunks, so the temporaries of each step stay small.

Quantizing a 4096×4096 weight in one go would allocate several full-size temporaries (the scaled values,
their bin indices, the comparisons); in chunks of CHUNK elements the same scratch buffers are reused for
every chunk and stay in the CPU cache, while each torch op on a chunk is still large enough for torch's
own threads to share it.

Measured and not kept: a pool of Python threads, one slice each, with torch single-threaded inside every
pool thread (the table lookup, index_select, runs on one core in PyTorch). On the 2-core machine this
project is measured on it was no faster than this loop (median of 41 alternating runs within noise, both
for 4096x4096 and for GPT-2-sized weights), so the simpler code stays.
"""
from __future__ import annotations

from typing import Callable

import torch

CHUNK = 8 * 7 * 4096  # elements per step: a multiple of every allowed blocksize (32 ... 4096)


def run_chunked(n: int, work: Callable[[int, int], None], device: torch.device, chunk: int = CHUNK) -> None:
    """Call work(start, stop) once over range(0, n); work itself walks it in chunk-sized steps."""
    if n:
        work(0, n)
