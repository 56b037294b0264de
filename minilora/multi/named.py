"""Many named adapters on one frozen base: each LoRA layer has one adapter mounted and the others parked.

The mounted adapter is the layer's own lora_A / lora_B (and DoRA's lora_magnitude_vector): the one forward
uses and training moves. The others wait frozen in layer.parked_adapters (name -> ParkedAdapter) until
set_adapter swaps them in. Tensors move, never copy, so an optimizer holding them keeps working.

    add_lora(model, targets, adapter_name="shout")    a second adapter, parked (the active one stays active)
    set_adapter(model, "shout")                        mounted in every layer that has it; the rest run the base
    with disable_adapters(model): ...                  the base model alone
    delete_adapter(model, "shout"), merge_lora(model, adapter_name="shout")
    model(idx, adapter_names=["default", "shout", "__base__"])    a mixed batch (mixed_batch.py)

This file is the per-layer machinery; the model-level functions are in switch.py (and add_lora, merge_lora
in inject.py).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch.nn as nn

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
SETTINGS = ("r", "alpha", "scaling", "use_rslora", "init", "loftq_iter")


class ParkedAdapter(nn.Module):
    """An adapter waiting beside a LoRA layer: its tensors (A, B, DoRA's magnitude) and settings (r, alpha, ...)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.name = layer.adapter_name
        self.A, self.B = layer.lora_A, layer.lora_B
        self.magnitude = getattr(layer, "lora_magnitude_vector", None)
        self.lora_dropout = layer.lora_dropout
        self.settings = {k: getattr(layer, k, None) for k in SETTINGS}
        for p in self.parameters():
            p.requires_grad_(False)


def parked(layer: nn.Module) -> nn.ModuleDict:
    """layer.parked_adapters, created empty on first use."""
    if not isinstance(getattr(layer, "parked_adapters", None), nn.ModuleDict):
        layer.parked_adapters = nn.ModuleDict()
    return layer.parked_adapters


def names_on(layer: nn.Module) -> list[str]:
    """The adapters this layer carries: the mounted one first."""
    return [layer.adapter_name, *getattr(layer, "parked_adapters", {}).keys()]


def adapter_view(layer: nn.Module, name: str) -> SimpleNamespace | None:
    """Adapter `name` on this layer (mounted or parked) as one record: A, B, magnitude (None unless DoRA),
    lora_dropout and its settings; None when the layer does not carry it."""
    if name == layer.adapter_name:
        return SimpleNamespace(name=name, A=layer.lora_A, B=layer.lora_B, lora_dropout=layer.lora_dropout,
                               magnitude=getattr(layer, "lora_magnitude_vector", None),
                               **{k: getattr(layer, k, None) for k in SETTINGS})
    if name not in names_on(layer):
        return None
    p = parked(layer)[name]
    return SimpleNamespace(name=name, A=p.A, B=p.B, magnitude=p.magnitude, lora_dropout=p.lora_dropout, **p.settings)


def adapter_records(layer: nn.Module) -> list[SimpleNamespace]:
    """adapter_view of every adapter the layer carries."""
    return [adapter_view(layer, n) for n in names_on(layer)]


def mount(layer: nn.Module, name: str) -> None:
    """Swap the parked adapter `name` in and park the one that was mounted."""
    incoming = parked(layer)[name]
    del parked(layer)[name]
    outgoing = ParkedAdapter(layer)
    layer.lora_A, layer.lora_B, layer.lora_dropout = incoming.A, incoming.B, incoming.lora_dropout
    if incoming.magnitude is not None or hasattr(layer, "lora_magnitude_vector"):  # None: plain LoRA on a DoRA layer
        layer.lora_magnitude_vector = incoming.magnitude
    for key, value in incoming.settings.items():
        setattr(layer, key, value)
    layer.adapter_name = name
    parked(layer)[outgoing.name] = outgoing


def park_new(layer: nn.Module, fresh: nn.Module) -> None:
    """Park the adapter of `fresh` (a new LoRA layer around the same base) beside layer's."""
    parked(layer)[fresh.adapter_name] = ParkedAdapter(fresh)


def adopt(fresh: nn.Module, layer: nn.Module) -> nn.Module:
    """A DoRA layer `fresh` (around layer's base, its own new DoRA adapter mounted) takes over the plain LoRA
    layer's adapters, parked beside its own; returns fresh, which replaces layer in the model. A plain adapter
    mounted on a DoRA layer runs without a magnitude (variants/dora.py)."""
    parked(fresh)[layer.adapter_name] = ParkedAdapter(layer)
    for name, adapter in list(getattr(layer, "parked_adapters", {}).items()):
        parked(fresh)[name] = adapter
    return fresh


def set_trainable(layer: nn.Module) -> None:
    """The mounted adapter trains when it is on; parked ones never do."""
    for p in (layer.lora_A, layer.lora_B, getattr(layer, "lora_magnitude_vector", None)):
        if p is not None:
            p.requires_grad_(not layer.disabled)


def install_batch_hook(model: nn.Module, lora_layers, check_names) -> None:
    """Let model(..., adapter_names=[...]) run a mixed batch: a pre-hook takes the keyword away from the model's
    forward and hands the names to every LoRA layer (row_adapters); a hook after forward takes them back.
    lora_layers(model) lists the layers; check_names(model, names) validates the names."""
    if getattr(model, "_adapter_names_hook", False):
        return

    def before(module, args, kwargs):
        names = kwargs.pop("adapter_names", None)
        if names is not None:
            names = check_names(module, names)
            for layer in lora_layers(module).values():
                layer.row_adapters = names
        return args, kwargs

    def after(module, args, output):
        for layer in lora_layers(module).values():
            layer.row_adapters = None

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, always_call=True)
    model._adapter_names_hook = True
