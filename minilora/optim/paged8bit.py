"""Paged AdamW with 8-bit state: AdamW8bit's codes and absmax kept in the pager's pages.

The two memory savers together, as in the QLoRA paper's optimizer family: state elements are laid end to
end as in PagedAdamW (paged.py), but a page now holds, for E state elements (E a multiple of 256),

    bytes [0, E)            m codes (signed dynamic map)          one byte per element
    bytes [E, 2E)           v codes (unsigned dynamic map)
    bytes [2E, 2E + E/64)   m absmax, float32, one per block of 256
    bytes [2E + E/64, ...)  v absmax, float32

so a page of `page_size` bytes holds E = 256 · ⌊page_size / 520⌋ elements (520 bytes per block of 256,
against 2,048 for fp32 state). Every parameter starts on a block boundary, so the blocks of a page are the
parameter's own blocks and the update equals AdamW8bit's exactly: dequantize the page's blocks, the AdamW
update in fp32 (adamw.py), quantize back into the page. Tensors under min_8bit_size elements keep fp32 state
outside the pages, as in AdamW8bit. state_dict() has AdamW8bit's layout. Only what a page holds differs from
PagedAdamW: the paging, the work units and the step are PagedAdamW's own.
"""
from __future__ import annotations

import torch

from ..quant.blockwise8bit import Blockwise8bitState, dequantize_blockwise_8bit, quantize_blockwise_8bit
from ..quant.format import BLOCKSIZE_8BIT as BLOCK, ceil_div
from .adamw import STATE_BYTES, adamw_update_
from .adamw8bit import KEYS_8BIT, MIN_8BIT_SIZE, AdamW8bit, check_min_8bit_size, new_state
from .paged import PagedAdamW

BLOCK_BYTES = 2 * BLOCK + 8    # m and v codes, and their two float32 absmax
MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (name, signed map)


def page_views(page: torch.Tensor, E: int) -> dict[str, torch.Tensor]:
    """The four views of one uint8 page of E elements (layout in the module docstring)."""
    n_blocks = E // BLOCK
    return {"exp_avg_codes": page[:E], "exp_avg_sq_codes": page[E:2 * E],
            "exp_avg_absmax": page[2 * E:2 * E + 4 * n_blocks].view(torch.float32),
            "exp_avg_sq_absmax": page[2 * E + 4 * n_blocks:2 * E + 8 * n_blocks].view(torch.float32)}


