"""AdamW with 8-bit optimizer state: m and v stored blockwise in one byte per value.

Adam keeps two fp32 numbers per parameter, m (first moment) and v (second moment): 8 of the 12 bytes per
parameter behind the lecture's 120 GB for a 10B model. Dettmers et al. ("8-bit Optimizers via Block-wise
Quantization", 2021) store them in 8 bits instead, each block of 256 values with its own fp32 absmax
(minilora.quant.blockwise8bit). Every step, per parameter:

    m, v ← dequantize(m8), dequantize(v8)                      fp32, only this parameter's
    p ← p(1 − lr·λ);  m ← β1 m + (1 − β1) g;  v ← β2 v + (1 − β2) g²
    p ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)         AdamW (adamw.py: adamw_update_)
    m8, v8 ← quantize(m, signed map), quantize(v, unsigned map)

2 bytes of state per parameter plus 8 bytes per block of 256 instead of 8. Tensors under `min_8bit_size`
(4,096) elements keep fp32 state: their absmax overhead is large and they are few bytes anyway.
state_dict() holds only tensors (codes, absmax, step), so a checkpoint is safetensors, not pickle.
"""
from __future__ import annotations

import torch

from ..quant.blockwise8bit import Blockwise8bitState, dequantize_blockwise_8bit, quantize_blockwise_8bit
from ..quant.format import BLOCKSIZE_8BIT, ceil_div
from .adamw import AdamWBase, adamw_update_, check_dense
from .state_checks import check_groups, check_state

MIN_8BIT_SIZE = 4096  # smaller tensors keep fp32 state (as bitsandbytes does)
KEYS_8BIT = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
KEYS_32BIT = ("exp_avg", "exp_avg_sq")


def check_min_8bit_size(value) -> int:
    """min_8bit_size: an int number of elements >= 0 (tensors with fewer keep fp32 state)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"min_8bit_size must be an int number of elements >= 0, got {value!r}")
    return value


def new_state(p: torch.Tensor, blocksize: int, min_8bit_size: int) -> dict:
    """A parameter's state before its first step: m = v = 0, as 8-bit codes (code 0, absmax 0) or in fp32."""
    state = {"step": torch.zeros((), dtype=torch.float32)}
    if p.numel() < min_8bit_size:
        return state | {"exp_avg": torch.zeros_like(p, dtype=torch.float32),
                        "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)}
    zeros = torch.zeros_like(p, dtype=torch.float32)
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        q = quantize_blockwise_8bit(zeros, blocksize, signed)
        state[f"{key}_codes"], state[f"{key}_absmax"] = q.codes, q.absmax
    return state


class AdamW8bit(AdamWBase):
    """torch.optim.AdamW's update with m and v kept in blockwise 8-bit (signed map for m, unsigned for v)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, blocksize: int = BLOCKSIZE_8BIT, min_8bit_size: int = MIN_8BIT_SIZE):
        super().__init__(params, lr, betas, eps, weight_decay)
        self.blocksize, self.min_8bit_size = blocksize, check_min_8bit_size(min_8bit_size)

    def _init_state(self, p: torch.Tensor) -> dict:
        self.state[p] = new_state(p, self.blocksize, self.min_8bit_size)
        return self.state[p]

    def _moments(self, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """m and v in fp32: the stored tensors themselves (fp32 state) or dequantized copies (8-bit state)."""
        if "exp_avg" in state:
            return state["exp_avg"], state["exp_avg_sq"]
        return tuple(dequantize_blockwise_8bit(Blockwise8bitState(
            state[f"{key}_codes"], state[f"{key}_absmax"], self.blocksize, signed, torch.float32))
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False)))

    def _store(self, state: dict, m: torch.Tensor, v: torch.Tensor) -> None:
        if "exp_avg" in state:
            return  # updated in place
        for key, value, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
            q = quantize_blockwise_8bit(value, self.blocksize, signed)
            state[f"{key}_codes"].copy_(q.codes)
            state[f"{key}_absmax"].copy_(q.absmax)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check_dense(self)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p] or self._init_state(p)
                state["step"] += 1
                m, v = self._moments(state)
                adamw_update_([p], [p.grad], [m], [v], float(state["step"]), group["lr"], beta1, beta2,
                              group["eps"], group["weight_decay"])
                self._store(state, m, v)
        return loss

    def state_nbytes(self) -> int:
        """Bytes of optimizer state held now (codes + absmax, or fp32 m and v), not counting the step counters."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for k, t in s.items() if k != "step")

    def load_state_dict(self, state_dict: dict) -> None:
        """Every parameter's state checked first (check_state: names the key and the reason; nothing is loaded
        unless all pass), then torch's loader, then the exact tensors back (it would cast fp32 absmax / moments
        to a bf16 param's dtype)."""
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = self._params()
        check_groups(type(self).__name__, state_dict)
        for i, p in zip(ids, params):
            if (saved := state_dict["state"].get(i)) is not None:
                check_state(type(self).__name__, i, saved, p, self.blocksize)
        super().load_state_dict(state_dict)
        for i, p in zip(ids, params):
            saved = state_dict["state"].get(i)
            if saved is None:
                continue
            for k in KEYS_8BIT if "exp_avg_codes" in saved else KEYS_32BIT:
                self.state[p][k] = saved[k].to(p.device, dtype=saved[k].dtype if "codes" in k or "absmax" in k
                                               else torch.float32, copy=True)
            self.state[p]["step"] = torch.as_tensor(float(saved["step"]), dtype=torch.float32)
