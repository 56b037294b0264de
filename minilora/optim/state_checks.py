"""What a loaded AdamW state must be before any of it is used: each optimizer's load_state_dict calls these
first, so a state either continues exactly or is refused naming the key and the reason (machinery)."""
from __future__ import annotations

import math

import torch

from .adamw import check_adamw_args


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
