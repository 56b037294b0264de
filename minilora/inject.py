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
from .multi.named import (BASE, adapter_records, adopt, install_batch_hook, mount, names_on, park_new, parked,
                          set_trainable)

# Which wrapper turns which kind of layer into a LoRA layer (and, with use_dora, into a DoRA layer). Layers
# defined elsewhere (the NF4 linear of minilora.qlora, DoRA in minilora.variants.dora) register themselves here, so this
# module never needs to know about them.
LORA_WRAPPERS: dict[type, Callable[..., nn.Module]] = {nn.Linear: LoRALinear}
DORA_WRAPPERS: dict[type, Callable[..., nn.Module]] = {}
ADAPTER_TENSORS = ("lora_A", "lora_B", "lora_magnitude_vector")  # what trains (the last: DoRA's m)


def register_lora_wrapper(base_type: type, wrapper: Callable[..., nn.Module], dora: bool = False) -> None:
    """Teach add_lora to wrap modules of base_type with wrapper(module, r=, alpha=, dropout=, ...)."""
    (DORA_WRAPPERS if dora else LORA_WRAPPERS)[base_type] = wrapper


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
             dropout: float = 0.0, use_rslora: bool = False, init: str = "kaiming", use_dora: bool = False,
             adapter_name: str = "default") -> nn.Module:
    """Wrap each target layer W0 as W0 + (alpha/r)·B·A (in place) and leave only the adapters trainable.
    use_dora: DoRA's magnitude and direction (variants/dora.py); init="pissa": PiSSA (variants/lora_init.py).
    A target that already has an adapter gets this one beside it under adapter_name (multi/named.py); the
    active adapter stays active. Every target is checked and wrapped before the model changes: on an error
    the model is as it was."""
    names = find_targets(model, targets)
    check_adapter_name(adapter_name)
    had, active = adapter_names(model), active_adapter(model)
    pissa_names = {v.name for layer in lora_layers(model).values() for v in adapter_records(layer) if v.init == "pissa"}
    if (init == "pissa" and set(had) - {adapter_name}) or pissa_names - {adapter_name}:
        raise ValueError("a PiSSA adapter changes the base weights, so it must be the model's only adapter")
    registry = DORA_WRAPPERS if use_dora else LORA_WRAPPERS
    wrapped = {}
    with all_or_nothing(model, names):  # a wrapper freezes its base as it is made
        for name in names:
            module = model.get_submodule(name)
            if name in lora_layers(model) and adapter_name in names_on(module):
                raise ValueError(f"target {name!r} already has a LoRA adapter named {adapter_name!r}")
            base = module.base_layer if name in lora_layers(model) else module
            wrapper = next((w for t, w in registry.items() if type(base) is t), None)
            if wrapper is None:
                kinds = ", ".join(t.__name__ for t in registry)
                raise TypeError(f"target {name!r} is a {type(base).__name__}; {'DoRA' if use_dora else 'LoRA'} "
                                f"wraps only {kinds}")
            if base is not module and module.merged:
                raise ValueError(f"target {name!r} has its adapter merged into the weight; unmerge() it first")
            wrapped[name] = layer = wrapper(base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                            init="kaiming" if init == "pissa" else init)  # PiSSA: once all are made
            layer.adapter_name = adapter_name
    for name, layer in wrapped.items():
        module = model.get_submodule(name)
        if layer.base_layer is module:
            set_submodule(model, name, layer)
        elif use_dora and type(module) is not type(layer):  # the first DoRA adapter beside plain ones
            set_submodule(model, name, adopt(layer, module))
        else:
            park_new(module, layer)
    if init == "pissa":  # W0 -> W_res: a tied lm_head first gets its own copy, so the embedding keeps W0
        untie_lora_bases(model)
        for layer in wrapped.values():
            layer.init = "pissa"
            layer.pissa_init()
    mark_only_lora_trainable(model)
    activate(model, active if had else adapter_name)
    install_batch_hook(model, lora_layers, check_row_names)
    return model


