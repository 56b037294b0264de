"""Run a function over a long range in chunks, so the temporaries of each step stay small.

Quantizing a 4096×4096 weight in one go would allocate several full-size temporaries (the scaled values,
their bin indices, the comparisons); in chunks of CHUNK elements the same scratch buffers are reused for
every chunk and stay in the CPU cache, while each torch op on a chunk is still large enough for torch's
own threads to share it. (A pool of Python worker threads over smaller chunks was measured too: faster on
a machine shared with other jobs, 1.5x slower on an idle 2-core one, where the GIL serialises the many
small ops; this simpler loop is the one kept.)
"""
from __future__ import annotations

from typing import Callable

import torch

CHUNK = 8 * 7 * 4096  # elements per step: a multiple of every allowed blocksize (32 ... 4096)


def run_chunked(n: int, work: Callable[[int, int], None], device: torch.device) -> None:
    """Call work(start, stop) once over range(0, n); work itself walks it in CHUNK-sized steps."""
    if n:
        work(0, n)
