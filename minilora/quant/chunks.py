"""Run a function over a long range in cache-sized chunks, on a few worker threads.

Every torch op on a chunk of at most CHUNK elements stays below torch's own parallel grain size (32768),
so it runs on one core without a thread-team barrier; the workers (one per torch thread) each take a
contiguous share of the chunks. A busy machine then slows this down in proportion to the CPU it gets,
instead of stalling every small op on a barrier.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

CHUNK = 7 * 4096      # elements per step: a multiple of every allowed blocksize (32 ... 4096), < 32768
_pool: ThreadPoolExecutor | None = None
_pool_pid = -1        # a forked child inherits the pool object but not its threads: make a new one


def run_chunked(n: int, work: Callable[[int, int], None], device: torch.device) -> None:
    """Call work(start, stop) on contiguous, CHUNK-aligned shares of range(0, n) (possibly concurrently)."""
    global _pool, _pool_pid
    steps = math.ceil(n / CHUNK)
    workers = min(torch.get_num_threads(), steps, 8) if device.type == "cpu" else 1
    if workers <= 1:
        if n:
            work(0, n)
        return
    if _pool is None or _pool_pid != os.getpid() or _pool._max_workers < workers:
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="minilora-quant")
        _pool_pid = os.getpid()
    share = math.ceil(steps / workers) * CHUNK
    inference = torch.is_inference_mode_enabled()  # thread-local: carry the caller's mode into the workers

    def run(k: int) -> None:
        with torch.inference_mode(inference), torch.no_grad():
            work(k * share, min(n, (k + 1) * share))

    list(_pool.map(run, range(math.ceil(n / share))))