def activate(model: nn.Module, name: str | None) -> None:
    """Mount adapter `name` wherever it is parked and switch it on (and trainable); every other layer runs its
    base (name None: all of them)."""
    for layer in lora_layers(model).values():
        if name != layer.adapter_name and name in names_on(layer):
            mount(layer, name)
        layer.disabled = layer.adapter_name != name
        set_trainable(layer)


def check_adapter_name(name) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name == BASE:
        raise ValueError(f"adapter_name must be letters, digits, '_' or '-' (it names a folder) and not {BASE!r}, "
                         f"got {name!r}")


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name on the model, in the order first seen."""
    return list(dict.fromkeys(n for layer in lora_layers(model).values() for n in names_on(layer)))


def active_adapter(model: nn.Module) -> str | None:
    """The adapter forward uses (None without adapters or inside disable_adapters)."""
    active = {layer.adapter_name for layer in lora_layers(model).values() if not layer.disabled}
    return active.pop() if len(active) == 1 else None


def check_row_names(model: nn.Module, names) -> list[str]:
    """adapter_names for a mixed batch: a list of known adapter names or "__base__", one per example."""
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_names must be a list of adapter names, one per example, got {names!r}")
    known = adapter_names(model)
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise ValueError(f"adapter_names: unknown adapter {unknown[0]!r}; the model has {known} (and {BASE!r})")
    return list(names)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> LoRA layer, for every layer carrying lora_A / lora_B."""
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, "lora_A", None), nn.Parameter)}


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad = True for lora_A / lora_B (and DoRA's lora_magnitude_vector), False for every other
    parameter (parked adapters included)."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(ADAPTER_TENSORS))


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


def merge_lora(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Fold every adapter into its base weight, W = W0 + scaling·B·A, and put the plain layer back (in place).
    An adapter on a tied lm_head gets its own merged matrix (the embedding keeps W0): the head is untied.
    With adapter_name, only that adapter is folded in (and leaves the model); the others stay, on W0 + ΔW."""
    untie_lora_bases(model)
    if adapter_name is None:
        for name, layer in lora_layers(model).items():
            set_submodule(model, name, layer.merged_layer())
        return model
    for name, layer in lora_layers(model).items():
        if adapter_name in names_on(layer) and not isinstance(getattr(layer.base_layer, "weight", None), nn.Parameter):
            raise ValueError(f"merge_lora: {name} has a quantized base; merge one adapter of QLoRA with "
                             f"merge_qlora(model, requantize=True, adapter_name={adapter_name!r})")
    return fold_adapter(model, adapter_name, lambda name, layer: layer.merge(), "merge_lora")


def fold_adapter(model: nn.Module, adapter_name: str, fold: Callable, caller: str) -> nn.Module:
    """Fold one named adapter into the base of every layer that carries it and take it out; the other adapters
    stay, on the new base. fold(name, layer) folds the layer's mounted adapter in: W0 <- W0 + ΔW (merge_lora),
    or a new quantized W0 (merge_qlora). A layer left with no adapter becomes its base layer."""
    if adapter_name not in adapter_names(model):
        raise ValueError(f"{caller}: no adapter named {adapter_name!r}; the model has {adapter_names(model)}")
    if any(layer.merged for layer in lora_layers(model).values()):
        raise ValueError(f"{caller}: a layer has its adapter merged into the weight; unmerge() it first")
    active = active_adapter(model)
    for name, layer in lora_layers(model).items():
        if adapter_name not in names_on(layer):
            continue
        if adapter_name != layer.adapter_name:
            mount(layer, adapter_name)
        fold(name, layer)  # then the adapter goes, and another one (if any) takes its place
        if not parked(layer):
            set_submodule(model, name, layer.base_layer)
            continue
        layer.merged = False
        mount(layer, next(iter(parked(layer))))
        del parked(layer)[adapter_name]
    rest = adapter_names(model)
    activate(model, active if active in rest else (rest or [None])[0])
    return model
