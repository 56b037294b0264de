"""Llama-family checkpoints in Hugging Face's layout: config.json plus model.safetensors (or shards + index).

This module deals in plain data, a config dict and a state dict, and never imports the model: minilora.Llama's
from_pretrained / save_pretrained call read() and write(). config.json maps onto LlamaConfig's fields for
model types whose arithmetic is Llama's:

    llama     LlamaForCausalLM (Llama 1/2/3, TinyLlama, SmolLM, ...), rope_scaling none or Llama-3's
    mistral   the same model when it has no sliding window (null, or no shorter than the longest sequence)
    qwen2     biases on q_proj, k_proj and v_proj, none on o_proj (attention_bias=True, o_proj_bias=False)

Any other model type, and any field that would change the arithmetic in a way minilora does not implement,
is refused by name. Both ways of writing the rotary settings are read: rope_theta + rope_scaling (transformers
4, the Hub's files) and rope_parameters (transformers 5); the first is written.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..runs.files import atomic_write, atomic_write_json, read_safetensors, safetensors_bytes
from .hub import read_config

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SHAPE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "head_dim")
OWN = ("gradient_checkpointing", "checkpoint_segments")  # minilora's settings, kept under "minilora"
# fields that do not change what the model computes (ids, bookkeeping, generation defaults)
HARMLESS = {"architectures", "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
            "transformers_version", "use_cache", "initializer_range", "_name_or_path", "id2label", "label2id",
            "return_dict", "output_attentions", "output_hidden_states", "is_encoder_decoder", "problem_type",
            "chunk_size_feed_forward", "tokenizer_class", "pretraining_tp", "max_window_layers", "minilora",
            "attention_bias", "rope_theta", "rope_scaling", "rope_parameters", "hidden_act", "mlp_bias",
            "attention_dropout", "sliding_window", "use_sliding_window", "layer_types", *SHAPE}
DTYPES = {torch.float32, torch.float16, torch.bfloat16}
LLAMA3 = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(hf: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either spelling; rope types other than default and llama3 refused."""
    params = hf.get("rope_parameters") or {}
    scaling = dict(hf.get("rope_scaling") or params)
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    scaling.pop("rope_theta", None)
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"{where}: rope type {kind!r} is not implemented (minilora: default or 'llama3')")
    if sorted(scaling) != sorted(LLAMA3):
        raise ValueError(f"{where}: llama3 rope scaling needs exactly {', '.join(LLAMA3)}, got {sorted(scaling)}")
    return theta, {"rope_type": "llama3", **{k: scaling[k] for k in LLAMA3}}


def config_fields(hf: dict, where: str) -> dict:
    """LlamaConfig's fields (a dict) for a config.json dict; what minilora does not implement is refused by name."""
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise ValueError(f"{where} has model_type {kind!r}; minilora's Llama loads {', '.join(ARCHITECTURES)}")
    for key in sorted(set(hf) - HARMLESS):
        raise ValueError(f"{where} sets {key!r}, which minilora's Llama does not implement")
    arch = hf.get("architectures") or [ARCHITECTURES[kind]]
    if arch != [ARCHITECTURES[kind]]:
        raise ValueError(f"{where} has architectures {arch}; minilora's Llama is {ARCHITECTURES[kind]}")
    refuse = {"hidden_act": hf.get("hidden_act", "silu") != "silu", "mlp_bias": bool(hf.get("mlp_bias")),
              "attention_dropout": bool(hf.get("attention_dropout")),
              "use_sliding_window": bool(hf.get("use_sliding_window")),
              "layer_types": any(t != "full_attention" for t in hf.get("layer_types") or [])}
    window = hf.get("sliding_window")
    refuse["sliding_window"] = (kind == "mistral" and window is not None
                                and window < hf.get("max_position_embeddings", 2048))
    for key, bad in refuse.items():
        if bad:
            raise ValueError(f"{where} sets {key}={hf[key]!r}, which minilora's Llama does not implement "
                             f"(SiLU gate, no MLP bias, no attention dropout, no sliding window)")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ValueError(f"{where} lacks {key!r}")
    theta, scaling = _rope(hf, where)
    out = {k: hf[k] for k in SHAPE if hf.get(k) is not None}
    out.setdefault("num_key_value_heads", hf["num_attention_heads"])
    out.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    out.setdefault("rms_norm_eps", 1e-6)  # transformers' default for all three
    if "max_position_embeddings" not in out:
        raise ValueError(f"{where} lacks 'max_position_embeddings'")
    out |= {"rope_theta": theta, "rope_scaling": scaling, "tie_word_embeddings": hf.get("tie_word_embeddings", False)}
    out["attention_bias"] = kind == "qwen2" or bool(hf.get("attention_bias", False))
    out["o_proj_bias"] = kind != "qwen2" and out["attention_bias"]
    own = hf.get("minilora") or {}
    return out | {k: own[k] for k in OWN if isinstance(own, dict) and k in own}


