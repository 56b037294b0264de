"""Paged AdamW: optimizer state in fixed-size pages, at most `device_budget` bytes of them on the device.

AdamW keeps two fp32 tensors per trainable parameter, exp_avg (m) and exp_avg_sq (v): 8 bytes per element,
twice the fp32 weights themselves. QLoRA's third ingredient pages that state the way an operating system
pages memory: the state is cut into fixed-size pages, a page lives either on the compute device or in
(pinned) CPU memory, and a page is brought to the device just before the update that needs it, evicting
the least recently used page when the device budget is full.

    page k of a parameter p  =  a (2, E) fp32 tensor: row 0 = m, row 1 = v for elements [k·E, (k+1)·E) of p
    E = page_size / 8        (8 bytes of state per element)

The update itself is AdamW (Loshchilov & Hutter), element-wise, so it runs page by page:

    p ← p · (1 − lr·λ)                                  decoupled weight decay
    m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
    p ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)  bias-corrected step

in fp32, with the same operations in the same order as torch.optim.AdamW, so the results agree with it.

On CUDA, host pages are pinned (page-locked) so copies run asynchronously, all copies go through one side
stream, and while one chunk of pages is being updated the next chunk is already being copied in (an
event per page tells the compute stream when its data has arrived). On a CPU-only machine the same pager
runs with the CPU as the "device": pages are copied between two sets of CPU buffers and the budget is an
explicit byte limit the pager obeys, so paging is visible in the counters even though no real device
memory is saved. The counters (pages in, pages out, bytes moved, peak resident bytes) count page
transfers made by the pager; state_dict()/load_state_dict() copies are not paging and are not counted.

device_budget: None keeps every page on the device (nothing is paged); 0 keeps none there between
updates: each page visits the device for its own update and leaves straight after (one page in flight).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch

STATE_BYTES_PER_ELEMENT = 8  # exp_avg + exp_avg_sq, fp32 each


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


def _check_page_size(page_size) -> int:
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise TypeError(f"page_size must be an int number of bytes, got {page_size!r}")
    if page_size <= 0:
        raise ValueError(f"page_size must be > 0 bytes, got {page_size}")
    if page_size < STATE_BYTES_PER_ELEMENT:
        raise ValueError(f"page_size={page_size} bytes is smaller than one element's state "
                         f"({STATE_BYTES_PER_ELEMENT} bytes: exp_avg + exp_avg_sq in fp32)")
    if page_size % STATE_BYTES_PER_ELEMENT:
        raise ValueError(f"page_size must be a multiple of {STATE_BYTES_PER_ELEMENT} bytes (one element's "
                         f"exp_avg + exp_avg_sq), got {page_size}")
    return page_size


def _check_budget(device_budget, page_size: int) -> int | None:
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


class Pager:
    """A page table for fixed-size fp32 pages: which pages are on the device (in LRU order), which wait in
    host memory, and the copies between the two. Pages never touched yet are 'unborn' (all zeros)."""

    def __init__(self, page_size: int, device: torch.device | str, device_budget: int | None):
        self.page_size = _check_page_size(page_size)
        self.page_elems = page_size // STATE_BYTES_PER_ELEMENT  # E
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.on_device: OrderedDict[int, torch.Tensor] = OrderedDict()  # first = least recently used
        self.on_host: dict[int, torch.Tensor] = {}  # host buffers (pinned on CUDA), valid when not on device
        self.in_use: set[int] = set()  # pages an update is using now: never evicted
        self.ready: dict[int, torch.cuda.Event] = {}  # CUDA: page copy-in finished
        self.n_pages = 0
        self.stats = PagerStats()
        self.budget: int | None = None
        self.set_budget(_check_budget(device_budget, page_size))

    # ----- budget and residency -----

    @property
    def capacity(self) -> int | None:
        """Pages allowed on the device at once (None: no limit)."""
        return None if self.budget is None else self.budget // self.page_size

    @property
    def resident_bytes(self) -> int:
        return len(self.on_device) * self.page_size

    def reset_peak(self) -> None:
        """Start peak_resident_bytes again from what is resident now."""
        self.stats.peak_resident_bytes = self.resident_bytes

    def set_budget(self, device_budget: int | None) -> None:
        """Change the budget (bytes, None = no limit) and evict least recently used pages until it holds."""
        if device_budget is not None and device_budget < 0:
            raise ValueError(f"device_budget must be >= 0 or None, got {device_budget}")
        self.budget = device_budget
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
        self.ready.pop(pid, None)
        host = self.on_host.get(pid)
        if host is None:
            host = self.on_host[pid] = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=self.cuda)
        if self.cuda:  # wait for the updates already queued on this page, then copy out on the side stream
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                host.copy_(dev, non_blocking=True)
            dev.record_stream(self.copy_stream)  # its device memory is reused only after the copy finished
        else:
            host.copy_(dev)
        self.stats.pages_out += 1
        self.stats.bytes_out += self.page_size

    def _bring_in(self, pid: int) -> None:
        dev = torch.empty((2, self.page_elems), dtype=torch.float32, device=self.device)
        host = self.on_host.get(pid)
        if host is None:  # first use: the state starts at zero, there is nothing to copy
            dev.zero_()
            self.stats.pages_born += 1
        elif self.cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                dev.copy_(host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            dev.record_stream(self.copy_stream)
            self.ready[pid] = event
        else:
            dev.copy_(host)
        if host is not None:
            self.stats.pages_in += 1
            self.stats.bytes_in += self.page_size
        self.on_device[pid] = dev
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.resident_bytes)

    # ----- what the optimizer calls -----

    def new_pages(self, n: int) -> list[int]:
        ids = list(range(self.n_pages, self.n_pages + n))
        self.n_pages += n
        return ids

    def prefetch(self, pids: Iterable[int]) -> None:
        """Start copying pages in (on CUDA asynchronously) if they fit without evicting pages in use."""
        for pid in pids:
            if pid in self.on_device:
                continue
            if not self._make_room(1):
                return
            self._bring_in(pid)

    def acquire(self, pids: list[int]) -> list[torch.Tensor]:
        """Make pages resident, mark them in use, and return their (2, E) device tensors."""
        for pid in pids:
            if pid in self.on_device:
                self.on_device.move_to_end(pid)
            else:
                self._make_room(1)  # budget 0: nothing can stay, the page is the one page in flight
                self._bring_in(pid)
            self.in_use.add(pid)
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            for pid in pids:
                event = self.ready.pop(pid, None)
                if event is not None:
                    stream.wait_event(event)
        return [self.on_device[pid] for pid in pids]

    def release(self, pids: list[int]) -> None:
        """The update is done with these pages; evict whatever the budget no longer allows."""
        self.in_use.difference_update(pids)
        self._make_room(0)

    def read(self, pid: int) -> torch.Tensor:
        """A CPU copy of a page wherever it is (for state_dict; not counted as paging)."""
        if pid in self.on_device:
            event = self.ready.pop(pid, None)
            if event is not None:
                event.synchronize()
            return self.on_device[pid].to("cpu", copy=True)
        if self.cuda:
            self.copy_stream.synchronize()
        host = self.on_host.get(pid)
        return torch.zeros(2, self.page_elems) if host is None else host.clone()

    def write(self, pid: int, data: torch.Tensor) -> None:
        """Set a page's contents (for load_state_dict; not counted as paging). Goes to the host unless
        there is no budget, in which case it goes straight to the device."""
        data = data.to(torch.float32).reshape(2, self.page_elems)
        self.free([pid])
        if self.budget is None:
            self.on_device[pid] = data.to(self.device, copy=True)
        else:
            self.on_host[pid] = torch.empty_like(data, pin_memory=self.cuda).copy_(data)

    def free(self, pids: Iterable[int]) -> None:
        if self.cuda:
            self.copy_stream.synchronize()
        for pid in pids:
            self.on_device.pop(pid, None)
            self.on_host.pop(pid, None)
            self.ready.pop(pid, None)
            self.in_use.discard(pid)


def adamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                  step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step on matching slices, in place, in fp32 (the operation order of torch.optim.AdamW):
    p ← p(1 − lr·λ); m ← lerp(m, g, 1 − β1); v ← β2 v + (1 − β2) g²;
    p ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)."""
    p = param if param.dtype == torch.float32 else param.float()
    g = grad.float()
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-step_size)
    if p is not param:
        param.copy_(p)


class PagedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW with its state (exp_avg, exp_avg_sq) in fixed-size pages under a device budget.

    page_size: bytes per page (a multiple of 8: one element's m and v). device_budget: bytes of pages that
    may stay on the device (None: all of them, nothing paged; 0: none between updates).
    state_dict() has torch.optim.AdamW's layout (step, exp_avg, exp_avg_sq per parameter, on the CPU), so
    states move between the two optimizers.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, page_size: int = 2**20, device_budget: int | None = None):
        if not 0.0 <= lr:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        page_size = _check_page_size(page_size)
        device_budget = _check_budget(device_budget, page_size)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(f"params must all be on one device for one pager, got {sorted(map(str, devices))}")
        device = devices.pop() if devices else torch.device("cpu")
        self.pager = Pager(page_size, device, device_budget)

    # ----- sizes and counters -----

    def _pages_for(self, p: torch.Tensor) -> int:
        return math.ceil(p.numel() / self.pager.page_elems)

    def state_nbytes(self) -> int:
        """Bytes of pages the full state occupies (all trainable parameters, page-rounded)."""
        return sum(self._pages_for(p) for g in self.param_groups for p in g["params"]
                   if p.requires_grad) * self.pager.page_size

    @property
    def stats(self) -> PagerStats:
        return self.pager.stats

    def set_device_budget(self, device_budget: int | None) -> None:
        """Change the budget between (or during) steps; pages over it are evicted at once (LRU first)."""
        self.pager.set_budget(device_budget)

    # ----- the step -----

    def _units(self):
        """(param, group, page ids, first page index) work units, in update order, chunked to the budget."""
        cap = self.pager.capacity
        chunk = None if cap is None else max(1, cap // 2)  # half the budget: room to prefetch the next chunk
        units = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                state = self.state[p]
                if "pages" not in state:
                    state["step"] = torch.tensor(0.0)
                    state["pages"] = self.pager.new_pages(self._pages_for(p))
                pages = state["pages"]
                size = len(pages) if chunk is None else chunk
                for k in range(0, len(pages), size):
                    units.append((p, group, pages[k:k + size], k))
        return units

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step for every parameter with a gradient, page chunk by page chunk."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        units = self._units()
        for p in {id(u[0]): u[0] for u in units}.values():
            self.state[p]["step"] += 1
        E = self.pager.page_elems
        for i, (p, group, pids, first) in enumerate(units):
            pages = self.pager.acquire(pids)
            if i + 1 < len(units):
                self.pager.prefetch(units[i + 1][2])  # overlaps with this chunk's update on CUDA
            flat_p = p.view(-1) if p.is_contiguous() else p.detach().reshape(-1).clone()
            flat_g = p.grad.reshape(-1)
            beta1, beta2 = group["betas"]
            t = self.state[p]["step"].item()
            for k, page in enumerate(pages):
                a = (first + k) * E
                b = min(a + E, flat_p.numel())
                adamw_update_(flat_p[a:b], flat_g[a:b], page[0, :b - a], page[1, :b - a], t,
                              group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            if not p.is_contiguous():
                p.copy_(flat_p.view_as(p))
            self.pager.release(pids)
        return loss

    # ----- checkpointing the optimizer -----

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """torch.optim.AdamW's layout: state[i] = {step, exp_avg, exp_avg_sq} with full-shape CPU tensors."""
        sd = super().state_dict()
        state = {}
        for i, p in enumerate(self._params()):
            st = self.state.get(p)
            if not st or "pages" not in st:
                continue
            pages = torch.stack([self.pager.read(pid) for pid in st["pages"]], dim=1)  # (2, n_pages, E)
            m, v = pages.reshape(2, -1)[:, :p.numel()]
            state[i] = dict(step=st["step"].clone(), exp_avg=m.reshape(p.shape).clone(),
                            exp_avg_sq=v.reshape(p.shape).clone())
        sd["state"] = state
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a PagedAdamW or torch.optim.AdamW state dict; the moments are written into pages in fp32."""
        state_dict = dict(state_dict)
        for g in state_dict.get("param_groups", []):
            for flag in ("amsgrad", "maximize"):
                if g.get(flag):
                    raise ValueError(f"state_dict: a param group has {flag}=True, which PagedAdamW does not do")
        saved = state_dict.pop("state")
        state_dict["state"] = {}
        for st in self.state.values():  # pages of the state being replaced
            self.pager.free(st.get("pages", []))
        super().load_state_dict(state_dict)  # checks and loads the param groups (lr, betas, ...)
        params = self._params()
        E = self.pager.page_elems
        for key, st in saved.items():
            p = params[int(key)]
            missing = {"step", "exp_avg", "exp_avg_sq"} - set(st)
            if missing:
                raise ValueError(f"state_dict: state {key} lacks {sorted(missing)}")
            n = self._pages_for(p)
            if st["exp_avg"].numel() != p.numel() or st["exp_avg_sq"].numel() != p.numel():
                raise ValueError(f"state_dict: state {key} has {st['exp_avg'].numel()} elements, "
                                 f"parameter has {p.numel()}")
            flat = torch.zeros(2, n * E)
            flat[0, :p.numel()] = st["exp_avg"].detach().reshape(-1).float().cpu()
            flat[1, :p.numel()] = st["exp_avg_sq"].detach().reshape(-1).float().cpu()
            pages = self.pager.new_pages(n)
            for k, pid in enumerate(pages):
                self.pager.write(pid, flat[:, k * E:(k + 1) * E])
            step = st["step"]
            self.state[p] = dict(step=torch.tensor(float(step.item() if torch.is_tensor(step) else step)),
                                 pages=pages)
