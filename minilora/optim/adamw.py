"""AdamW's update, written once: the equation every optimizer of minilora.optim runs, and its checked settings.

AdamW (Loshchilov & Hutter) keeps two fp32 tensors per trainable parameter, exp_avg (m) and exp_avg_sq (v):
8 bytes per element (STATE_BYTES), twice the fp32 weights themselves. Its update is element-wise:

    p ← p · (1 − lr·λ)                                  decoupled weight decay
    m ← β1·m + (1 − β1)·g          v ← β2·v + (1 − β2)·g²
    p ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)  bias-corrected step

so it runs just as well on one piece of the state at a time, in whatever form m and v are kept between steps:
fp32 pages (paged.py), 8-bit blocks (adamw8bit.py) or 8-bit blocks in pages (paged8bit.py).
"""
from __future__ import annotations

import math

import torch

STATE_BYTES = 8  # per element: exp_avg + exp_avg_sq, fp32 each


def check_adamw_args(lr, betas, eps, weight_decay) -> None:
    """The hyper-parameters every AdamW here accepts, each checked by name."""
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    check_step_size(lr, betas[0], torch.float32)


def check_step_size(lr: float, beta1: float, dtype: torch.dtype, name: str = "lr") -> None:
    """The first step's size lr/(1 − β1) must be a number of `dtype` (the parameters' or the update's)."""
    largest = torch.finfo(dtype).max
    if lr / (1 - beta1) > largest:
        raise ValueError(f"{name}={lr!r} is too large: AdamW's first step lr/(1 - beta1) = {lr / (1 - beta1):.3g} "
                         f"exceeds the largest {str(dtype).removeprefix('torch.')} ({largest:.3g}); "
                         f"learning rates are typically 1e-5 to 1e-2")


def check_dense(optimizer: torch.optim.Optimizer) -> None:
    """Every gradient about to be used must be dense (these optimizers index m, v and pages element-wise)."""
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if p.grad is not None and p.grad.layout != torch.strided:
                raise TypeError(f"{type(optimizer).__name__} does not support sparse gradients: parameter {i} of "
                                f"param group {g} (shape {tuple(p.shape)}) has a {p.grad.layout} gradient; give it a "
                                f"dense one (nn.Embedding(..., sparse=False))")


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


class AdamWBase(torch.optim.Optimizer):
    """torch.optim.Optimizer with AdamW's settings (lr, betas, eps, weight_decay), checked here for every
    optimizer of minilora.optim; each subclass says how it stores m and v and runs adamw_update_ on them."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
        check_adamw_args(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]