def hf_config(cfg: dict, dtype: torch.dtype) -> dict:
    """The config.json dict for LlamaConfig's fields: model_type qwen2 where only q/k/v are biased, else llama."""
    if cfg["o_proj_bias"] and not cfg["attention_bias"]:
        raise ValueError("save_pretrained: o_proj_bias without attention_bias has no transformers model type")
    kind = "qwen2" if cfg["attention_bias"] and not cfg["o_proj_bias"] else "llama"
    out = {"architectures": [ARCHITECTURES[kind]], "model_type": kind, **{k: cfg[k] for k in SHAPE},
           "rope_theta": cfg["rope_theta"], "rope_scaling": cfg["rope_scaling"], "hidden_act": "silu",
           "torch_dtype": str(dtype).removeprefix("torch."), "minilora": {k: cfg[k] for k in OWN}}
    if kind == "llama":
        out |= {"attention_bias": cfg["attention_bias"], "mlp_bias": False}
    return out


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint a LlamaConfig (as a dict) describes, by transformers' name, with its shape."""
    C, V, F, d = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (V, C)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
                p + "self_attn.q_proj.weight": (q, C), p + "self_attn.k_proj.weight": (kv, C),
                p + "self_attn.v_proj.weight": (kv, C), p + "self_attn.o_proj.weight": (C, q),
                p + "mlp.gate_proj.weight": (F, C), p + "mlp.up_proj.weight": (F, C), p + "mlp.down_proj.weight": (C, F)}
        if cfg["attention_bias"]:
            out |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,)}
        if cfg["o_proj_bias"]:
            out[p + "self_attn.o_proj.bias"] = (C,)
    return out


def _files(path: Path) -> list[Path]:
    """The safetensors files of a directory: model.safetensors, else the shards its index names."""
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"from_pretrained: {path} has neither model.safetensors nor "
                                f"model.safetensors.index.json")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"from_pretrained: {index} is not a safetensors index ({type(e).__name__}: {e})") from None
    for name in names:
        if "/" in name or not (path / name).is_file():
            raise FileNotFoundError(f"from_pretrained: {path / name} (named in {index.name}) not found")
    return [path / n for n in names]


def read_settings(path: str | os.PathLike, caller: str = "from_pretrained") -> dict:
    """LlamaConfig's fields from a directory's (or Hub id's) config.json alone: no weights are read."""
    path, hf = read_config(path, caller)
    return config_fields(hf, f"{caller}: {path / 'config.json'}")


def read(path: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(LlamaConfig fields, state dict) of a directory or Hub id, every tensor checked by name and shape and cast
    to dtype (None: the checkpoint's own, which must then be one of fp32 / fp16 / bf16 throughout)."""
    path, hf = read_config(path)
    cfg = config_fields(hf, f"from_pretrained: {path / 'config.json'}")
    want, sd = shapes(cfg), {}
    for f in _files(path):
        for key, t in read_safetensors(f, "from_pretrained").items():
            if key.endswith("rotary_emb.inv_freq") or (cfg["tie_word_embeddings"] and key == "lm_head.weight"):
                continue  # older files keep the rotary table; a tied head is the embedding (transformers' reading)
            if key not in want:
                raise KeyError(f"from_pretrained: {f} holds {key!r}, which is no tensor of this Llama config")
            if tuple(t.shape) != want[key]:
                raise ValueError(f"from_pretrained: {key} in {f} has shape {tuple(t.shape)}, expected {want[key]}")
            if t.dtype not in DTYPES:
                raise ValueError(f"from_pretrained: {key} in {f} is {t.dtype}; minilora reads fp32, fp16 and bf16")
            sd[key] = t
    for key in want:
        if key not in sd:
            raise KeyError(f"from_pretrained: {path} lacks {key!r}")
    kinds = {t.dtype for t in sd.values()}
    if dtype is None and len(kinds) > 1:
        raise ValueError(f"from_pretrained: {path} mixes {sorted(map(str, kinds))}; pass dtype= to choose one")
    return cfg, {k: t.to(dtype) if dtype is not None else t for k, t in sd.items()}


def write(path: str | os.PathLike, cfg: dict, sd: dict[str, torch.Tensor], max_shard_bytes: int = 5 * 2**30) -> None:
    """config.json + model.safetensors (or model-0000i-of-0000n.safetensors shards and their index when the
    tensors exceed max_shard_bytes), each written atomically, the config last. The tensors must be exactly
    those shapes(cfg) names: a model with LoRA or NF4 layers has other ones (merge_lora / merge_qlora first)."""
    want = shapes(cfg)
    for key in sd:
        if key not in want:
            raise ValueError(f"save_pretrained: {key!r} is no tensor of a Llama checkpoint; a model with LoRA or "
                             f"NF4 layers is saved with merge_lora / merge_qlora first (or save_adapter)")
    for key in want:
        if key not in sd:
            raise ValueError(f"save_pretrained: the model lacks {key!r}")
    kinds = {t.dtype for t in sd.values()}
    if len(kinds) > 1 or not kinds <= DTYPES:
        raise ValueError(f"save_pretrained: tensors must share one of fp32 / fp16 / bf16, got {sorted(map(str, kinds))}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards, size = [{}], 0
    for key, t in sd.items():
        t = t.detach().to("cpu", copy=True).contiguous()  # a copy: the model's tensors are never touched
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key], size = t, size + t.nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    stale = [f for f in path.glob("model*.safetensors*") if f.name not in names]
    for name, shard in zip(names, shards):
        atomic_write(path / name, safetensors_bytes(shard))
    if n > 1:
        atomic_write_json(path / "model.safetensors.index.json", {
            "metadata": {"total_size": sum(t.nbytes for t in sd.values())},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}})
    for f in stale:  # a previous save's other layout (a single file, or shards of another count)
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", f.name):
            f.unlink()
    atomic_write_json(path / "config.json", hf_config(cfg, kinds.pop()))
