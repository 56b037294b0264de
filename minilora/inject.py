"""Apply LoRA to any model from outside: find target modules by name, wrap them, freeze everything else.

A target pattern matches a module name when it is the exact name, a dotted suffix of it ("c_attn" matches
"transformer.h.0.attn.c_attn"), or a regular expression that matches the whole name ("h\\.[01]\\..*c_fc").
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch.nn as nn

from .lora import LoRALinear

# Which wrapper turns which kind of layer into a LoRA layer. Layers defined elsewhere (the NF4 linear of
# minilora.qlora) register themselves here, so this module never needs to know about them.
LORA_WRAPPERS: dict[type, Callable[..., nn.Module]] = {nn.Linear: LoRALinear}


def register_lora_wrapper(base_type: type, wrapper: Callable[..., nn.Module]) -> None:
    """Teach add_lora to wrap modules of base_type with wrapper(module, r=, alpha=, dropout=, ...)."""
    LORA_WRAPPERS[base_type] = wrapper


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def find_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Names of the modules that the patterns select; every pattern must select at least one module."""
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns:
        raise ValueError("targets must name at least one module")
    names = [n for n, _ in model.named_modules() if n]
    chosen: list[str] = []
    for p in patterns:
        hits = [n for n in names if _matches(n, p)]
        if not hits:
            raise ValueError(f"target {p!r} matches no module of {type(model).__name__} "
                             f"(module names look like {names[min(5, len(names) - 1)]!r})")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@contextmanager
def all_or_nothing(model: nn.Module, names: Iterable[str]):
    """On an exception inside the block, put back the modules that were at `names` and every parameter's
    requires_grad, so a failed add_lora / load_adapter leaves the model exactly as it was."""
    modules = {n: model.get_submodule(n) for n in names}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for n, m in modules.items():
            set_submodule(model, n, m)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def add_lora(model: nn.Module, targets: str | Iterable[str], r: int = 8, alpha: float = 16.0,
             dropout: float = 0.0, use_rslora: bool = False, init: str = "kaiming") -> nn.Module:
    """Wrap each target layer W0 as W0 + (alpha/r)·B·A (in place) and leave only lora_A / lora_B trainable.
    Every target is checked and wrapped before the model changes: on an error the model is as it was."""
    names = find_targets(model, targets)
    wrapped = {}
    with all_or_nothing(model, names):  # a wrapper freezes its base as it is made
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, LoRALinear) or hasattr(module, "lora_A"):
                raise ValueError(f"target {name!r} already has a LoRA adapter")
            wrapper = next((w for t, w in LORA_WRAPPERS.items() if type(module) is t), None)
            if wrapper is None:
                kinds = ", ".join(t.__name__ for t in LORA_WRAPPERS)
                raise TypeError(f"target {name!r} is a {type(module).__name__}; LoRA wraps only {kinds}")
            wrapped[name] = wrapper(module, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init)
    for name, layer in wrapped.items():
        set_submodule(model, name, layer)
    mark_only_lora_trainable(model)
    return model


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> LoRA layer, for every layer carrying lora_A / lora_B."""
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, "lora_A", None), nn.Parameter)}


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad = True for lora_A / lora_B, False for every other parameter."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("lora_A", "lora_B")))


def parameter_uses(model: nn.Module) -> Counter:
    """id(parameter) -> how many module slots hold it (2 for a weight tied between wte and lm_head)."""
    return Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))


def untie_lora_bases(model: nn.Module) -> bool:
    """Give every LoRA layer whose base weight is shared (a tied lm_head shares the embedding's matrix) its own
    copy, so that folding ΔW into it leaves the embedding as it was. A model whose config records the tie
    (config.tie_word_embeddings, as GPT-2's does) is told that the head is untied now. True if any was."""
    uses, untied = parameter_uses(model), False
    for layer in lora_layers(model).values():
        w = getattr(layer.base_layer, "weight", None)
        if isinstance(w, nn.Parameter) and uses[id(w)] > 1 and not layer.merged:
            layer.base_layer.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
            untied = True
    if untied and hasattr(getattr(model, "config", None), "tie_word_embeddings"):
        model.config.tie_word_embeddings = False
    return untied


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, W = W0 + scaling·B·A, and put the plain layer back (in place).
    An adapter on a tied lm_head gets its own merged matrix (the embedding keeps W0): the head is untied."""
    untie_lora_bases(model)
    for name, layer in lora_layers(model).items():
        set_submodule(model, name, layer.merged_layer())
    return model
