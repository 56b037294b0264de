"""Save and load LoRA adapters in Hugging Face PEFT's layout, so an adapter moves between the two.

    <dir>/adapter_model.safetensors   base_model.model.<module path>.lora_A.weight  (r, in)
                                      base_model.model.<module path>.lora_B.weight  (out, r)
                                      base_model.model.<module path>.lora_magnitude_vector  (out,)  DoRA only
    <dir>/adapter_config.json         peft_type, r, lora_alpha, lora_dropout, target_modules, use_dora, ...
    <dir>/<name>/...                  the same for every other named adapter ("default" lives in <dir>)

PiSSA and LoftQ adapters say so in init_lora_weights ("pissa", "loftq" with loftq_config): as in PEFT, the base
they load onto is the original model, and loading repeats the (deterministic) split of its weights. An adapter
made on a 2-bit (NF2) base says so in quantized_base_bits: 2 (and LoftQ's loftq_bits), so that
load_qlora_adapter rebuilds the same base; PEFT ignores the key (with a warning).

Layers whose rank or alpha differ from r / lora_alpha are listed in rank_pattern / alpha_pattern, read as PEFT
reads them: the first key k with the module name matching (.*\\.)?(k)$ gives that layer's value.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from .runs.files import atomic_write, atomic_write_json, read_safetensors, safetensors_bytes
from .inject import active_adapter, adapter_names, add_lora, all_or_nothing, find_targets, lora_layers
from .hf.peft_config import read_adapter_config
from .multi.named import adapter_view
from .multi.switch import delete_adapter
from .quant.nf2 import check_bits

PREFIX = "base_model.model."


INITS = ("pissa", "loftq")  # the inits that init_lora_weights names (any other is saved as true)


def views(model: nn.Module, adapter_name: str | None = None) -> dict:
    """Module name -> adapter record (multi.named.adapter_view) of one adapter: adapter_name, else the active
    one (else the only one)."""
    names = adapter_names(model)
    if adapter_name is None:
        adapter_name = active_adapter(model) or (names[0] if len(names) == 1 else None)
        if adapter_name is None:
            raise ValueError(f"the model has adapters {names} and none is active: name one (adapter_name=)")
    if adapter_name not in names:
        raise ValueError(f"no adapter named {adapter_name!r}; the model has {names}")
    found = {n: adapter_view(layer, adapter_name) for n, layer in lora_layers(model).items()}
    return {n: v for n, v in found.items() if v is not None}


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's key names (default: the active adapter)."""
    sd = {}
    for name, v in views(model, adapter_name).items():
        sd[f"{PREFIX}{name}.lora_A.weight"] = v.A.detach().cpu().contiguous()
        sd[f"{PREFIX}{name}.lora_B.weight"] = v.B.detach().cpu().contiguous()
        if v.magnitude is not None:
            sd[f"{PREFIX}{name}.lora_magnitude_vector"] = v.magnitude.detach().cpu().contiguous()
    return sd


def _target_modules(model: nn.Module, wrapped: set[str]) -> list[str] | str:
    """Short names ("c_attn") when they select exactly the wrapped layers, else one regex of the full names."""
    short = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    selected = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in short}
    if selected == wrapped:
        return short
    return "(" + "|".join(re.escape(n) for n in sorted(wrapped)) + ")"


def pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first key k with name matching (.*\\.)?(k)$, else default."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None,
                 adapter_name: str | None = None) -> None:
    """Write adapter_model.safetensors + adapter_config.json (each atomically) for every adapter of the model
    (or only adapter_name), in PEFT's layout: "default" in path, any other name in path/<name>. task_type is
    CAUSAL_LM for a model with an lm_head (a causal language model), else null."""
    if not lora_layers(model):
        raise ValueError("save_adapter: model has no LoRA layers (call add_lora first)")
    for name in adapter_names(model) if adapter_name is None else [adapter_name]:
        folder = Path(path) if name == "default" else Path(path) / name
        _save_one(model, folder, name, base_model_name_or_path)


