"""Switching between the named adapters on one base: set_adapter, disable_adapters, delete_adapter, adapter_batch.

Each LoRA layer holds one adapter mounted and the others parked (named.py); these functions act on
every layer of a model at once, with PEFT's meaning: set_adapter picks the adapter forward uses and training
moves, disable_adapters gives the base model for the length of a block, delete_adapter removes one for good.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn

from ..inject import activate, active_adapter, adapter_names, check_row_names, lora_layers, set_submodule
from .named import mount, parked


def set_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the adapter forward uses (and the only one that trains); layers without it run the base."""
    if name not in adapter_names(model):
        raise ValueError(f"set_adapter: no adapter named {name!r}; the model has {adapter_names(model)}")
    if any(layer.merged for layer in lora_layers(model).values()):
        raise RuntimeError("set_adapter: a layer has its adapter merged into the weight; unmerge() it first")
    activate(model, name)


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
    if name not in adapter_names(model):
        raise ValueError(f"delete_adapter: no adapter named {name!r}; the model has {adapter_names(model)}")
    active = active_adapter(model)
    for path, layer in lora_layers(model).items():
        if layer.adapter_name == name and not parked(layer):
            set_submodule(model, path, layer.base_layer)
            continue
        if layer.adapter_name == name:
            mount(layer, next(iter(parked(layer))))
        if name in parked(layer):
            del parked(layer)[name]
    rest = adapter_names(model)
    if rest:
        activate(model, active if active in rest else rest[0])


@contextmanager
def adapter_batch(model: nn.Module, names: list[str]):
    """Inside the block, example i of every batch goes through adapter names[i] ("__base__": none), as
    model(idx, adapter_names=names) does for one call; useful around a loop such as GPT.generate."""
    names = check_row_names(model, names)
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.row_adapters = names
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_adapters = None
