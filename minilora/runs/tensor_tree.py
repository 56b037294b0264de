"""A nested state (dicts, lists, tuples, tensors, JSON scalars) as JSON plus a flat dict of tensors, and back.

    flatten({"state": {0: {"step": 3, "exp_avg": t}}}, tensors)
        -> {"state": {"__items__": [[0, {"step": 3, "exp_avg": {"__tensor__": "state.0.exp_avg"}}]]}}
           with tensors["state.0.exp_avg"] = t

It is how a checkpoint stores an optimizer's state_dict without pickle: the JSON goes into state.json, the
tensors into a safetensors file. Keys that are not plain strings (an optimizer's integer parameter ids) and
tuples are recorded as such, so unflatten gives back exactly what flatten was given.
"""
from __future__ import annotations

from typing import Any

import torch


def flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """obj as JSON-able data; every tensor is moved into `tensors` under its path and replaced by a reference."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten(v, tensors, f"{path}.{k}" if path else k) for k, v in obj.items()}
        return {"__items__": [[flatten(k, tensors, f"{path}.key{i}"), flatten(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path!r} in a checkpoint (tensors and JSON only)")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of flatten."""
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise KeyError(f"refers to tensor {key!r}, which the tensors lack")
            return tensors[key]
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {unflatten(k, tensors): unflatten(v, tensors) for k, v in obj["__items__"]}
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    return obj