def _save_one(model: nn.Module, path: Path, adapter_name: str, base_model_name_or_path: str | None) -> None:
    layers = views(model, adapter_name)
    first = next(iter(layers.values()))
    special = {(v.init, v.loftq_iter) for v in layers.values() if v.init in INITS}  # a tied head may start plain
    if len({v.use_rslora for v in layers.values()}) > 1 or len(special) > 1:
        raise ValueError(f"save_adapter: the layers of {adapter_name!r} mix use_rslora or init settings; PEFT's "
                         f"format has one of each")
    init, loftq_iter = special.pop() if special else (True, None)
    if len({v.magnitude is None for v in layers.values()}) > 1:
        raise ValueError(f"save_adapter: {adapter_name!r} uses DoRA on some layers only; PEFT's format has one "
                         f"use_dora")
    bits = {getattr(lora_layers(model)[n].base_layer, "bits", None) for n in layers} - {None}  # quantized bases
    if len(bits) > 1:
        raise ValueError(f"save_adapter: {adapter_name!r} sits on bases of {sorted(bits)} bits; one adapter file "
                         f"records one")
    bits = bits.pop() if bits else 4
    causal = isinstance(getattr(model, "lm_head", None), nn.Module)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if causal else None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r, "lora_alpha": first.alpha, "use_rslora": first.use_rslora,
        "lora_dropout": getattr(first.lora_dropout, "p", 0.0), "bias": "none",
        "target_modules": _target_modules(model, set(layers)),
        "rank_pattern": {re.escape(n): v.r for n, v in layers.items() if v.r != first.r},
        "alpha_pattern": {re.escape(n): v.alpha for n, v in layers.items() if v.alpha != first.alpha},
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": init,
        "loftq_config": {"loftq_bits": bits, "loftq_iter": loftq_iter} if init == "loftq" else {},
        "use_dora": first.magnitude is not None, "layers_to_transform": None, "modules_to_save": None,
    }
    if bits != 4:
        config["quantized_base_bits"] = bits
    path.mkdir(parents=True, exist_ok=True)
    sd = adapter_state_dict(model, adapter_name)
    atomic_write(path / "adapter_model.safetensors", safetensors_bytes(sd))
    atomic_write_json(path / "adapter_config.json", config)


def base_bits(config: dict, adapter_dir, bits: int | None = None) -> int:
    """The bits of the base an adapter was made on: its config's quantized_base_bits (or LoftQ's loftq_bits),
    else `bits`, else 4. A `bits` that contradicts the config is refused."""
    loftq = config.get("loftq_config") or {}
    saved = config.get("quantized_base_bits", loftq.get("loftq_bits") if config.get("init_lora_weights") == "loftq"
                       else None)
    if saved is not None:
        check_bits(saved, f"load_qlora_adapter: {adapter_dir}: quantized_base_bits / loftq_bits")
        if bits is not None and bits != saved:
            raise ValueError(f"load_qlora_adapter: bits={bits} but {adapter_dir} was made on a {saved}-bit base")
    return check_bits(saved or bits or 4)


