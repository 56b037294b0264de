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


FP32_MOMENTS = ("exp_avg", "exp_avg_sq")
CODES_8BIT = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")


def check_state(owner: str, i, saved: dict, p: torch.Tensor, blocksize: int | None = None) -> None:
    """Raise ValueError naming the key and the reason unless `saved`, parameter i's AdamW state, continues
    exactly: step a whole number >= 0 (t in the bias corrections 1 − β^t); m and v either as floating moments
    with p's number of elements, m finite and v finite and >= 0 (√v), or, where blocksize is given, as 8-bit
    codes (uint8, p's shape) and float32 absmax (finite, >= 0, one per block). A state that passes cannot put
    a NaN into a parameter; one that fails is refused before anything is loaded."""
    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"{owner} state of parameter {i}: {key!r} {why}")
    eight = blocksize is not None and "exp_avg_codes" in saved
    keys = CODES_8BIT if eight else FP32_MOMENTS
    missing = [k for k in (*keys, "step") if k not in saved]
    if missing:
        raise bad(missing[0], f"is missing (the state has {sorted(saved)})")
    step = saved["step"]
    step = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not (math.isfinite(step) and step >= 0
                                                                             and step == int(step)):
        raise bad("step", f"is {step!r}; expected a whole number >= 0")
    for k in keys:
        t = saved[k]
        if not isinstance(t, torch.Tensor):
            raise bad(k, f"is a {type(t).__name__}, not a tensor")
        if eight and k.endswith("codes"):
            want, dtypes = tuple(p.shape), (torch.uint8,)
        elif eight:
            want, dtypes = (-(-p.numel() // blocksize),), (torch.float32,)
        else:
            want, dtypes = None, (torch.float32, torch.bfloat16, torch.float16)
        if t.dtype not in dtypes:
            raise bad(k, f"has dtype {t.dtype}; expected {' or '.join(map(str, dtypes))}")
        if (tuple(t.shape) != want) if want is not None else t.numel() != p.numel():
            raise bad(k, f"has shape {tuple(t.shape)}; expected {want or f'{p.numel()} elements'}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise bad(k, "holds inf or NaN")
        if (k.endswith("absmax") or k == "exp_avg_sq") and bool((t < 0).any()):
            raise bad(k, "holds negative values; " + ("an absmax is a magnitude" if eight else "v is a mean of g²"))


def check_groups(owner: str, state_dict: dict) -> None:
    """Raise ValueError naming the group unless every param group's lr, betas, eps, weight_decay are valid."""
    for k, g in enumerate(state_dict.get("param_groups", [])):
        try:
            check_adamw_args(g.get("lr"), g.get("betas", ()), g.get("eps"), g.get("weight_decay"))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{owner} state: param_groups[{k}]: {e}") from None


class AdamWBase(torch.optim.Optimizer):
    """torch.optim.Optimizer with AdamW's settings (lr, betas, eps, weight_decay), checked here for every
    optimizer of minilora.optim; each subclass says how it stores m and v and runs adamw_update_ on them."""

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
        check_adamw_args(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]
