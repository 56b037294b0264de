"""GPT-2 checkpoints in Hugging Face's layout: a directory holding config.json + model.safetensors.

config.json's GPT-2 fields map onto GPTConfig (n_positions -> block_size, ...). A field that changes the
model's arithmetic and that minilora does not implement is refused by name, so a checkpoint never loads into
a different model silently. GPT-2 stores its projections as Conv1D, weight (in, out); minilora's nn.Linear
holds (out, in), so those four weights are transposed on the way in and out.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn as nn

from .files import atomic_write, atomic_write_json
from .gpt import ACTIVATIONS, GPTConfig

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# config.json field -> GPTConfig field (these fields, from config.json, decide the arithmetic)
FIELDS = {"n_positions": "block_size", "vocab_size": "vocab_size", "n_layer": "n_layer", "n_head": "n_head",
          "n_embd": "n_embd", "layer_norm_epsilon": "layer_norm_epsilon",
          "activation_function": "activation_function", "scale_attn_weights": "scale_attn_weights",
          "scale_attn_by_inverse_layer_idx": "scale_attn_by_inverse_layer_idx",
          "tie_word_embeddings": "tie_word_embeddings"}
REQUIRED = ("vocab_size", "n_layer", "n_head", "n_embd")
# minilora-only settings kept under "minilora" in config.json (GPT-2 has no field for them)
OWN = ("dropout", "bias", "gradient_checkpointing", "checkpoint_segments")


def _refuse_unsupported(hf: dict, where: Path) -> None:
    """Refuse, by name, every config.json value whose arithmetic minilora's GPT does not implement."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"from_pretrained: {where} has model_type {hf['model_type']!r}; minilora's GPT loads "
                         f"GPT-2 checkpoints (model_type 'gpt2') only")
    for key in REQUIRED:
        if key not in hf:
            raise ValueError(f"from_pretrained: {where} lacks {key!r} (expected a GPT-2 config)")
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * hf["n_embd"]:
        raise ValueError(f"from_pretrained: {where} sets n_inner={n_inner}; minilora's MLP is 4·n_embd "
                         f"= {4 * hf['n_embd']} wide")
    if hf.get("add_cross_attention"):
        raise ValueError(f"from_pretrained: {where} sets add_cross_attention; minilora's GPT has no cross-attention")
    if hf.get("pruned_heads"):
        raise ValueError(f"from_pretrained: {where} has pruned_heads; minilora's GPT has all heads of every layer")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ValueError(f"from_pretrained: {where} has activation_function {act!r}; minilora implements "
                         f"{', '.join(sorted(ACTIVATIONS))}")


def config_from_hf(hf: dict, where: Path, **overrides) -> GPTConfig:
    """The GPTConfig a GPT-2 config.json describes (after refusing what minilora does not implement)."""
    if not isinstance(hf, dict):
        raise ValueError(f"from_pretrained: {where} must hold a JSON object, got {type(hf).__name__}")
    _refuse_unsupported(hf, where)
    cfg = {ours: hf[theirs] for theirs, ours in FIELDS.items() if theirs in hf}
    own = hf.get("minilora", {})
    cfg.update({k: own[k] for k in OWN if isinstance(own, dict) and k in own})
    names = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"from_pretrained: unknown GPTConfig field {unknown[0]!r}")
    return GPTConfig(**(cfg | overrides))


def load_gpt2(cls, path: str | os.PathLike, **overrides) -> nn.Module:
    """cls(config) with the weights of a local GPT-2 directory, Conv1D weights transposed (in, out) -> (out, in)."""
    from safetensors.torch import load_file

    path = Path(path)
    for f in ("config.json", "model.safetensors"):
        if not (path / f).is_file():
            raise FileNotFoundError(f"from_pretrained: {path / f} not found (expected a GPT-2 directory)")
    try:
        hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"from_pretrained: {path / 'config.json'} is not valid JSON ({e})") from None
    model = cls(config_from_hf(hf, path / "config.json", **overrides))
    tied = model.config.tie_word_embeddings
    sd = load_file(str(path / "model.safetensors"))
    sd = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in sd.items()}
    own = model.state_dict()
    for key, value in sd.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")) or (tied and key == "lm_head.weight"):
            continue  # causal-mask buffers of older checkpoints; a tied lm_head is wte (as transformers reads it)
        if key not in own:
            raise KeyError(f"from_pretrained: unexpected key {key!r} in {path / 'model.safetensors'}")
        if key.endswith(CONV1D):
            value = value.t()
        if value.shape != own[key].shape:
            raise ValueError(f"from_pretrained: {key} has shape {tuple(value.shape)}, "
                             f"expected {tuple(own[key].shape)}")
        with torch.no_grad():
            own[key].copy_(value)
    missing = [k for k in own if not (tied and k == "lm_head.weight") and k not in sd]
    if missing:
        raise KeyError(f"from_pretrained: {path} lacks {missing[:3]}{'...' if len(missing) > 3 else ''}"
                       + (" (tie_word_embeddings is false: the head is its own matrix)" if not tied else ""))
    return model


def _refuse_adapters(model: nn.Module) -> None:
    """A model with LoRA or NF4 layers has no GPT-2 layout: say which merge gives it one."""
    for name, m in model.named_modules():  # parents come first: a QLoRA layer before its NF4 base
        if isinstance(getattr(m, "lora_A", None), nn.Parameter):
            q = any(hasattr(s, "n_quantized_params") for s in m.modules())
            raise ValueError(f"save_pretrained: {name} is a {'QLoRA' if q else 'LoRA'} layer; a GPT-2 checkpoint "
                             f"holds dense weights only: {'merge_qlora' if q else 'merge_lora'}(model) first "
                             f"(or save just the adapter with save_adapter)")
        if hasattr(m, "n_quantized_params"):
            raise ValueError(f"save_pretrained: {name} is an NF4 layer; a GPT-2 checkpoint holds dense weights "
                             f"only: merge_qlora(model) first (without requantize, it dequantizes)")


def save_gpt2(model: nn.Module, path: str | os.PathLike) -> None:
    """config.json + model.safetensors in GPT-2's layout (Conv1D weights transposed back), each atomically."""
    from safetensors.torch import save_file

    _refuse_adapters(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tied = model.lm_head.weight is model.transformer.wte.weight  # what the model does, whatever was recorded
    model.config.tie_word_embeddings = tied
    c = model.config
    sd = {}
    # by attribute, not state_dict(): a sharded model (minilora.fsdp) holds its gathered tensors there
    for key, value in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if tied and key == "lm_head.weight":
            continue
        value = value.detach().cpu()
        sd[key] = (value.t() if key.endswith(CONV1D) else value).contiguous()
    hf = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size,
              n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
              n_head=c.n_head, layer_norm_epsilon=c.layer_norm_epsilon, activation_function=c.activation_function,
              scale_attn_weights=c.scale_attn_weights,
              scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
              tie_word_embeddings=tied, minilora=asdict(c))
    atomic_write(path / "model.safetensors", lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(path / "config.json", hf)
