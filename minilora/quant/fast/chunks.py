"""Run a function over a long range: one contiguous slice per CPU core, each walked in cache-sized chunks.

Two ideas, both about the CPU:

1. Chunks. Quantizing a 4096×4096 weight in one go would allocate several full-size temporaries (scaled
   values, bin indices, comparisons); walking a slice in chunks of CHUNK elements reuses the same small
   scratch buffers, which stay in the cache.
2. Slices on a pool of threads. The table lookup at the heart of (de)quantization (`index_select`) runs on
   one core in PyTorch however large it is, so the range is cut into one slice per core and each slice runs
   on a pool thread. Each pool thread sets *its own* torch thread count to 1: its ops then never start
   OpenMP teams that would fight the other slices for the same cores. PyTorch ops release the GIL, so the
   slices really run side by side. The caller's grad / inference mode is carried into the pool threads.

Note: the pool is for large ranges. For small ones (GPT-2-sized weights, a few million elements) starting
the slices costs more than it saves, hence MIN_SLICE; for large ones it also keeps torch's idle OpenMP thread
from spinning on the core the single-threaded lookup needs (benchmarks/speed.py measures the speed).

Small ranges (under two chunks or 2·MIN_SLICE elements), one-core machines and GPU tensors skip the pool:
work(0, n) runs inline.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable

import torch

from ..format import ceil_div

CHUNK = 8 * 7 * 4096  # elements per step: a multiple of every allowed blocksize (32 ... 4096)
MIN_SLICE = 1 << 21   # elements; below two of these per thread, handing work over costs more than it gains

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = 0  # a forked child inherits the pool object but none of its threads: it makes its own


def _make_pool(size: int) -> ThreadPoolExecutor:
    """A pool of `size` started threads, each with torch.set_num_threads(1) for itself only."""
    ready = threading.Barrier(size + 1)
    restore = torch.get_num_threads()

    def single_threaded() -> None:
        torch.get_num_threads()  # torch's lazy per-thread setup first, or it would undo the next line later
        torch.set_num_threads(1)
        ready.wait()

    pool = ThreadPoolExecutor(size, thread_name_prefix="minilora-quant", initializer=single_threaded)
    for _ in range(size):          # start every thread now, so that each has run its initializer ...
        pool.submit(lambda: None)
    ready.wait()
    torch.set_num_threads(restore)  # ... then put back the count that threads started later will inherit
    return pool


def workers() -> int:
    """How many slices a large range is cut into: torch's thread count here, at most the CPU count."""
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


def run_chunked(n: int, work: Callable[[int, int], None], device: torch.device, chunk: int = CHUNK) -> None:
    """Call work(start, stop) over slices that cover range(0, n), each start a multiple of chunk.

    work walks its own slice in chunk-sized steps and must only write to its own part of the outputs.
    """
    global _pool, _pool_size, _pool_pid
    if not n:
        return
    chunks = ceil_div(n, chunk)
    k = min(workers(), chunks, n // MIN_SLICE)  # slices, each at least one chunk and MIN_SLICE elements
    if torch.device(device).type != "cpu" or k < 2:
        work(0, n)
        return
    with _lock:
        if _pool_size < k or _pool_pid != os.getpid():  # an old pool finishes its work and is collected
            _pool, _pool_size, _pool_pid = _make_pool(k), k, os.getpid()
        pool = _pool
    bounds = [min(n, (chunks * i // k) * chunk) for i in range(k + 1)]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(begin: int, end: int) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            work(begin, end)

    futures = [pool.submit(run, a, b) for a, b in zip(bounds, bounds[1:]) if a < b]
    wait(futures)       # every slice has stopped before the caller goes on ...
    for f in futures:
        f.result()      # ... then the first error of a slice is raised in the caller