def blocks(q: slice) -> slice:
    """The blocks a slice of a page's elements covers (it starts on a block boundary; the last may be ragged)."""
    return slice(q.start // BLOCK, ceil_div(q.stop, BLOCK))


class PagedAdamW8bit(PagedAdamW):
    """AdamW8bit whose 8-bit state lives in pages under a device budget (LRU, async copies on CUDA)."""
    align = BLOCK  # every parameter's state starts on a block boundary

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, page_size: int = 2**21, device_budget: int | None = None,
                 prefetch: bool = True, min_8bit_size: int = MIN_8BIT_SIZE):
        self.min_8bit_size = check_min_8bit_size(min_8bit_size)
        super().__init__(params, lr, betas, eps, weight_decay, page_size, device_budget, prefetch)

    # ----- what a page holds: PagedAdamW's hooks -----

    def _page_layout(self, page_size) -> tuple[int, tuple[int, ...], torch.dtype]:
        """E = 256 · ⌊page_size / 520⌋ elements in a uint8 page of 520 bytes per block."""
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < BLOCK_BYTES:
            raise ValueError(f"page_size must be an int of at least {BLOCK_BYTES} bytes (one block of {BLOCK} "
                             f"elements: m and v codes plus two float32 absmax), got {page_size!r}")
        n_blocks = page_size // BLOCK_BYTES
        return BLOCK * n_blocks, (BLOCK_BYTES * n_blocks,), torch.uint8

    def _paged(self, p: torch.Tensor) -> bool:
        """8-bit state in the pages for a tensor of min_8bit_size elements or more, unless its state holds fp32
        moments (loaded from torch AdamW, PagedAdamW or AdamW8bit): those are kept and continued as they are,
        outside the pages, as AdamW8bit keeps them."""
        return p.numel() >= self.min_8bit_size and "exp_avg" not in self.state.get(p, {})

    def _update(self, p: torch.Tensor, group: dict, flat_p: torch.Tensor, spans: list[tuple]) -> None:
        """Page by page: dequantize p's blocks → the fp32 AdamW update → quantize back into the page."""
        views = [page_views(page, self.page_elems) for _, _, page in spans]
        moments = [[dequantize_blockwise_8bit(Blockwise8bitState(v[f"{key}_codes"][q], v[f"{key}_absmax"][blocks(q)],
                                                                 BLOCK, signed, torch.float32))
                    for key, signed in MOMENTS] for v, (_, q, _) in zip(views, spans)]
        flat_g = p.grad.reshape(-1)
        adamw_update_([flat_p[s] for s, _, _ in spans], [flat_g[s] for s, _, _ in spans],
                      [m for m, _ in moments], [v for _, v in moments], self.state[p]["step"].item(),
                      group["lr"], *group["betas"], group["eps"], group["weight_decay"])
        for v, (_, q, _), mv in zip(views, spans, moments):
            for (key, signed), value in zip(MOMENTS, mv):
                state = quantize_blockwise_8bit(value, BLOCK, signed)
                v[f"{key}_codes"][q] = state.codes
                v[f"{key}_absmax"][blocks(q)] = state.absmax

    def _step_unpaged(self) -> None:
        """Small tensors: fp32 m and v outside the pages, the plain AdamW update."""
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

    def _read(self, p: torch.Tensor) -> dict:
        """AdamW8bit's layout: codes with p's shape and absmax per block, or a small tensor's fp32 state."""
        st = self.state[p]
        if "offset" not in st:
            return {k: v.clone() for k, v in st.items()}
        parts = {k: [] for k in KEYS_8BIT}
        for pid, _, q in self._spans(p):
            views = page_views(self.pager.read(pid), self.page_elems)
            for k in KEYS_8BIT:
                parts[k].append(views[k][blocks(q)] if k.endswith("absmax") else views[k][q])
        saved = {k: torch.cat(v).reshape(p.shape if k.endswith("codes") else (-1,)).clone()
                 for k, v in parts.items()}
        return saved | {"step": st["step"].clone()}

    def _checked(self, state_dict: dict) -> dict[int, dict]:
        """An AdamW8bit or PagedAdamW8bit state dict, checked by AdamW8bit's loader."""
        staging = AdamW8bit(self._params(), min_8bit_size=self.min_8bit_size)
        staging.load_state_dict(state_dict)
        return {i: staging.state[p] for i, p in enumerate(self._params()) if staging.state.get(p)}

    def _restore(self, p: torch.Tensor, saved: dict, pages: dict[int, torch.Tensor]) -> None:
        if "exp_avg" in saved:
            self.state[p] = saved
            return
        if not self._paged(p):
            raise ValueError(f"state_dict: a parameter of {p.numel()} elements has 8-bit state, but "
                             f"min_8bit_size={self.min_8bit_size} keeps it in fp32")
        self._place(p)["step"] = saved["step"]
        for pid, s, q in self._spans(p):
            views = page_views(self._new_page(pages, pid), self.page_elems)
            for k in KEYS_8BIT:
                src = saved[k].reshape(-1)
                if k.endswith("absmax"):
                    views[k][blocks(q)] = src[blocks(s)]
                else:
                    views[k][q] = src[s]

    def state_nbytes(self) -> int:
        """Bytes of pages the paged state occupies plus the fp32 state of the small tensors."""
        trainable = [p for p in self._params() if p.requires_grad]
        paged = sum(ceil_div(p.numel(), BLOCK) * BLOCK for p in trainable if self._paged(p))
        small = sum(STATE_BYTES * p.numel() for p in trainable if not self._paged(p))
        return ceil_div(paged, self.page_elems) * self.pager.page_size + small
