"""adapter_config.json, read and checked: PEFT's settings for a LoRA (or DoRA) adapter that minilora can build.

Machinery for adapters.py: every field that changes what the adapter computes is checked here, and a setting
minilora does not implement is refused by name rather than ignored.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from ..runs.files import read_json_object

# PEFT settings that change what the adapter computes and that minilora does not implement: each must be unset
UNSUPPORTED = ("lora_bias", "use_qalora", "layers_to_transform", "layer_replication", "modules_to_save",
               "trainable_token_indices", "target_parameters", "exclude_modules", "alora_invocation_tokens")


def read_adapter_config(path: str | os.PathLike) -> dict:
    """<path>/adapter_config.json, checked: a JSON object describing a LoRA (or DoRA) adapter minilora can build."""
    f = Path(path) / "adapter_config.json"
    config = read_json_object(f, "load_adapter")
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
    init = config.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in ("gaussian", "pissa", "loftq")):
        raise ValueError(f"load_adapter: {f} has init_lora_weights={init!r}; minilora rebuilds true, false, "
                         f"'gaussian', 'pissa' and 'loftq' (the others change the base weights in other ways)")
    if not isinstance(config.get("use_dora", False), bool):
        raise ValueError(f"load_adapter: {f}: use_dora must be true or false, got {config['use_dora']!r}")
    for key in UNSUPPORTED:
        if config.get(key):
            raise ValueError(f"load_adapter: {f} sets {key}={config[key]!r}, which minilora does not implement")
    return config
