"""Save and load LoRA adapters in Hugging Face PEFT's layout, so an adapter moves between the two.

    <dir>/adapter_model.safetensors   base_model.model.<module path>.lora_A.weight  (r, in)
                                      base_model.model.<module path>.lora_B.weight  (out, r)
    <dir>/adapter_config.json         peft_type, r, lora_alpha, lora_dropout, target_modules, ...
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from .inject import add_lora, lora_layers

PREFIX = "base_model.model."


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


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


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write adapter_model.safetensors + adapter_config.json (each atomically)."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: model has no LoRA layers (call add_lora first)")
    first = next(iter(layers.values()))
    ranks = {n: l.r for n, l in layers.items()}
    alphas = {n: l.alpha for n, l in layers.items()}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": first.r, "lora_alpha": first.alpha, "use_rslora": first.use_rslora,
        "lora_dropout": getattr(first.lora_dropout, "p", 0.0), "bias": "none",
        "target_modules": _target_modules(model, set(layers)),
        "rank_pattern": {n: r for n, r in ranks.items() if r != first.r},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != first.alpha},
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layers_to_transform": None, "modules_to_save": None,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write(path / "adapter_model.safetensors",
                  lambda p: save_file(adapter_state_dict(model), str(p), metadata={"format": "pt"}))
    _atomic_write(path / "adapter_config.json", lambda p: p.write_text(json.dumps(config, indent=2)))


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a PEFT-layout adapter into model (adding LoRA layers first if it has none); every key must fit."""
    from safetensors.torch import load_file

    path = Path(path)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / f).is_file():
            raise FileNotFoundError(f"load_adapter: {path / f} not found")
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"load_adapter: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("load_adapter: per-module rank_pattern / alpha_pattern is not supported")
    sd = load_file(str(path / "adapter_model.safetensors"))
    if not lora_layers(model):
        add_lora(model, config["target_modules"], r=config["r"], alpha=config["lora_alpha"],
                 dropout=config.get("lora_dropout", 0.0), use_rslora=config.get("use_rslora", False))
    layers = lora_layers(model)
    pairs = []  # check every key before copying any, so a bad file leaves the model untouched
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            key = f"{PREFIX}{name}.{part}.weight"
            if key not in sd:
                raise KeyError(f"load_adapter: {path.name} has no tensor {key!r}")
            param = getattr(layer, part)
            if sd[key].shape != param.shape:
                raise ValueError(f"load_adapter: {key} has shape {tuple(sd[key].shape)}, "
                                 f"model expects {tuple(param.shape)}")
            pairs.append((param, sd[key]))
    extra = sorted(set(sd) - {f"{PREFIX}{n}.{part}.weight" for n in layers for part in ("lora_A", "lora_B")})
    if extra:
        raise KeyError(f"load_adapter: {extra[0]!r} matches no LoRA layer of the model")
    with torch.no_grad():
        for param, value in pairs:
            param.copy_(value)
    return model
