"""Machinery for tests/test_memory_depth.py: a fixed, seeded set of estimate() calls and what they return.

`python tests/memory_cases.py > tests/memory_golden.json` records every case's bytes (or its error) from the
estimate() of the checkout it runs in. The golden file in the repository was written by the estimate() that
built a meta-device model of the full depth (commit 872d7e0), so the test holds the block-times-depth estimate
to that one byte for byte.
"""
from __future__ import annotations

import json
import random

from minilora.gpt import GPTConfig
from minilora.llama import LlamaConfig
from minilora.memory import estimate

GPT_TARGETS = [None, "c_attn", ["c_attn", "attn.c_proj"], r"transformer\.h\.[01]\..*c_fc", "lm_head",
               ["mlp.c_fc", "lm_head"], "transformer.h.1.mlp.c_proj", "ln_1", "nothing_here", r".*h\.\d+\.mlp\..*",
               r".*\.[13]\.attn\.c_.*", r".*\.(0|2|3)\.mlp\.c_proj"]
LLAMA_TARGETS = [None, "q_proj", ["q_proj", "v_proj"], r"model\.layers\.0\..*_proj", r".*\.[13]\..*\.[qv]_proj",
                 "lm_head", "down_proj", "model.layers.2.mlp.up_proj", "input_layernorm"]


def _gpt(rng: random.Random) -> GPTConfig:
    n_head = rng.choice([1, 2, 4])
    n_layer = rng.choice([1, 2, 3, 4, 5, 7, 9])
    return GPTConfig(block_size=rng.choice([8, 16]), vocab_size=rng.choice([11, 64, 257]), n_layer=n_layer,
                     n_head=n_head, n_embd=n_head * rng.choice([4, 8]), dropout=rng.choice([0.0, 0.0, 0.1]),
                     bias=rng.random() < 0.7, tie_word_embeddings=rng.random() < 0.7,
                     gradient_checkpointing=rng.random() < 0.4,
                     checkpoint_segments=rng.choice([None, None, 1, n_layer, max(1, n_layer // 2)]))


def _llama(rng: random.Random) -> LlamaConfig:
    heads = rng.choice([2, 4])
    n = rng.choice([1, 2, 3, 4, 6])
    return LlamaConfig(vocab_size=rng.choice([11, 64]), hidden_size=heads * 4, intermediate_size=rng.choice([8, 24]),
                       num_hidden_layers=n, num_attention_heads=heads,
                       num_key_value_heads=rng.choice([None, heads // 2]), max_position_embeddings=rng.choice([8, 16]),
                       tie_word_embeddings=rng.random() < 0.4, attention_bias=rng.random() < 0.3,
                       gradient_checkpointing=rng.random() < 0.4,
                       checkpoint_segments=rng.choice([None, None, 1, n, max(1, n // 2)]))


def cases(n: int = 400, seed: int = 0) -> list[tuple[str, dict, dict]]:
    """n (family, config fields, estimate kwargs) triples drawn with a fixed seed."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        llama = rng.random() < 0.4
        cfg = _llama(rng) if llama else _gpt(rng)
        fields = {k: v for k, v in vars(cfg).items()}
        fsdp = rng.choice([1, 1, 1, 2, 3])
        kw = dict(mode=rng.choice(["full", "lora", "qlora"]), batch_size=rng.choice([1, 3, 4]) * fsdp,
                  seq_len=rng.choice([None, 5]), r=rng.choice([1, 2, 8]),
                  targets=rng.choice(LLAMA_TARGETS if llama else GPT_TARGETS),
                  lora_dropout=rng.choice([0.0, 0.0, 0.1]), dtype=rng.choice(["fp32", "bf16", "fp16"]),
                  compute_dtype=rng.choice(["bf16", "fp32"]), master_weights=rng.random() < 0.2,
                  optimizer="adamw" if fsdp > 1 else rng.choice(["adamw", "paged", "adamw8bit", "paged8bit"]),
                  page_size=rng.choice([2**20, 4096, 1040]), device_budget=rng.choice([None, 0, 8192]),
                  checkpointing=rng.choice([None, True, False]), fsdp=fsdp,
                  cpu_offload=fsdp > 1 and rng.random() < 0.3, device=rng.choice(["cuda", "cpu"]),
                  blocksize=rng.choice([64, 32]), double_quant=rng.random() < 0.7)
        if rng.random() < 0.2:
            kw["state_dtype"], kw["grad_dtype"] = "fp32", rng.choice(["fp32", "bf16"])
        if kw["mode"] == "qlora" and rng.random() < 0.3:
            kw["quant_targets"] = rng.choice(["q_proj", "down_proj"] if llama else ["c_attn", ["c_fc", "c_proj"]])
        if rng.random() < 0.1 and fsdp == 1:
            kw["checkpoint_segments"] = 1
        out.append(("llama" if llama else "gpt", fields, kw))
    return out


def run_case(family: str, fields: dict, kw: dict) -> dict:
    """What estimate() gives for one case: every field's bytes and counts, or the error it raised."""
    cfg = (LlamaConfig if family == "llama" else GPTConfig)(**fields)
    try:
        m = estimate(cfg, **kw)
    except (ValueError, TypeError) as e:
        return {"error": type(e).__name__}
    return {**m.as_dict(), "weights_by_dtype": m.weights_by_dtype, "n_params": m.n_params,
            "n_trainable": m.n_trainable, "tokens": m.tokens}


if __name__ == "__main__":
    print(json.dumps([run_case(*c) for c in cases()], indent=0, sort_keys=True))
