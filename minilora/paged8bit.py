"""Paged AdamW with 8-bit state: AdamW8bit's codes and absmax kept in the pager's pages.

The two memory savers together, as in the QLoRA paper's optimizer family: state elements are laid end to
end as in PagedAdamW (minilora.paged), but a page now holds, for E state elements (E a multiple of 256),

    bytes [0, E)            m codes (signed dynamic map)          one byte per element
    bytes [E, 2E)           v codes (unsigned dynamic map)
    bytes [2E, 2E + E/64)   m absmax, float32, one per block of 256
    bytes [2E + E/64, ...)  v absmax, float32

so a page of `page_size` bytes holds E = 256 · ⌊page_size / 520⌋ elements (520 bytes per block of 256,
against 2,048 for fp32 state). Every parameter starts on a block boundary, so the blocks of a page are the
parameter's own blocks and the update equals AdamW8bit's exactly: dequantize the page's blocks, the AdamW
update in fp32 (minilora.paged.adamw_update_), quantize back into the page. Tensors under min_8bit_size
elements keep fp32 state outside the pages, as in AdamW8bit. state_dict() has AdamW8bit's layout.
"""
from __future__ import annotations

import torch

from .adamw8bit import KEYS_8BIT, MIN_8BIT_SIZE, AdamW8bit, new_state
from .paged import PagedAdamW, adamw_update_, check_adamw_args
from .pager import Pager, check_budget
from .quant.blockwise8bit import Blockwise8bitState, dequantize_blockwise_8bit, quantize_blockwise_8bit

BLOCK = 256                    # elements per quantization block
BLOCK_BYTES = 2 * BLOCK + 8    # m and v codes, and their two float32 absmax


def page_views(page: torch.Tensor, E: int) -> dict[str, torch.Tensor]:
    """The four views of one uint8 page of E elements (layout in the module docstring)."""
    n_blocks = E // BLOCK
    return {"exp_avg_codes": page[:E], "exp_avg_sq_codes": page[E:2 * E],
            "exp_avg_absmax": page[2 * E:2 * E + 4 * n_blocks].view(torch.float32),
            "exp_avg_sq_absmax": page[2 * E + 4 * n_blocks:2 * E + 8 * n_blocks].view(torch.float32)}


