"""Large CPU output tensors: on 2 MiB pages, and recycled once no tensor uses them any more.

A fresh 64 MiB tensor (4096×4096 float32) is not memory yet: the allocator asks the kernel for an address
range, and each 4 KiB page is mapped and zeroed on its first write: 16 384 page faults, which take longer
than the dequantization arithmetic itself on the machines this project is measured on. malloc recycles
small blocks, but anything of 32 MiB or more is mapped fresh on every call (glibc's largest mmap
threshold), so every dequantize of a big weight pays the faults again.

`empty(n, dtype, device)` does for such outputs what a caching allocator (PyTorch's CUDA one, for example)
does for GPU memory:

1. It maps the memory itself, advised to use transparent huge pages (madvise(MADV_HUGEPAGE)): 32 faults
   of 2 MiB instead of 16 384 of 4 KiB when the memory is first touched.
2. It keeps the mapping after the tensor is gone and hands it out again for the next output of the same
   size: no faults at all. A mapping is free again when the only reference left to it is the cache's own
   (torch.frombuffer holds one reference to it for as long as any tensor or view uses the memory).
   At most CACHE_BYTES of free mappings are kept; `clear_cache()` drops them.

The tensor behaves like any other, except that its storage cannot be resized. Smaller outputs, other
devices and systems without madvise get plain torch.empty.
"""
from __future__ import annotations

import mmap
import sys
import threading

import torch

from ..format import ceil_div

HUGE_PAGE = 2 << 20          # bytes in a transparent huge page (x86-64, arm64 with 4 KiB base pages)
MIN_BYTES = 32 << 20         # below this, torch.empty's memory comes recycled from malloc: no gain
CACHE_BYTES = 512 << 20      # free mappings kept for reuse, at most

_lock = threading.Lock()
_maps: list[mmap.mmap] = []  # every mapping handed out and not yet dropped, oldest first


def _free_indices() -> list[int]:
    """Indices in _maps of the mappings no tensor uses: their only references are _maps' and getrefcount's
    argument (a tensor made by torch.frombuffer holds one more for as long as it or a view of it lives)."""
    return [i for i in range(len(_maps)) if sys.getrefcount(_maps[i]) <= 2]


def _mapped(size: int) -> mmap.mmap | None:
    """A new anonymous private mapping of size bytes, advised to use huge pages."""
    try:
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):  # e.g. a kernel built without transparent huge pages
        return None
    return m


def _drop(indices: list[int]) -> None:
    for i in sorted(indices, reverse=True):
        _maps.pop(i).close()


def _take(size: int) -> mmap.mmap | None:
    """The newest free cached mapping of exactly size bytes, or a new one. Of the other free mappings, at most
    CACHE_BYTES are kept, the newest; the older ones are unmapped."""
    with _lock:
        free = _free_indices()
        same = [i for i in free if len(_maps[i]) == size]
        if same:
            m = _maps[same[-1]]
            free.remove(same[-1])
        else:
            m = _mapped(size)
        kept, excess = 0, []
        for i in reversed(free):
            kept += len(_maps[i])
            if kept > CACHE_BYTES:
                excess.append(i)
        _drop(excess)
        if m is not None and not same:
            _maps.append(m)
        return m


def clear_cache() -> None:
    """Unmap every cached mapping that no tensor uses."""
    with _lock:
        _drop(_free_indices())


def empty(n: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised 1-D tensor of n elements; from the huge-page cache when on the CPU and >= MIN_BYTES."""
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type == "cpu" and nbytes >= MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
        m = _take(ceil_div(nbytes, HUGE_PAGE) * HUGE_PAGE)
        if m is not None:
            return torch.frombuffer(m, dtype=dtype, count=n)
    return torch.empty(n, dtype=dtype, device=device)