def _check_settings(layers: dict, config: dict, where: Path) -> None:
    """Each layer's adapter must have the r, lora_alpha, use_rslora and use_dora the adapter was made with."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for name, v in layers.items():
        want = {"r": pattern_value(ranks, name, config["r"]),
                "lora_alpha": pattern_value(alphas, name, config["lora_alpha"]),
                "use_rslora": config.get("use_rslora", False), "use_dora": bool(config.get("use_dora", False))}
        have = {"r": v.r, "lora_alpha": v.alpha, "use_rslora": v.use_rslora, "use_dora": v.magnitude is not None}
        for key in want:
            if have[key] != want[key]:
                raise ValueError(f"load_adapter: {name} has {key}={have[key]!r} but {where} says "
                                 f"{key}={want[key]!r}")


def _new_adapter(model: nn.Module, config: dict, adapter_name: str) -> None:
    """Add the adapter the config describes (rank_pattern / alpha_pattern honoured) under adapter_name."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    names = find_targets(model, config["target_modules"])
    dense = {n: isinstance(getattr(model.get_submodule(n), "weight", None), torch.Tensor) for n in names}
    if config.get("init_lora_weights") == "loftq" and all(dense.values()):
        raise ValueError("load_adapter: a LoftQ adapter belongs on the NF4 base it was made with: load_qlora_adapter")
    groups: dict[tuple, list[str]] = {}
    for name in names:  # PiSSA splits a dense weight again; an NF4 base was quantized from the split already
        init = "pissa" if config.get("init_lora_weights") == "pissa" and dense[name] else "kaiming"
        key = (pattern_value(ranks, name, config["r"]), pattern_value(alphas, name, config["lora_alpha"]), init)
        groups.setdefault(key, []).append(re.escape(name))
    for (r, alpha, init), group in groups.items():
        add_lora(model, group, r=r, alpha=alpha, dropout=config.get("lora_dropout", 0.0), init=init,
                 use_rslora=config.get("use_rslora", False), use_dora=bool(config.get("use_dora", False)),
                 adapter_name=adapter_name)


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Load a PEFT-layout adapter (one folder) into model as adapter_name; every key, shape and setting must fit.
    If the model has no adapter of that name it gets one first (beside any others, which stay active); if it
    has, that adapter must have the file's r, lora_alpha, use_rslora and use_dora. A PiSSA adapter loads onto
    the original weights, split again. A weight that is inf or NaN is refused. On any error the model is left exactly as it was."""
    path = Path(path)
    config = read_adapter_config(path)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"load_adapter: {weights} not found")
    sd = read_safetensors(weights, "load_adapter")
    for key, t in sd.items():  # an inf or NaN weight would only give garbage
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"load_adapter: {weights} holds inf or NaN in {key!r}")
    created = adapter_name not in adapter_names(model)
    new = find_targets(model, config["target_modules"]) if created else []
    if any(getattr(l, "merged", False) for l in lora_layers(model).values()):
        raise ValueError("load_adapter: a layer has its adapter merged into the weight; unmerge() it first")
    with all_or_nothing(model, new), _removed_on_error(model, adapter_name if created else None):
        if created:
            _new_adapter(model, config, adapter_name)
        layers = views(model, adapter_name)
        _check_settings(layers, config, path / "adapter_config.json")
        pairs, expected = [], set()  # check every key before copying any, so a bad file leaves the model untouched
        for name, v in layers.items():
            parts = {"lora_A.weight": v.A, "lora_B.weight": v.B}
            if v.magnitude is not None:
                parts["lora_magnitude_vector"] = v.magnitude
            for part, param in parts.items():
                key = f"{PREFIX}{name}.{part}"
                expected.add(key)
                if key not in sd:
                    raise KeyError(f"load_adapter: {weights} has no tensor {key!r}")
                if sd[key].shape != param.shape:
                    raise ValueError(f"load_adapter: {key} has shape {tuple(sd[key].shape)}, "
                                     f"model expects {tuple(param.shape)}")
                pairs.append((param, sd[key]))
        extra = sorted(set(sd) - expected)
        if extra:
            raise KeyError(f"load_adapter: {extra[0]!r} in {weights} matches no LoRA layer of the model")
    with torch.no_grad():
        for param, value in pairs:
            param.copy_(value)
    return model


@contextmanager
def _removed_on_error(model: nn.Module, adapter_name: str | None):
    """On an exception, delete the adapter the block was adding beside others (all_or_nothing puts back the
    layers that were wrapped; an adapter parked in an existing layer is taken out here)."""
    try:
        yield
    except BaseException:
        if adapter_name is not None and adapter_name in adapter_names(model):
            delete_adapter(model, adapter_name)
        raise
