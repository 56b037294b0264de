"""Save and load LoRA adapters in Hugging Face PEFT's layout, so an adapter moves between the two.

    <dir>/adapter_model.safetensors   base_model.model.<module path>.lora_A.weight  (r, in)
                                      base_model.model.<module path>.lora_B.weight  (out, r)
    <dir>/adapter_config.json         peft_type, r, lora_alpha, lora_dropout, target_modules, ...

Layers whose rank or alpha differ from r / lora_alpha are listed in rank_pattern / alpha_pattern, read as PEFT
reads them: the first key k with the module name matching (.*\\.)?(k)$ gives that layer's value.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from .runs.files import atomic_write, atomic_write_json
from .inject import add_lora, all_or_nothing, find_targets, lora_layers

PREFIX = "base_model.model."
# PEFT settings that change what the adapter computes and that minilora does not implement: each must be unset
UNSUPPORTED = ("use_dora", "lora_bias", "use_qalora", "layers_to_transform", "layer_replication", "modules_to_save",
               "trainable_token_indices", "target_parameters", "exclude_modules", "alora_invocation_tokens")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's key names."""
    sd = {}
    for name, layer in lora_layers(model).items():
        sd[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous()
        sd[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous()
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


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_model.safetensors + adapter_config.json (each atomically). task_type is CAUSAL_LM for a
    model with an lm_head (a causal language model), else null."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: model has no LoRA layers (call add_lora first)")
    first = next(iter(layers.values()))
    if len({l.use_rslora for l in layers.values()}) > 1:
        raise ValueError("save_adapter: the layers mix use_rslora True and False; PEFT's format has one setting")
    causal = isinstance(getattr(model, "lm_head", None), nn.Module)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if causal else None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r, "lora_alpha": first.alpha, "use_rslora": first.use_rslora,
        "lora_dropout": getattr(first.lora_dropout, "p", 0.0), "bias": "none",
        "target_modules": _target_modules(model, set(layers)),
        "rank_pattern": {re.escape(n): l.r for n, l in layers.items() if l.r != first.r},
        "alpha_pattern": {re.escape(n): l.alpha for n, l in layers.items() if l.alpha != first.alpha},
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layers_to_transform": None, "modules_to_save": None,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = adapter_state_dict(model)
    atomic_write(path / "adapter_model.safetensors", lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
    atomic_write_json(path / "adapter_config.json", config)


def read_adapter_config(path: str | os.PathLike) -> dict:
    """<path>/adapter_config.json, checked: a JSON object describing a plain LoRA adapter minilora can build."""
    f = Path(path) / "adapter_config.json"
    if not f.is_file():
        raise FileNotFoundError(f"load_adapter: {f} not found")
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"load_adapter: {f} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"load_adapter: {f} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"load_adapter: {f} has peft_type {config.get('peft_type')!r}, expected 'LORA'")
    for key in ("target_modules", "r", "lora_alpha"):
        if key not in config:
            raise ValueError(f"load_adapter: {f} lacks {key!r}")
    tm = config["target_modules"]
    if not ((isinstance(tm, str) and tm) or (isinstance(tm, list) and tm and all(isinstance(t, str) for t in tm))):
        raise ValueError(f"load_adapter: {f}: target_modules must be a pattern or a non-empty list of module "
                         f"names, got {tm!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise ValueError(f"load_adapter: {f}: {key} must be an object (module pattern -> value)")
    ranks = [config["r"], *(config.get("rank_pattern") or {}).values()]
    if any(isinstance(r, bool) or not isinstance(r, int) or r <= 0 for r in ranks):
        raise ValueError(f"load_adapter: {f}: r / rank_pattern values must be positive ints, got {ranks}")
    alphas = [config["lora_alpha"], *(config.get("alpha_pattern") or {}).values()]
    if any(isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0 for a in alphas):
        raise ValueError(f"load_adapter: {f}: lora_alpha / alpha_pattern values must be finite numbers > 0, "
                         f"got {alphas}")
    d = config.get("lora_dropout", 0.0)
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
        raise ValueError(f"load_adapter: {f}: lora_dropout must be a number in [0, 1), got {d!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"load_adapter: {f}: use_rslora must be true or false, got {config['use_rslora']!r}")
    if config.get("bias", "none") != "none":
        raise ValueError(f"load_adapter: {f} has bias {config['bias']!r}; minilora adapters train no biases")
    for key in UNSUPPORTED:
        if config.get(key):
            raise ValueError(f"load_adapter: {f} sets {key}={config[key]!r}, which minilora does not implement")
    return config


def _check_settings(layers: dict, config: dict, where: Path) -> None:
    """Each LoRA layer already in the model must have the r, lora_alpha and use_rslora the adapter was made with."""
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for name, layer in layers.items():
        if getattr(layer, "merged", False):
            raise ValueError(f"load_adapter: {name} has its adapter merged into the weight; unmerge() it first")
        want = {"r": pattern_value(ranks, name, config["r"]),
                "lora_alpha": pattern_value(alphas, name, config["lora_alpha"]),
                "use_rslora": config.get("use_rslora", False)}
        have = {"r": layer.r, "lora_alpha": layer.alpha, "use_rslora": layer.use_rslora}
        for key in want:
            if have[key] != want[key]:
                raise ValueError(f"load_adapter: {name} has {key}={have[key]!r} but {where} says "
                                 f"{key}={want[key]!r}")


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a PEFT-layout adapter into model; every key, shape and setting must fit. A model without LoRA
    layers gets them first (rank_pattern / alpha_pattern honoured); a model that has them must have the
    adapter's r, lora_alpha and use_rslora. On any error the model is left exactly as it was."""
    from safetensors.torch import load_file

    path = Path(path)
    config = read_adapter_config(path)
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"load_adapter: {weights} not found")
    sd = load_file(str(weights))
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    new = [] if lora_layers(model) else find_targets(model, config["target_modules"])
    with all_or_nothing(model, new):
        groups: dict[tuple, list[str]] = {}
        for name in new:
            key = (pattern_value(ranks, name, config["r"]), pattern_value(alphas, name, config["lora_alpha"]))
            groups.setdefault(key, []).append(re.escape(name))
        for (r, alpha), names in groups.items():
            add_lora(model, names, r=r, alpha=alpha, dropout=config.get("lora_dropout", 0.0),
                     use_rslora=config.get("use_rslora", False))
        layers = lora_layers(model)
        _check_settings(layers, config, path / "adapter_config.json")
        pairs = []  # check every key before copying any, so a bad file leaves the model untouched
        for name, layer in layers.items():
            for part in ("lora_A", "lora_B"):
                key = f"{PREFIX}{name}.{part}.weight"
                if key not in sd:
                    raise KeyError(f"load_adapter: {weights} has no tensor {key!r}")
                param = getattr(layer, part)
                if sd[key].shape != param.shape:
                    raise ValueError(f"load_adapter: {key} has shape {tuple(sd[key].shape)}, "
                                     f"model expects {tuple(param.shape)}")
                pairs.append((param, sd[key]))
        extra = sorted(set(sd) - {f"{PREFIX}{n}.{part}.weight" for n in layers for part in ("lora_A", "lora_B")})
        if extra:
            raise KeyError(f"load_adapter: {extra[0]!r} in {weights} matches no LoRA layer of the model")
    with torch.no_grad():
        for param, value in pairs:
            param.copy_(value)
    return model
