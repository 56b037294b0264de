"""Many named adapters on one frozen base: each LoRA layer has one adapter mounted and the others parked.

The mounted adapter is the layer's own lora_A / lora_B (and DoRA's lora_magnitude_vector): the one forward
uses and training moves. The others wait in layer.parked_adapters (name -> ParkedAdapter, frozen) until
set_adapter swaps them in. The tensors move, never copy, so an optimizer holding them keeps working.

    add_lora(model, targets, adapter_name="shout")    a second adapter, parked (the active one stays)
    set_adapter(model, "shout")                        mounted in every layer that has it; the rest run the base
    with disable_adapters(model): ...                  the base model alone
    delete_adapter(model, "shout")
    model(idx, adapter_names=["default", "shout", "__base__"])    a mixed batch (mixed_batch.py)
"""
from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn

from .inject import lora_layers
from .mixed_batch import BASE

SETTINGS = ("r", "alpha", "scaling", "use_rslora", "init")


class ParkedAdapter(nn.Module):
    """An adapter waiting beside a LoRA layer: its tensors (A, B, DoRA's magnitude) and settings (r, alpha, ...)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.name = layer.adapter_name
        self.A, self.B = layer.lora_A, layer.lora_B
        self.magnitude = getattr(layer, "lora_magnitude_vector", None)
        self.lora_dropout = layer.lora_dropout
        self.settings = {k: getattr(layer, k) for k in SETTINGS}
        for p in self.parameters():
            p.requires_grad_(False)


def parked(layer: nn.Module) -> nn.ModuleDict:
    if not isinstance(getattr(layer, "parked_adapters", None), nn.ModuleDict):
        layer.parked_adapters = nn.ModuleDict()
    return layer.parked_adapters


def layer_adapter_names(layer: nn.Module) -> list[str]:
    return [layer.adapter_name, *parked(layer).keys()]


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name on the model, in the order first seen."""
    return list(dict.fromkeys(n for layer in lora_layers(model).values() for n in layer_adapter_names(layer)))


def active_adapter(model: nn.Module) -> str | None:
    """The adapter forward uses (None when every layer runs its base, as inside disable_adapters)."""
    active = {layer.adapter_name for layer in lora_layers(model).values() if not layer.disabled}
    return active.pop() if len(active) == 1 else None


def _mount(layer: nn.Module, name: str) -> None:
    """Swap the parked adapter `name` in and park the one that was mounted."""
    incoming = parked(layer).pop(name)
    outgoing = ParkedAdapter(layer)
    layer.lora_A, layer.lora_B, layer.lora_dropout = incoming.A, incoming.B, incoming.lora_dropout
    if incoming.magnitude is not None:
        layer.lora_magnitude_vector = incoming.magnitude
    for key, value in incoming.settings.items():
        setattr(layer, key, value)
    layer.adapter_name = name
    parked(layer)[outgoing.name] = outgoing


def set_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the adapter forward uses (and the only one that trains); layers without it run the base."""
    layers = lora_layers(model)
    if name not in adapter_names(model):
        raise ValueError(f"set_adapter: no adapter named {name!r}; the model has {adapter_names(model)}")
    for layer in layers.values():
        if layer.merged:
            raise RuntimeError("set_adapter: a layer has its adapter merged into the weight; unmerge() it first")
        if name in parked(layer):
            _mount(layer, name)
        layer.disabled = layer.adapter_name != name
        for p in (layer.lora_A, layer.lora_B, getattr(layer, "lora_magnitude_vector", None)):
            if p is not None:
                p.requires_grad_(not layer.disabled)


@contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block the model is its base (every adapter off); afterwards each layer is as it was."""
    layers = list(lora_layers(model).values())
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, before):
            layer.disabled = flag


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer; a layer left with no adapter becomes its base layer again.
    Deleting the active adapter makes the first remaining one active (as PEFT does)."""
    from .inject import _set_submodule

    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"delete_adapter: no adapter named {name!r}; the model has {names}")
    was_active = active_adapter(model)
    for path, layer in lora_layers(model).items():
        if name in parked(layer):
            del parked(layer)[name]
        elif layer.adapter_name == name:
            if not parked(layer):
                _set_submodule(model, path, layer.base_layer)
                continue
            _mount(layer, next(iter(parked(layer))))
            del parked(layer)[name]
    rest = adapter_names(model)
    if rest:
        set_adapter(model, was_active if was_active in rest else rest[0])


def check_row_names(model: nn.Module, names) -> list[str]:
    """adapter_names for a mixed batch: a list of known adapter names or "__base__", one per example."""
    known = adapter_names(model)
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"adapter_names must be a list of adapter names, one per example, got {names!r}")
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise ValueError(f"adapter_names: unknown adapter {unknown[0]!r}; the model has {known} (and {BASE!r})")
    return list(names)


def install_batch_hook(model: nn.Module) -> None:
    """Let model(..., adapter_names=[...]) run a mixed batch: a pre-hook takes the keyword away from the model's
    forward and hands the names to every LoRA layer; a hook after forward takes them back."""
    if getattr(model, "_adapter_names_hook", False):
        return

    def before(module, args, kwargs):
        names = kwargs.pop("adapter_names", None)
        if names is not None:
            names = check_row_names(module, names)
            for layer in lora_layers(module).values():
                layer.row_adapters = names
        return args, kwargs

    def after(module, args, output):
        for layer in lora_layers(module).values():
            layer.row_adapters = None

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, always_call=True)
    model._adapter_names_hook = True
