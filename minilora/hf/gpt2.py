"""GPT-2 checkpoints in Hugging Face's layout: a directory holding config.json + model.safetensors.

config.json's GPT-2 fields map onto GPTConfig's (n_positions -> block_size, ...; FIELDS, both ways). A field
that changes the model's arithmetic and that minilora does not implement is refused by name, so a checkpoint
never loads into a different model silently. GPT-2 stores its projections as Conv1D, weight (in, out);
minilora's nn.Linear holds (out, in), so those four weights are transposed on the way in and out.

This module deals in config dicts and state dicts only: GPT.from_pretrained and GPT.save_pretrained (gpt.py)
call it, and it imports nothing of the model.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from ..runs.files import atomic_write, atomic_write_json

LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # GPT-2's four linear layers per block
CONV1D = tuple(f"{name}.weight" for name in LINEARS)                 # stored (in, out) by GPT-2
# config.json field -> GPTConfig field (these fields, from config.json, decide the arithmetic)
FIELDS = {"n_positions": "block_size", "vocab_size": "vocab_size", "n_layer": "n_layer", "n_head": "n_head",
          "n_embd": "n_embd", "layer_norm_epsilon": "layer_norm_epsilon",
          "activation_function": "activation_function", "scale_attn_weights": "scale_attn_weights",
          "scale_attn_by_inverse_layer_idx": "scale_attn_by_inverse_layer_idx",
          "tie_word_embeddings": "tie_word_embeddings"}
REQUIRED = ("vocab_size", "n_layer", "n_head", "n_embd")
# minilora-only settings kept under "minilora" in config.json (GPT-2 has no field for them)
OWN = ("dropout", "bias", "gradient_checkpointing", "checkpoint_segments")


def _refuse_unsupported(hf: dict, where: Path, activations: Iterable[str]) -> None:
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
    if act not in activations:
        raise ValueError(f"from_pretrained: {where} has activation_function {act!r}; minilora implements "
                         f"{', '.join(sorted(activations))}")


def config_from_hf(hf: dict, where: Path, activations: Iterable[str]) -> dict:
    """The GPTConfig fields a GPT-2 config.json describes (after refusing what minilora does not implement;
    activations: the MLP nonlinearities the model implements)."""
    if not isinstance(hf, dict):
        raise ValueError(f"from_pretrained: {where} must hold a JSON object, got {type(hf).__name__}")
    _refuse_unsupported(hf, where, activations)
    cfg = {ours: hf[theirs] for theirs, ours in FIELDS.items() if theirs in hf}
    own = hf.get("minilora", {})
    cfg.update({k: own[k] for k in OWN if isinstance(own, dict) and k in own})
    return cfg


def read_gpt2(path: str | os.PathLike, activations: Iterable[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(GPTConfig fields, state dict in minilora's names and (out, in) orientation) of a local GPT-2 directory.
    Causal-mask buffers of older checkpoints are dropped."""
    from safetensors.torch import load_file

    path = Path(path)
    for f in ("config.json", "model.safetensors"):
        if not (path / f).is_file():
            raise FileNotFoundError(f"from_pretrained: {path / f} not found (expected a GPT-2 directory)")
    try:
        hf = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"from_pretrained: {path / 'config.json'} is not valid JSON ({e})") from None
    cfg = config_from_hf(hf, path / "config.json", activations)
    sd = {}
    for key, value in load_file(str(path / "model.safetensors")).items():
        key = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
        if not key.endswith((".attn.bias", ".attn.masked_bias")):
            sd[key] = value.t() if key.endswith(CONV1D) else value
    return cfg, sd


def copy_into(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], path: str | os.PathLike,
              tied: bool) -> None:
    """Copy a read_gpt2 state dict into a model's own tensors (its state_dict()), key by key, shapes checked;
    with tied embeddings lm_head.weight is wte's (as transformers reads it)."""
    path = Path(path)
    for key, value in sd.items():
        if tied and key == "lm_head.weight":
            continue
        if key not in own:
            raise KeyError(f"from_pretrained: unexpected key {key!r} in {path / 'model.safetensors'}")
        if value.shape != own[key].shape:
            raise ValueError(f"from_pretrained: {key} has shape {tuple(value.shape)}, "
                             f"expected {tuple(own[key].shape)}")
        with torch.no_grad():
            own[key].copy_(value)
    missing = [k for k in own if not (tied and k == "lm_head.weight") and k not in sd]
    if missing:
        raise KeyError(f"from_pretrained: {path} lacks {missing[:3]}{'...' if len(missing) > 3 else ''}"
                       + (" (tie_word_embeddings is false: the head is its own matrix)" if not tied else ""))


def _refuse_adapters(tensors: dict[str, torch.Tensor]) -> None:
    """A model with LoRA or NF4 layers has no GPT-2 layout: name the first such layer, and the merge that
    gives it one. Told apart by their tensors' names: lora_A (LoRA), lora_A beside an NF4 base (QLoRA),
    packed (NF4)."""
    for key in tensors:
        layer, _, leaf = key.rpartition(".")
        if leaf == "lora_A":
            q = f"{layer}.base_layer.packed" in tensors
            raise ValueError(f"save_pretrained: {layer} is a {'QLoRA' if q else 'LoRA'} layer; a GPT-2 checkpoint "
                             f"holds dense weights only: {'merge_qlora' if q else 'merge_lora'}(model) first "
                             f"(or save just the adapter with save_adapter)")
        if leaf == "packed" and f"{layer.removesuffix('.base_layer')}.lora_A" not in tensors:
            raise ValueError(f"save_pretrained: {layer} is an NF4 layer; a GPT-2 checkpoint holds dense weights "
                             f"only: merge_qlora(model) first (without requantize, it dequantizes)")


def save_gpt2(config: dict, tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """config.json + model.safetensors in GPT-2's layout (Conv1D weights transposed back), each atomically.
    config: GPTConfig's fields as a dict; tensors: every parameter and buffer by name, minilora's layout
    (a tied lm_head.weight is left out when config["tie_word_embeddings"])."""
    from safetensors.torch import save_file

    _refuse_adapters(tensors)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tied = config["tie_word_embeddings"]
    sd = {}
    for key, value in tensors.items():
        if tied and key == "lm_head.weight":
            continue
        value = value.detach().cpu()
        sd[key] = (value.t() if key.endswith(CONV1D) else value).contiguous()
    hf = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=config["block_size"],
              **{theirs: config[ours] for theirs, ours in FIELDS.items()}, minilora=dict(config))
    atomic_write(path / "model.safetensors", lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(path / "config.json", hf)
