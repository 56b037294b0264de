"""Paged AdamW: torch.optim.AdamW with its state in pages that a device budget can send to host memory.

AdamW's update (adamw.py) is element-wise, so it runs just as well on one piece of the state at a time.
QLoRA's third ingredient uses that: the state is paged like virtual memory (pager.py: LRU eviction under a
device budget, async copies on CUDA), and each update brings in only the pages it needs. The state of all
parameters is one long array of elements, parameter after parameter (p gets the elements
[offset_p, offset_p + numel_p)), cut into pages of E elements:

    page k  =  a (2, E) fp32 tensor: row 0 = m, row 1 = v for state elements [k·E, (k+1)·E)
    E = page_size / 8        (8 bytes of state per element)

so small tensors (LoRA adapters) share pages instead of each wasting most of one. The update runs in fp32
with the operations of torch.optim.AdamW in its order, so the results agree with it. PagedAdamW8bit
(paged8bit.py) keeps the same pages in 8 bits: it changes only what a page holds (the hooks marked below).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from ..quant.format import ceil_div
from .adamw import STATE_BYTES, AdamWBase, adamw_update_, check_dense
from .state_checks import check_groups, check_state
from .pager import Pager, PagerStats, check_budget, page_spans

__all__ = ["PagedAdamW"]


class PagedAdamW(AdamWBase):
    """torch.optim.AdamW with its state (exp_avg, exp_avg_sq) in fixed-size pages under a device budget.

    page_size: bytes per page (a multiple of 8: one element's m and v). device_budget: bytes of pages that
    may stay on the device (None: all of them, nothing paged; 0: none between updates). prefetch: copy the
    next chunk's pages in while the current chunk is updated (turn it off to see what the overlap buys).
    state_dict() has torch.optim.AdamW's layout (step, exp_avg, exp_avg_sq per parameter, on the CPU), so a
    state moves between the two optimizers.
    """
    align = 1  # a parameter's state starts at a multiple of this many elements

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, page_size: int = 2**21, device_budget: int | None = None,
                 prefetch: bool = True):
        super().__init__(params, lr, betas, eps, weight_decay)
        self.page_elems, page_shape, dtype = self._page_layout(page_size)  # E
        check_budget(device_budget, page_size)
        devices = {p.device for p in self._params()}
        if len(devices) > 1:
            raise ValueError(f"params must all be on one device for one pager, got {sorted(map(str, devices))}")
        self.pager = Pager(page_shape, dtype, devices.pop() if devices else "cpu", device_budget)
        self.prefetch = prefetch
        self.n_elements = 0  # length of the state laid out so far, in elements

    # ----- what a page holds (PagedAdamW8bit overrides these) -----

    def _page_layout(self, page_size) -> tuple[int, tuple[int, ...], torch.dtype]:
        """(elements per page E, page shape, page dtype): here a (2, E) fp32 page, E = page_size / 8."""
        if isinstance(page_size, bool) or not isinstance(page_size, int):
            raise TypeError(f"page_size must be an int number of bytes, got {page_size!r}")
        if page_size < STATE_BYTES:
            raise ValueError(f"page_size={page_size} bytes is smaller than one element's state "
                             f"({STATE_BYTES} bytes: exp_avg + exp_avg_sq in fp32)")
        if page_size % STATE_BYTES:
            raise ValueError(f"page_size must be a multiple of {STATE_BYTES} bytes, got {page_size}")
        E = page_size // STATE_BYTES
        return E, (2, E), torch.float32

    def _paged(self, p: torch.Tensor) -> bool:
        """Whether p's state lives in the pages (here always; PagedAdamW8bit keeps small tensors apart)."""
        return True

    def _update(self, p: torch.Tensor, group: dict, flat_p: torch.Tensor, spans: list[tuple]) -> None:
        """AdamW on p's slices and their m, v rows in the resident pages."""
        flat_g = p.grad.reshape(-1)
        adamw_update_([flat_p[s] for s, _, _ in spans], [flat_g[s] for s, _, _ in spans],
                      [page[0, q] for _, q, page in spans], [page[1, q] for _, q, page in spans],
                      self.state[p]["step"].item(), group["lr"], *group["betas"], group["eps"],
                      group["weight_decay"])

    def _read(self, p: torch.Tensor) -> dict:
        """p's saved state in torch.optim.AdamW's layout (full-shape CPU tensors), read from the pages."""
        mv = torch.cat([torch.zeros(2, 0), *(self.pager.read(pid)[:, q] for pid, _, q in self._spans(p))], dim=1)
        return dict(step=self.state[p]["step"].clone(), exp_avg=mv[0].reshape(p.shape).clone(),
                    exp_avg_sq=mv[1].reshape(p.shape).clone())

    def _checked(self, state_dict: dict) -> dict[int, dict]:
        """The saved state of each parameter (by index), checked against the parameters."""
        for g in state_dict.get("param_groups", []):
            for flag in ("amsgrad", "maximize"):
                if g.get(flag):
                    raise ValueError(f"state_dict: a param group has {flag}=True, which PagedAdamW does not do")
        check_groups(type(self).__name__, state_dict)
        params, saved = self._params(), {}
        for key, st in state_dict["state"].items():
            check_state(type(self).__name__, key, st, params[int(key)])
            saved[int(key)] = st
        return saved

    def _restore(self, p: torch.Tensor, saved: dict, pages: dict[int, torch.Tensor]) -> None:
        """Lay p's saved state out at the end of the state so far, into the new pages."""
        self._place(p)["step"] = torch.tensor(float(saved["step"]))
        mv = torch.stack([saved["exp_avg"].detach().reshape(-1).float().cpu(),
                          saved["exp_avg_sq"].detach().reshape(-1).float().cpu()])
        for pid, s, q in self._spans(p):
            self._new_page(pages, pid)[:, q] = mv[:, s]

    # ----- sizes and counters -----

    def state_nbytes(self) -> int:
        """Bytes of pages the full state occupies: all trainable parameters laid end to end, page-rounded."""
        n = sum(p.numel() for p in self._params() if p.requires_grad)
        return ceil_div(n, self.page_elems) * self.pager.page_size

    @property
    def stats(self) -> PagerStats:
        return self.pager.stats

    def set_device_budget(self, device_budget: int | None) -> None:
        """Change the budget between (or during) steps; pages over it are evicted at once (LRU first)."""
        self.pager.set_budget(device_budget)  # checked there

    # ----- the step -----

    def _place(self, p: torch.Tensor) -> dict:
        """Give p its range of state elements at the end of the state laid out so far (from a multiple of align)."""
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        state["offset"] = ceil_div(self.n_elements, self.align) * self.align
        self.n_elements = state["offset"] + p.numel()
        self.pager.grow(ceil_div(self.n_elements, self.page_elems))
        return state

    def _spans(self, p: torch.Tensor) -> list[tuple[int, slice, slice]]:
        """(page id, slice of p's flat elements, slice of the page's elements) for each page p's state spans."""
        return page_spans(self.state[p]["offset"], p.numel(), self.page_elems)

    def _units(self) -> list[tuple]:
        """Work units (param, group, page ids), in update order, with at most half the budget's pages each
        so the next unit can be prefetched beside the current one."""
        cap = self.pager.capacity
        chunk = None if cap is None else max(1, cap // 2)
        units = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0 or not self._paged(p):
                    continue
                if "offset" not in self.state.get(p, {}):
                    self._place(p)
                pages = [pid for pid, _, _ in self._spans(p)]
                size = chunk or len(pages)
                units += [(p, group, pages[k:k + size]) for k in range(0, len(pages), size)]
        return units

    def _resident(self, units: list[tuple]) -> Iterator[tuple]:
        """For each work unit in turn, with its pages on the device (and the next unit's being prefetched):
        yield (p, group, flat_p, spans), spans = [(slice of flat_p, slice of the page's elements, page)] for
        each page of the unit. Once the caller is done with a unit, flat_p is written back into a
        non-contiguous p and the pages are released to the budget."""
        for i, (p, group, pids) in enumerate(units):
            pages = dict(zip(pids, self.pager.acquire(pids)))
            following = units[i + 1][2] if i + 1 < len(units) else ()
            if self.prefetch:
                self.pager.prefetch(following)  # on CUDA this copy overlaps the caller's update
            flat_p = p.view(-1) if p.is_contiguous() else p.reshape(-1).clone()
            yield p, group, flat_p, [(s, q, pages[pid]) for pid, s, q in self._spans(p) if pid in pages]
            if not p.is_contiguous():
                p.copy_(flat_p.view_as(p))
            self.pager.release(pids, keep=following)

    def _step_unpaged(self) -> None:
        """The parameters whose state is kept outside the pages (here none)."""

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step for every parameter with a gradient, chunk of pages by chunk of pages."""
        with torch.enable_grad():
            loss = None if closure is None else closure()
        check_dense(self)  # before any parameter moves
        self._step_unpaged()
        units = self._units()
        for p in {id(u[0]): u[0] for u in units}.values():
            self.state[p]["step"] += 1
        for p, group, flat_p, spans in self._resident(units):
            self._update(p, group, flat_p, spans)
        return loss

    # ----- saving and resuming -----

    def state_dict(self) -> dict:
        """state[i] for each parameter with state, in the layout of _read (PagedAdamW: torch.optim.AdamW's)."""
        sd = super().state_dict()
        sd["state"] = {i: self._read(p) for i, p in enumerate(self._params()) if self.state.get(p)}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of this layout (PagedAdamW: also torch.optim.AdamW's); the state is laid out anew."""
        saved = self._checked(state_dict)
        super().load_state_dict({**state_dict, "state": {}})  # checks and loads the param groups (lr, betas, ...)
        self.pager.clear()
        self.state.clear()
        self.n_elements = 0
        pages: dict[int, torch.Tensor] = {}
        for i, p in enumerate(self._params()):
            if i in saved:
                self._restore(p, saved[i], pages)
        for pid in range(self.pager.n_pages):
            self.pager.write(pid, self._new_page(pages, pid))

    def _new_page(self, pages: dict[int, torch.Tensor], pid: int) -> torch.Tensor:
        return pages.setdefault(pid, torch.zeros(self.pager.page_shape, dtype=self.pager.dtype))
