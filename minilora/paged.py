"""Paged AdamW: optimizer state in fixed-size pages, at most `device_budget` bytes of them on the device.

AdamW keeps two fp32 tensors per trainable parameter, exp_avg (m) and exp_avg_sq (v): 8 bytes per element,
twice the fp32 weights themselves. QLoRA's third ingredient pages that state the way an operating system
pages memory: the state is cut into fixed-size pages, a page lives either on the compute device or in
(pinned) CPU memory, and a page is brought to the device just before the update that needs it, evicting
the least recently used page when the device budget is full.

Layout, as in virtual memory: the state of all parameters is one long array of elements, parameter after
parameter (p gets the elements [offset_p, offset_p + numel_p)), cut into pages of E elements:

    page k  =  a (2, E) fp32 tensor: row 0 = m, row 1 = v for state elements [k·E, (k+1)·E)
    E = page_size / 8        (8 bytes of state per element)

so small tensors (LoRA adapters) share pages instead of each wasting most of one. The update is AdamW
(Loshchilov & Hutter), element-wise, so it runs page by page:

    p ← p · (1 − lr·λ)                                  decoupled weight decay
    m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
    p ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)  bias-corrected step

in fp32, with the operations of torch.optim.AdamW in its order, so the results agree with it.

On CUDA, host pages are pinned (page-locked) so copies run asynchronously on two side streams, one per
direction (PCIe moves both ways at once); while one chunk of pages is being updated the next chunk is
already being copied in, and per-page events tell each stream when it may touch a page. On a CPU-only
machine the same pager runs with the CPU as the "device": pages are copied between two sets of CPU buffers
and the budget is an explicit byte limit the pager obeys, so paging is visible in the counters even though
no real device memory is saved. The counters (pages in, pages out, bytes moved, peak resident bytes) count
the pager's page transfers; state_dict()/load_state_dict() copies are not paging and are not counted.

device_budget: None keeps every page on the device (nothing is paged); 0 keeps none there between
updates: each page visits the device for its own update and leaves straight after (one page in flight).
"""
from __future__ import annotations

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
    """A page table for fixed-size (2, E) fp32 pages: which pages are on the device (in LRU order), which
    wait in host memory, and the copies between the two. Pages never touched yet are 'unborn' (zeros)."""

    def __init__(self, page_size: int, device: torch.device | str, device_budget: int | None):
        self.page_size = _check_page_size(page_size)
        self.page_elems = page_size // STATE_BYTES_PER_ELEMENT  # E
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stats = PagerStats()
        if self.cuda:
            self.in_stream, self.out_stream = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
        self.clear()
        self.budget: int | None = None
        self.set_budget(_check_budget(device_budget, page_size))

    def clear(self) -> None:
        """Forget every page (the counters stay)."""
        if self.cuda:
            self.out_stream.synchronize()
            self.in_stream.synchronize()
        self.on_device: OrderedDict[int, torch.Tensor] = OrderedDict()  # first = least recently used
        self.on_host: dict[int, torch.Tensor] = {}  # host buffers (pinned on CUDA); valid when not on device
        self.in_use: set[int] = set()  # pages an update is using now: never evicted
        self.arrived: dict[int, torch.cuda.Event] = {}  # CUDA: copy-in of the page finished
        self.left: dict[int, torch.cuda.Event] = {}  # CUDA: copy-out of the page finished
        self.n_pages = 0

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
        host = self.on_host.get(pid)
        if host is None:
            host = self.on_host[pid] = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=self.cuda)
        if self.cuda:
            # after the updates queued on this page (and its copy-in, if it was prefetched and never used)
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
        dev = torch.empty((2, self.page_elems), dtype=torch.float32, device=self.device)
        host = self.on_host.get(pid)
        if host is None:  # first use: the state starts at zero, there is nothing to copy
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

    # ----- what the optimizer calls -----

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
        """Make pages resident, mark them in use, and return their (2, E) device tensors."""
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
        """The update is done with these pages; evict whatever the budget no longer allows, except pages
        in `keep` (the next update's, e.g. a page two parameters share) that are already here."""
        self.in_use.difference_update(pids)
        held = [pid for pid in keep if pid in self.on_device and pid not in self.in_use]
        self.in_use.update(held)
        self._make_room(0)
        self.in_use.difference_update(held)

    def read(self, pid: int) -> torch.Tensor:
        """A CPU copy of a page wherever it is (for state_dict; not counted as paging)."""
        if self.cuda:
            self.in_stream.synchronize()
            self.out_stream.synchronize()
        if pid in self.on_device:
            return self.on_device[pid].to("cpu", copy=True)
        host = self.on_host.get(pid)
        return torch.zeros(2, self.page_elems) if host is None else host.clone()

    def write(self, pid: int, data: torch.Tensor) -> None:
        """Set a page's contents (for load_state_dict; not counted as paging): into host memory, or straight
        onto the device when there is no budget."""
        data = data.to(torch.float32).reshape(2, self.page_elems)
        self.grow(pid + 1)
        if self.budget is None:
            self.on_device[pid] = data.to(self.device, copy=True)
        else:
            self.on_host[pid] = torch.empty_like(data, pin_memory=self.cuda).copy_(data)