class PagedAdamW8bit(PagedAdamW):
    """AdamW8bit whose 8-bit state lives in pages under a device budget (LRU, async copies on CUDA)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, page_size: int = 2**21, device_budget: int | None = None,
                 prefetch: bool = True, min_8bit_size: int = MIN_8BIT_SIZE):
        check_adamw_args(lr, betas, eps, weight_decay)
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < BLOCK_BYTES:
            raise ValueError(f"page_size must be an int of at least {BLOCK_BYTES} bytes (one block of {BLOCK} "
                             f"elements: m and v codes plus two float32 absmax), got {page_size!r}")
        check_budget(device_budget, page_size)
        torch.optim.Optimizer.__init__(self, params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                                          weight_decay=weight_decay))
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(f"params must all be on one device for one pager, got {sorted(map(str, devices))}")
        self.page_elems = BLOCK * (page_size // BLOCK_BYTES)  # E
        page_bytes = BLOCK_BYTES * (page_size // BLOCK_BYTES)
        self.pager = Pager((page_bytes,), torch.uint8, devices.pop() if devices else "cpu", device_budget)
        self.prefetch, self.min_8bit_size, self.n_elements = prefetch, min_8bit_size, 0

    def _paged(self, p: torch.Tensor) -> bool:
        return p.numel() >= self.min_8bit_size

    def _place(self, p: torch.Tensor) -> dict:
        """p's state elements start at the next block boundary, so its blocks are whole blocks of the pages."""
        self.n_elements = -(-self.n_elements // BLOCK) * BLOCK
        return super()._place(p)

    def state_nbytes(self) -> int:
        """Bytes of pages the paged state occupies plus the fp32 state of the small tensors."""
        paged = small = 0
        for g in self.param_groups:
            for p in g["params"]:
                if p.requires_grad and self._paged(p):
                    paged += -(-p.numel() // BLOCK) * BLOCK
                elif p.requires_grad:
                    small += 8 * p.numel()
        return -(-paged // self.page_elems) * self.pager.page_size + small

    @torch.no_grad()
    def step(self, closure=None):
        """Small tensors: the fp32 AdamW update. The rest: page by page, dequantize → update → quantize."""
        with torch.enable_grad():
            loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not self._paged(p):
                    if not self.state[p]:
                        self.state[p] = new_state(p, BLOCK, self.min_8bit_size)  # fp32 m and v: p is small
                    state = self.state[p]
                    state["step"] += 1
                    adamw_update_([p], [p.grad], [state["exp_avg"]], [state["exp_avg_sq"]],
                                  state["step"].item(), group["lr"], *group["betas"], group["eps"],
                                  group["weight_decay"])
        units = self._units()
        for p in {id(u[0]): u[0] for u in units}.values():
            self.state[p]["step"] += 1
        E = self.page_elems
        for p, group, flat_p, spans in self._resident(units):
            blocks, moments = [], []
            for _, q, page in spans:  # q starts on a block boundary; the last block may be ragged
                views = page_views(page, E)
                blocks.append((q, slice(q.start // BLOCK, -(-q.stop // BLOCK)), views))
                moments.append([dequantize_blockwise_8bit(Blockwise8bitState(
                    views[f"{key}_codes"][q], views[f"{key}_absmax"][blocks[-1][1]], BLOCK, signed, torch.float32))
                    for key, signed in (("exp_avg", True), ("exp_avg_sq", False))])
            flat_g = p.grad.reshape(-1)
            adamw_update_([flat_p[s] for s, _, _ in spans], [flat_g[s] for s, _, _ in spans],
                          [m for m, _ in moments], [v for _, v in moments], self.state[p]["step"].item(),
                          group["lr"], *group["betas"], group["eps"], group["weight_decay"])
            for (q, b, views), (m, v) in zip(blocks, moments):
                for key, value, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
                    state = quantize_blockwise_8bit(value, BLOCK, signed)
                    views[f"{key}_codes"][q] = state.codes
                    views[f"{key}_absmax"][b] = state.absmax
        return loss

    # ----- saving and resuming: AdamW8bit's layout -----

    def state_dict(self) -> dict:
        sd = torch.optim.Optimizer.state_dict(self)
        E, state = self.page_elems, {}
        for i, p in enumerate(self._params()):
            st = self.state.get(p, {})
            if "offset" not in st:
                if st:
                    state[i] = {k: v.clone() for k, v in st.items()}
                continue
            off, n = st["offset"], p.numel()
            parts = {k: [] for k in KEYS_8BIT}
            for pid in range(off // E, (off + n - 1) // E + 1):
                a, b = max(pid * E, off), min((pid + 1) * E, off + n)
                views = page_views(self.pager.read(pid), E)
                for k in KEYS_8BIT:
                    lo, hi = (a - pid * E, b - pid * E)
                    parts[k].append(views[k][lo // BLOCK:-(-hi // BLOCK)] if k.endswith("absmax") else views[k][lo:hi])
            state[i] = {k: torch.cat(v).reshape(p.shape if k.endswith("codes") else (-1,)).clone()
                        for k, v in parts.items()}
            state[i]["step"] = st["step"].clone()
        sd["state"] = state
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load an AdamW8bit or PagedAdamW8bit state dict (checked by AdamW8bit's loader), then lay it out in pages."""
        staging = AdamW8bit(self._params(), min_8bit_size=self.min_8bit_size)
        staging.load_state_dict(state_dict)
        torch.optim.Optimizer.load_state_dict(self, {"state": {}, "param_groups": state_dict["param_groups"]})
        self.pager.clear()
        self.state.clear()
        self.n_elements, E = 0, self.page_elems
        pages: dict[int, torch.Tensor] = {}
        for p in self._params():
            saved = staging.state.get(p)
            if not saved:
                continue
            if "exp_avg" in saved:
                self.state[p] = saved
                continue
            if not self._paged(p):
                raise ValueError(f"state_dict: a parameter of {p.numel()} elements has 8-bit state, but "
                                 f"min_8bit_size={self.min_8bit_size} keeps it in fp32")
            st = self._place(p)
            st["step"] = saved["step"]
            off, n = st["offset"], p.numel()
            for pid in range(off // E, (off + n - 1) // E + 1):
                a, b = max(pid * E, off), min((pid + 1) * E, off + n)
                page = pages.setdefault(pid, torch.zeros(self.pager.page_shape, dtype=torch.uint8))
                views, lo, hi = page_views(page, E), a - pid * E, b - pid * E
                for k in KEYS_8BIT:
                    src = saved[k].reshape(-1)
                    if k.endswith("absmax"):
                        views[k][lo // BLOCK:-(-hi // BLOCK)] = src[(a - off) // BLOCK:-(-(b - off) // BLOCK)]
                    else:
                        views[k][lo:hi] = src[a - off:b - off]
        for pid in range(self.pager.n_pages):
            self.pager.write(pid, pages.get(pid, torch.zeros(self.pager.page_shape, dtype=torch.uint8)))
