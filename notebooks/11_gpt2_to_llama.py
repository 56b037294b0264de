# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 11 · From GPT-2 to Llama: what changes, and what it means for LoRA
#
# The lecture's model is GPT-2; the models people fine-tune are Llama's descendants (Llama 2 and 3, TinyLlama,
# SmolLM, Mistral, Qwen2). `minilora.Llama` (`minilora/llama.py`, as short as `gpt.py`) is that architecture with
# transformers' module names, so its checkpoints and PEFT's adapters fit by name. This notebook walks through
#
# 1. the block, side by side with GPT-2's, and the LoRA targets it gives you;
# 2. the trainable-parameter table on the real shapes (Llama-2-7B, 13B and 70B) against the lecture's
#    "one square matrix" rule of thumb, and what grouped-query attention does to k_proj and v_proj;
# 3. the memory bill of a QLoRA step on Llama-2-7B next to the QLoRA paper's breakdown;
# 4. QLoRA on a small Llama trained here, and its adapter in PEFT on transformers' `LlamaForCausalLM`.
#
# Every sentence that states a number or a comparison is followed by a cell that asserts it.

# %%
import json
import math
import tempfile
from pathlib import Path

import torch

from minilora import GPT, GPTConfig, add_lora, add_qlora, count_parameters, save_adapter
from minilora.llama import Llama, LlamaConfig
from minilora.memory import GB, estimate, format_table
from minilora.memory.llama import LLAMA_TARGETS, PRESETS, llama_param_count

torch.manual_seed(0)

# %% [markdown]
# ## 1 · One block of each
#
# A GPT-2 block and a Llama decoder layer do the same two things (attention, then an MLP, each behind a norm and
# a residual), with four changes: RMSNorm instead of LayerNorm, rotary position embeddings instead of a learned
# position table, a gated SwiGLU MLP instead of GELU, and separate q / k / v / o projections in which K and V may
# have fewer heads than Q (grouped-query attention). The module names are what a LoRA target names: GPT-2 has
# **4 linear layers per block** (`c_attn` holding q, k and v at once), Llama **7**, the seven names PEFT users type.

# %%
gpt = GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=1, n_head=4, n_embd=64))
llama = Llama(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
linears = {name: [n.removeprefix(prefix) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                  and n.startswith(prefix)]
           for name, model, prefix in (("GPT-2", gpt, "transformer.h.0."), ("Llama", llama, "model.layers.0."))}
for name, names in linears.items():
    print(f"{name:<6} {len(names)} linears per block: {', '.join(names)}")
print("\nLlama's parameter names:", [n for n, _ in llama.named_parameters()][:6], "...")

# %%
assert len(linears["GPT-2"]) == 4 and len(linears["Llama"]) == 7, "claim '4 linears per GPT-2 block, 7 per Llama'"
assert [n.rsplit(".", 1)[1] for n in linears["Llama"]] == list(LLAMA_TARGETS), "claim 'the seven PEFT names' broke"
assert not any("wpe" in n or "position" in n for n, _ in llama.named_parameters()), "Llama has no position table"

# %% [markdown]
# ## 2 · How many parameters LoRA trains on the real shapes
#
# The lecture's table treats a model of N parameters as one square matrix of side √N, so rank-r LoRA adds
# 2·r·√N parameters. A real Llama is 7 matrices per layer, each of a side in the thousands; LoRA on all of them
# adds r·(in + out) per matrix. Counted on the real models (built on PyTorch's "meta" device: shapes, no memory),
# the real count is **more than 10 times the rule of thumb at every size and rank**, and it grows with r exactly
# linearly. At r = 64 on Llama-2-7B it is **about 2.4 % of the model**, where the square-matrix picture gives
# **0.16 %**: still small, but fifteen times more to store, train and hold Adam state for.

# %%
def lora_count(preset: str, r: int) -> tuple[int, int]:
    """(trainable LoRA parameters with rank r on all seven targets, all parameters) of a preset, on meta."""
    with torch.device("meta"):
        model = add_lora(Llama(LlamaConfig(**PRESETS[preset])), list(LLAMA_TARGETS), r=r)
    count = count_parameters(model)
    return count.trainable, count.total - count.trainable


print(f"{'model':<12} {'params':>15} " + "".join(f"{f'r={r}':>14}{'2r√N':>12}" for r in (8, 16, 64)))
table = {}
for preset in ("llama-2-7b", "llama-2-13b", "llama-2-70b"):
    row = {r: lora_count(preset, r) for r in (8, 16, 64)}
    n = row[8][1]
    table[preset] = {r: (t, 2 * r * math.sqrt(n)) for r, (t, _) in row.items()}
    print(f"{preset:<12} {n:>15,} " + "".join(f"{t:>14,}{rule:>12,.0f}" for t, rule in table[preset].values()))
n7 = llama_param_count(LlamaConfig(**PRESETS["llama-2-7b"]))
share7, rule7 = (x / n7 for x in table["llama-2-7b"][64])
print(f"\nr = 64 on Llama-2-7B: {share7:.2%} of the model; the square-matrix rule: {rule7:.2%}")

# %%
assert all(t > 10 * rule for rows in table.values() for t, rule in rows.values()), "claim 'more than 10x' broke"
assert all(rows[16][0] == 2 * rows[8][0] and rows[64][0] == 8 * rows[8][0] for rows in table.values()), \
    "claim 'linear in r' broke"
assert round(share7, 3) == 0.024 and round(rule7, 4) == 0.0016, "claim '2.4 % against 0.16 %' broke"
assert round(share7 / rule7) == 15, "claim 'fifteen times more' broke"

# %% [markdown]
# ### Grouped-query attention: smaller K and V
#
# Llama-2-70B has 64 query heads but only 8 key/value heads of 128: `k_proj` and `v_proj` map 8192 → 1024, an
# **eighth of `q_proj`'s weights**, and a rank-r adapter on each costs r·(8192 + 1024), **56 % of q_proj's
# r·(8192 + 8192)**. The same shrinkage holds for what attention computes with: each K/V head serves a group of
# 8 query heads, so the K/V cache of generation is 8 times smaller. Llama-2-7B has no grouping (32 and 32 heads).

# %%
def attention_shapes(preset: str) -> dict[str, tuple[int, int]]:
    with torch.device("meta"):
        layer = Llama(LlamaConfig(**PRESETS[preset] | {"num_hidden_layers": 1})).model.layers[0].self_attn
    return {n: (m.in_features, m.out_features) for n, m in layer.named_children()}


for preset in ("llama-2-7b", "llama-2-70b", "llama-3-8b"):
    print(f"{preset:<12}", attention_shapes(preset))
s70 = attention_shapes("llama-2-70b")
k_cost, q_cost = sum(s70["k_proj"]), sum(s70["q_proj"])

# %%
assert s70["k_proj"] == s70["v_proj"] == (8192, 1024) and s70["q_proj"] == (8192, 8192), "claim '8192 -> 1024' broke"
assert s70["q_proj"][1] == 8 * s70["k_proj"][1], "claim 'an eighth of q_proj' broke"
assert round(100 * k_cost / q_cost) == 56, "claim '56 % of q_proj's adapter' broke"
assert attention_shapes("llama-2-7b")["k_proj"] == (4096, 4096), "claim 'no grouping in Llama-2-7B' broke"