def adamw_update_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                  exp_avg_sqs: list[torch.Tensor], step: float, lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float) -> None:
    """One AdamW step, in place, on lists of matching slices (one per page a parameter spans), in fp32,
    with the operations of torch.optim.AdamW in its order:
    p ← p(1 − lr·λ); m ← lerp(m, g, 1 − β1); v ← β2 v + (1 − β2) g²;
    p ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε).
    torch._foreach_* apply one operation to every slice of a list in one call (one fused launch on CUDA)."""
    low = any(p.dtype != torch.float32 for p in params)
    ps = [p.float() for p in params] if low else params
    gs = [g.float() for g in grads]
    if weight_decay != 0:
        torch._foreach_mul_(ps, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, gs, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, gs, gs, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, (1 - beta2 ** step) ** 0.5)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(ps, exp_avgs, denom, value=-step_size)
    if low:
        torch._foreach_copy_(params, ps)


class PagedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW with its state (exp_avg, exp_avg_sq) in fixed-size pages under a device budget.

    page_size: bytes per page (a multiple of 8: one element's m and v). device_budget: bytes of pages that
    may stay on the device (None: all of them, nothing paged; 0: none between updates). prefetch: copy the
    next chunk's pages in while the current chunk is updated (turn it off to see what the overlap buys).
    state_dict() has torch.optim.AdamW's layout (step, exp_avg, exp_avg_sq per parameter, on the CPU), so a
    state moves between the two optimizers.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, page_size: int = 2**21, device_budget: int | None = None,
                 prefetch: bool = True):
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
        self.pager = Pager(page_size, devices.pop() if devices else "cpu", device_budget)
        self.prefetch = prefetch
        self.n_elements = 0  # length of the state laid out so far, in elements

    # ----- sizes and counters -----

    def state_nbytes(self) -> int:
        """Bytes of pages the full state occupies: all trainable parameters laid end to end, page-rounded."""
        n = sum(p.numel() for g in self.param_groups for p in g["params"] if p.requires_grad)
        return -(-n // self.pager.page_elems) * self.pager.page_size

    @property
    def stats(self) -> PagerStats:
        return self.pager.stats

    def set_device_budget(self, device_budget: int | None) -> None:
        """Change the budget between (or during) steps; pages over it are evicted at once (LRU first)."""
        self.pager.set_budget(device_budget)

    # ----- the step -----

    def _place(self, p: torch.Tensor) -> dict:
        """Give p its range of state elements at the end of the state laid out so far."""
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        state["offset"] = self.n_elements
        self.n_elements += p.numel()
        self.pager.grow(-(-self.n_elements // self.pager.page_elems))
        return state

    def _units(self) -> list[tuple]:
        """Work units (param, group, page ids), in update order, with at most half the budget's pages each
        so the next unit can be prefetched beside the current one."""
        cap = self.pager.capacity
        chunk = None if cap is None else max(1, cap // 2)
        E = self.pager.page_elems
        units = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                state = self.state[p] if "offset" in self.state.get(p, {}) else self._place(p)
                off = state["offset"]
                pages = list(range(off // E, (off + p.numel() - 1) // E + 1))
                size = chunk or len(pages)
                units += [(p, group, pages[k:k + size]) for k in range(0, len(pages), size)]
        return units

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step for every parameter with a gradient, chunk of pages by chunk of pages."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        units = self._units()
        for p in {id(u[0]): u[0] for u in units}.values():
            self.state[p]["step"] += 1
        E = self.pager.page_elems
        for i, (p, group, pids) in enumerate(units):
            pages = self.pager.acquire(pids)
            if self.prefetch and i + 1 < len(units):
                self.pager.prefetch(units[i + 1][2])  # on CUDA this copy overlaps the update below
            off, n = self.state[p]["offset"], p.numel()
            flat_p = p.view(-1) if p.is_contiguous() else p.reshape(-1).clone()
            flat_g = p.grad.reshape(-1)
            spans = []  # (slice of p, slice of the page) for each page: [a, b) in state elements
            for pid, page in zip(pids, pages):
                a, b = max(pid * E, off), min((pid + 1) * E, off + n)
                spans.append((slice(a - off, b - off), slice(a - pid * E, b - pid * E), page))
            beta1, beta2 = group["betas"]
            adamw_update_([flat_p[s] for s, _, _ in spans], [flat_g[s] for s, _, _ in spans],
                          [pg[0, q] for _, q, pg in spans], [pg[1, q] for _, q, pg in spans],
                          self.state[p]["step"].item(), group["lr"], beta1, beta2, group["eps"],
                          group["weight_decay"])
            if not p.is_contiguous():
                p.copy_(flat_p.view_as(p))
            self.pager.release(pids, keep=units[i + 1][2] if i + 1 < len(units) else ())
        return loss

    # ----- saving and resuming -----

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _flat_state(self) -> torch.Tensor:
        """(2, n_pages · E) CPU copy of the whole state: row 0 = m, row 1 = v."""
        pages = [self.pager.read(pid) for pid in range(self.pager.n_pages)]
        return torch.cat(pages, dim=1) if pages else torch.zeros(2, 0)

    def state_dict(self) -> dict:
        """torch.optim.AdamW's layout: state[i] = {step, exp_avg, exp_avg_sq} with full-shape CPU tensors."""
        sd = super().state_dict()
        flat = self._flat_state()
        state = {}
        for i, p in enumerate(self._params()):
            st = self.state.get(p, {})
            if "offset" in st:
                m, v = flat[:, st["offset"]:st["offset"] + p.numel()]
                state[i] = dict(step=st["step"].clone(), exp_avg=m.reshape(p.shape).clone(),
                                exp_avg_sq=v.reshape(p.shape).clone())
        sd["state"] = state
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a PagedAdamW or torch.optim.AdamW state dict; the moments are laid out anew, in fp32 pages."""
        state_dict = dict(state_dict)
        for g in state_dict.get("param_groups", []):
            for flag in ("amsgrad", "maximize"):
                if g.get(flag):
                    raise ValueError(f"state_dict: a param group has {flag}=True, which PagedAdamW does not do")
        saved = state_dict.pop("state")
        state_dict["state"] = {}
        super().load_state_dict(state_dict)  # checks and loads the param groups (lr, betas, ...)
        params = self._params()
        self.pager.clear()
        self.n_elements = 0
        chunks = []
        for key in sorted(saved, key=int):
            st, p = saved[key], params[int(key)]
            missing = {"step", "exp_avg", "exp_avg_sq"} - set(st)
            if missing:
                raise ValueError(f"state_dict: state {key} lacks {sorted(missing)}")
            for name in ("exp_avg", "exp_avg_sq"):
                if st[name].numel() != p.numel():
                    raise ValueError(f"state_dict: state {key} {name} has {st[name].numel()} elements, "
                                     f"parameter {key} has {p.numel()}")
            self._place(p)["step"] = torch.tensor(float(st["step"]))
            chunks.append(torch.stack([st["exp_avg"].detach().reshape(-1).float().cpu(),
                                       st["exp_avg_sq"].detach().reshape(-1).float().cpu()]))
        E = self.pager.page_elems
        flat = torch.zeros(2, self.pager.n_pages * E)
        if chunks:
            flat[:, :self.n_elements] = torch.cat(chunks, dim=1)
        for pid in range(self.pager.n_pages):
            self.pager.write(pid, flat[:, pid * E:(pid + 1) * E])
