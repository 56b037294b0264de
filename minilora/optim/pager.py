"""A pager: fixed-size pages of a tensor state, at most `device_budget` bytes of them on the device.

This is how an operating system pages memory, applied to optimizer state. The state is cut into pages of
one shape and dtype (`page_size` bytes each). A page lives either on the compute device or in (pinned) host
memory; a page is brought to the device just before the work that needs it, and when the device budget is
full the least recently used page is evicted to the host:

    resident pages  ≤  capacity  =  device_budget // page_size          (None: no limit, nothing paged)
    victim          =  the least recently used resident page not in use

A page never touched yet is 'unborn': it is all zeros and lives nowhere until first use. The pager knows
nothing of what the pages hold; PagedAdamW (minilora.optim.paged) stores AdamW's two moments in them.

On CUDA, host pages are pinned (page-locked) so copies run asynchronously on two side streams, one per
direction (PCIe moves both ways at once); per-page events tell each stream when it may touch a page, so the
next pages can be copied in while the current ones are in use. On a CPU-only machine the same pager runs
with the CPU as the "device": pages are copied between two sets of CPU buffers and the budget is an explicit
byte limit the pager obeys, so paging shows in the counters though no real device memory is saved. The
counters (PagerStats) count the pager's page transfers; read()/write() are not paging and are not counted.

device_budget: None keeps every page on the device; 0 keeps none there between uses: a page visits the
device for its own use and leaves straight after (one page in flight).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass
class PagerStats:
    """pages_in/out: host→device / device→host page copies; pages_born: pages created as zeros on the
    device (first use, nothing to copy); peak_resident_bytes: most page bytes on the device at once."""
    pages_in: int = 0
    pages_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    pages_born: int = 0
    peak_resident_bytes: int = 0

    @property
    def bytes_moved(self) -> int:
        return self.bytes_in + self.bytes_out


def check_budget(device_budget, page_size: int) -> int | None:
    """device_budget as given, or a clear error: None, 0, or an int number of bytes of at least one page."""
    if device_budget is None:
        return None
    if isinstance(device_budget, bool) or not isinstance(device_budget, int):
        raise TypeError(f"device_budget must be None, 0 or an int number of bytes, got {device_budget!r}")
    if device_budget < 0:
        raise ValueError(f"device_budget must be >= 0 bytes (or None for no limit), got {device_budget}")
    if 0 < device_budget < page_size:
        raise ValueError(f"device_budget={device_budget} bytes is smaller than one page (page_size={page_size}); "
                         f"use 0 to keep no page resident, or a budget of at least one page")
    return device_budget



def page_spans(offset: int, n: int, page_elems: int) -> list[tuple[int, slice, slice]]:
    """Where the elements [offset, offset + n) of a state laid end to end lie, page by page (pages of
    page_elems elements): (page id, the range's slice in that page, the page's slice of the range)."""
    spans = []
    for pid in range(offset // page_elems, (offset + n - 1) // page_elems + 1):
        a, b = max(pid * page_elems, offset), min((pid + 1) * page_elems, offset + n)
        spans.append((pid, slice(a - offset, b - offset), slice(a - pid * page_elems, b - pid * page_elems)))
    return spans


class Pager:
    """A page table for pages of `page_shape` and `dtype`: which pages are on the device (on_device, in LRU
    order), which wait in host memory (on_host), and the copies between the two."""

    def __init__(self, page_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str,
                 device_budget: int | None):
        if not page_shape or not all(isinstance(n, int) and n > 0 for n in page_shape):
            raise ValueError(f"page_shape must be a tuple of positive ints, got {page_shape!r}")
        self.page_shape, self.dtype = tuple(page_shape), dtype
        self.page_size = math.prod(page_shape) * dtype.itemsize  # bytes per page
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stats = PagerStats()
        if self.cuda:
            self.in_stream, self.out_stream = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
        self.clear()
        self.budget: int | None = None
        self.set_budget(device_budget)

    def clear(self) -> None:
        """Forget every page (the counters stay)."""
        if self.cuda:
            self.out_stream.synchronize()
            self.in_stream.synchronize()
        self.on_device: OrderedDict[int, torch.Tensor] = OrderedDict()  # first = least recently used
        self.on_host: dict[int, torch.Tensor] = {}  # host buffers (pinned on CUDA); valid when not on device
        self.in_use: set[int] = set()  # pages being used now: never evicted
        self.arrived: dict[int, torch.cuda.Event] = {}  # CUDA: copy-in of the page finished
        self.left: dict[int, torch.cuda.Event] = {}  # CUDA: copy-out of the page finished
        self.n_pages = 0

    # ----- budget and byte counts -----

    @property
    def capacity(self) -> int | None:
        """Pages allowed on the device at once (None: no limit)."""
        return None if self.budget is None else self.budget // self.page_size

    @property
    def capacity_bytes(self) -> int | None:
        """Bytes of whole pages the budget allows on the device (None: no limit)."""
        return None if self.budget is None else self.capacity * self.page_size

    @property
    def resident_bytes(self) -> int:
        """Bytes of pages on the device now."""
        return len(self.on_device) * self.page_size

    @property
    def host_bytes(self) -> int:
        """Bytes of host memory the pager holds: one buffer per page that has ever been evicted or written."""
        return len(self.on_host) * self.page_size

    def reset_peak(self) -> None:
        """Start peak_resident_bytes again from what is resident now."""
        self.stats.peak_resident_bytes = self.resident_bytes

    def set_budget(self, device_budget: int | None) -> None:
        """Change the budget (bytes, None = no limit) and evict least recently used pages until it holds."""
        self.budget = check_budget(device_budget, self.page_size)
        self._make_room(0)

    def _make_room(self, n: int) -> bool:
        """Evict LRU pages not in use until n more pages fit; False if that is impossible."""
        cap = self.capacity
        if cap is None:
            return True
        while len(self.on_device) + n > cap:
            victim = next((pid for pid in self.on_device if pid not in self.in_use), None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    # ----- transfers -----

    def _evict(self, pid: int) -> None:
        dev = self.on_device.pop(pid)
        host = self.on_host.get(pid)
        if host is None:
            host = self.on_host[pid] = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=self.cuda)
        if self.cuda:
            # after the work queued on this page (and its copy-in, if it was prefetched and never used)
            self.out_stream.wait_stream(torch.cuda.current_stream(self.device))
            arrived = self.arrived.pop(pid, None)
            if arrived is not None:
                self.out_stream.wait_event(arrived)
            with torch.cuda.stream(self.out_stream):
                host.copy_(dev, non_blocking=True)
                self.left[pid] = torch.cuda.Event()
                self.left[pid].record(self.out_stream)
            dev.record_stream(self.out_stream)  # its memory is reused only once the copy has finished
        else:
            host.copy_(dev)
        self.stats.pages_out += 1
        self.stats.bytes_out += self.page_size

    def _bring_in(self, pid: int) -> None:
        dev = torch.empty(self.page_shape, dtype=self.dtype, device=self.device)
        host = self.on_host.get(pid)
        if host is None:  # first use: the page starts at zero, there is nothing to copy
            dev.zero_()
            self.stats.pages_born += 1
        else:
            if self.cuda:
                self.in_stream.wait_stream(torch.cuda.current_stream(self.device))  # dev's memory is free
                left = self.left.pop(pid, None)
                if left is not None:
                    self.in_stream.wait_event(left)  # the host copy is complete
                with torch.cuda.stream(self.in_stream):
                    dev.copy_(host, non_blocking=True)
                    self.arrived[pid] = torch.cuda.Event()
                    self.arrived[pid].record(self.in_stream)
                dev.record_stream(self.in_stream)
            else:
                dev.copy_(host)
            self.stats.pages_in += 1
            self.stats.bytes_in += self.page_size
        self.on_device[pid] = dev
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.resident_bytes)

    # ----- what the user of the pages calls -----

    def grow(self, n_pages: int) -> None:
        """Make the state n_pages long (new pages are unborn: zeros, nowhere yet)."""
        self.n_pages = max(self.n_pages, n_pages)

    def prefetch(self, pids: Iterable[int]) -> None:
        """Start copying pages in (on CUDA asynchronously) while they fit without evicting pages in use."""
        for pid in pids:
            if pid in self.on_device:
                continue
            if not self._make_room(1):
                return
            self._bring_in(pid)

    def acquire(self, pids: list[int]) -> list[torch.Tensor]:
        """Make pages resident, mark them in use, and return their device tensors."""
        for pid in pids:
            if pid in self.on_device:
                self.on_device.move_to_end(pid)
            else:
                self._make_room(1)  # budget 0: nothing can stay, this page is the one page in flight
                self._bring_in(pid)
            self.in_use.add(pid)
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            for pid in pids:
                arrived = self.arrived.pop(pid, None)
                if arrived is not None:
                    stream.wait_event(arrived)
        return [self.on_device[pid] for pid in pids]

    def release(self, pids: Iterable[int], keep: Iterable[int] = ()) -> None:
        """The work is done with these pages; evict whatever the budget no longer allows, except pages in
        `keep` (the next work's, e.g. a page two parameters share) that are already here."""
        self.in_use.difference_update(pids)
        held = [pid for pid in keep if pid in self.on_device and pid not in self.in_use]
        self.in_use.update(held)
        self._make_room(0)
        self.in_use.difference_update(held)

    def read(self, pid: int) -> torch.Tensor:
        """A CPU copy of a page wherever it is (for saving; not counted as paging)."""
        if self.cuda:
            self.in_stream.synchronize()
            self.out_stream.synchronize()
        if pid in self.on_device:
            return self.on_device[pid].to("cpu", copy=True)
        host = self.on_host.get(pid)
        return torch.zeros(self.page_shape, dtype=self.dtype) if host is None else host.clone()

    def write(self, pid: int, data: torch.Tensor) -> None:
        """Set a page's contents (for loading; not counted as paging): into host memory, or straight onto the
        device when there is no budget."""
        data = data.to(self.dtype).reshape(self.page_shape)
        self.grow(pid + 1)
        if self.budget is None:
            self.on_device[pid] = data.to(self.device, copy=True)
        else:
            self.on_host[pid] = torch.empty_like(data, pin_memory=self.cuda).copy_(data)
