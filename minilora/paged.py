"""Paged AdamW: torch.optim.AdamW with its state in pages that a device budget can send to host memory.

AdamW (Loshchilov & Hutter) keeps two fp32 tensors per trainable parameter, exp_avg (m) and exp_avg_sq (v):
8 bytes per element, twice the fp32 weights themselves. Its update is element-wise:

    p ← p · (1 − lr·λ)                                  decoupled weight decay
    m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
    p ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)  bias-corrected step

so it runs just as well on one piece of the state at a time. QLoRA's third ingredient uses that: the state
is paged like virtual memory (minilora.pager: LRU eviction under a device budget, async copies on CUDA),
and each update brings in only the pages it needs. The state of all parameters is one long array of
elements, parameter after parameter (p gets the elements [offset_p, offset_p + numel_p)), cut into pages
of E elements:

    page k  =  a (2, E) fp32 tensor: row 0 = m, row 1 = v for state elements [k·E, (k+1)·E)
    E = page_size / 8        (8 bytes of state per element)

so small tensors (LoRA adapters) share pages instead of each wasting most of one. The update runs in fp32
with the operations of torch.optim.AdamW in its order, so the results agree with it.
"""
from __future__ import annotations

import math

from collections.abc import Iterator

import torch

from .pager import Pager, PagerStats, check_budget

__all__ = ["PagedAdamW", "PagerStats", "adamw_update_"]

STATE_BYTES_PER_ELEMENT = 8  # exp_avg + exp_avg_sq, fp32 each


def check_adamw_args(lr, betas, eps, weight_decay) -> None:
    """The hyper-parameters every AdamW here accepts, each checked by name."""
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")


def _check_page_size(page_size) -> int:
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise TypeError(f"page_size must be an int number of bytes, got {page_size!r}")
    if page_size < STATE_BYTES_PER_ELEMENT:
        raise ValueError(f"page_size={page_size} bytes is smaller than one element's state "
                         f"({STATE_BYTES_PER_ELEMENT} bytes: exp_avg + exp_avg_sq in fp32)")
    if page_size % STATE_BYTES_PER_ELEMENT:
        raise ValueError(f"page_size must be a multiple of {STATE_BYTES_PER_ELEMENT} bytes, got {page_size}")
    return page_size


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
        check_adamw_args(lr, betas, eps, weight_decay)
        page_size = _check_page_size(page_size)
        check_budget(device_budget, page_size)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(f"params must all be on one device for one pager, got {sorted(map(str, devices))}")
        self.page_elems = page_size // STATE_BYTES_PER_ELEMENT  # E
        self.pager = Pager((2, self.page_elems), torch.float32, devices.pop() if devices else "cpu", device_budget)
        self.prefetch = prefetch
        self.n_elements = 0  # length of the state laid out so far, in elements

    # ----- sizes and counters -----

    def state_nbytes(self) -> int:
        """Bytes of pages the full state occupies: all trainable parameters laid end to end, page-rounded."""
        n = sum(p.numel() for g in self.param_groups for p in g["params"] if p.requires_grad)
        return -(-n // self.page_elems) * self.pager.page_size

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
        self.pager.grow(-(-self.n_elements // self.page_elems))
        return state

    def _paged(self, p: torch.Tensor) -> bool:
        """Whether p's state lives in the pages (here always; PagedAdamW8bit keeps small tensors apart)."""
        return True

    def _units(self) -> list[tuple]:
        """Work units (param, group, page ids), in update order, with at most half the budget's pages each
        so the next unit can be prefetched beside the current one."""
        cap = self.pager.capacity
        chunk = None if cap is None else max(1, cap // 2)
        E = self.page_elems
        units = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0 or not self._paged(p):
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                state = self.state[p] if "offset" in self.state.get(p, {}) else self._place(p)
                off = state["offset"]
                pages = list(range(off // E, (off + p.numel() - 1) // E + 1))
                size = chunk or len(pages)
                units += [(p, group, pages[k:k + size]) for k in range(0, len(pages), size)]
        return units

    def _resident(self, units: list[tuple]) -> Iterator[tuple]:
        """For each work unit in turn, with its pages on the device (and the next unit's being prefetched):
        yield (p, group, flat_p, spans), spans = [(slice of flat_p, slice of the page's elements, page)] for
        each page p spans. Once the caller is done with a unit, flat_p is written back into a non-contiguous
        p and the pages are released to the budget."""
        E = self.page_elems
        for i, (p, group, pids) in enumerate(units):
            pages = self.pager.acquire(pids)
            following = units[i + 1][2] if i + 1 < len(units) else ()
            if self.prefetch:
                self.pager.prefetch(following)  # on CUDA this copy overlaps the caller's update
            off, n = self.state[p]["offset"], p.numel()
            flat_p = p.view(-1) if p.is_contiguous() else p.reshape(-1).clone()
            spans = []  # [a, b): the state elements of p in page pid
            for pid, page in zip(pids, pages):
                a, b = max(pid * E, off), min((pid + 1) * E, off + n)
                spans.append((slice(a - off, b - off), slice(a - pid * E, b - pid * E), page))
            yield p, group, flat_p, spans
            if not p.is_contiguous():
                p.copy_(flat_p.view_as(p))
            self.pager.release(pids, keep=following)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step for every parameter with a gradient, chunk of pages by chunk of pages."""
        with torch.enable_grad():
            loss = None if closure is None else closure()
        units = self._units()
        for p in {id(u[0]): u[0] for u in units}.values():
            self.state[p]["step"] += 1
        for p, group, flat_p, spans in self._resident(units):
            flat_g = p.grad.reshape(-1)
            adamw_update_([flat_p[s] for s, _, _ in spans], [flat_g[s] for s, _, _ in spans],
                          [page[0, q] for _, q, page in spans], [page[1, q] for _, q, page in spans],
                          self.state[p]["step"].item(), group["lr"], *group["betas"], group["eps"],
                          group["weight_decay"])
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
        E = self.page_elems
        flat = torch.zeros(2, self.pager.n_pages * E)
        if chunks:
            flat[:, :self.n_elements] = torch.cat(chunks, dim=1)
        for pid in range(self.pager.n_pages):
            self.pager.write(pid, flat[:, pid * E:(pid + 1) * E])
