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

# %% [markdown]
# ## 3 · The memory bill of a QLoRA step on Llama-2-7B, against the QLoRA paper's breakdown
#
# `estimate` takes a `LlamaConfig` and walks a Llama layer's saved tensors op by op (`minilora/memory/llama.py`;
# `tests/test_memory_llama.py` checks every part against a measured step, to the byte). The QLoRA paper
# (Dettmers et al. 2023, section 4 and its Figure 6) breaks LLaMA-7B's QLoRA step down at one 512-token sequence
# as: 4-bit base 5,048 MB, LoRA parameters 26 MB, LoRA input gradients 567 MB, 18 MB per sequence with gradient
# checkpointing (*paper-only figures*; it does not derive them). Computed here for the same shape (Llama-2-7B
# is LLaMA-7B's architecture), QLoRA r = 64 on all seven linears, BF16:
#
# - **4-bit base**: the 6.48B weights of the layers' linears in NF4 with double quantization are **3,341 MB**,
#   the embeddings, head and norms in BF16 **525 MB**: 3.87 GB, **about three quarters of the paper's figure**;
#   nothing this accounting models makes up the rest (the paper's number is a measurement or includes what a
#   framework holds besides the tensors).
# - **LoRA parameters**: the paper's adapters are "0.2 % of the original model weights"; 0.2 % of 6.74B weights
#   in 16 bits is **25.7 MiB, the paper's "26 MB"** (its MB are MiB). Rank 64 on all seven linears is 12 times
#   that: **320 MB**.
# - **LoRA input gradients**: the inputs of the adapted linears that backward needs (the normalised x shared by
#   q, k and v, the attention output for o_proj, the normalised x of the MLP, SwiGLU's product for down_proj, and
#   every x·Aᵀ) come to **778 MB, within 40 % of the paper's 567 MB**; everything a layer saves (RMSNorm's fp32
#   input, attention's q, k, v, SwiGLU's three intermediates as well) is **2.87 GB**.
# - **With checkpointing**: ⌈√32⌉ = 6 segments keep 6 layer inputs, **25 MB** against the paper's 18 MB; the peak
#   while one segment is recomputed is **534 MB**.

# %%
l7 = LlamaConfig(**PRESETS["llama-2-7b"])
QLORA7 = dict(dtype="bf16", compute_dtype="bf16", state_dtype="fp32", r=64, batch_size=1, seq_len=512)
plain7, ckpt7 = (estimate(l7, "qlora", **QLORA7, checkpointing=c, label=f"checkpointing {c}") for c in (False, True))
print(format_table([plain7, ckpt7], unit="MB"))
MB, MIB = 1e6, 2**20
layer = plain7.saved.blocks[-1]
adapter_inputs = l7.num_hidden_layers * sum(v for k, v in layer.items() if k.endswith(
    ("ln_1.out", "attn.out", "ln_2.out", "mlp.product", ".xA")))
lora02 = 0.002 * plain7.n_params * 2
kept = len(ckpt7.saved.segments) * ckpt7.saved.input_bytes
print(f"4-bit base: NF4 {plain7.quantized_weights / MB:,.0f} MB + BF16 {plain7.weights / MB:,.0f} MB "
      f"= {(plain7.quantized_weights + plain7.weights) / MB:,.0f} MB (paper 5,048 MB)")
print(f"0.2 % of the weights in 16 bits: {lora02 / MIB:.1f} MiB (paper 26 MB); r = 64 on all seven: "
      f"{plain7.adapters / MB:,.0f} MB")
print(f"adapted linears' inputs: {adapter_inputs / MB:,.0f} MB (paper 567 MB); all saved: "
      f"{plain7.activations / MB:,.0f} MB; checkpointed: {kept / MB:.0f} MB kept, {ckpt7.activations / MB:,.0f} MB peak")

# %%
base7 = plain7.quantized_weights + plain7.weights
assert round(plain7.quantized_weights / MB) == 3341 and round(plain7.weights / MB) == 525, "claim '3,341 + 525 MB'"
assert 0.7 < base7 / (5048 * MB) < 0.8, "claim 'about three quarters of the paper's 5,048 MB' broke"
assert round(lora02 / MIB) == 26 and round(plain7.adapters / MB) == 320, "claim '25.7 MiB; 320 MB at r = 64' broke"
assert round(plain7.adapters / lora02) == 12, "claim '12 times' broke"
assert round(adapter_inputs / MB) == 778 and adapter_inputs / (567 * MB) < 1.4, "claim '778 MB, within 40 %' broke"
assert f"{plain7.activations / 1e9:.2f}" == "2.87", "claim 'all saved: 2.87 GB' broke"
assert len(ckpt7.saved.segments) == 6 and round(kept / MB) == 25 and round(ckpt7.activations / MB) == 534, \
    "claim '6 inputs, 25 MB kept, 534 MB peak' broke"

# %% [markdown]
# ## 4 · QLoRA on a small Llama trained here
#
# A 3-layer Llama over bytes (96 wide, 6 query heads sharing 2 key-value heads) is pretrained for 150 steps on the
# English every Python install ships, then fine-tuned with QLoRA (NF4 base, r = 8 on all seven linears) on the
# lecture's Yoda task for 150 steps. The minilora trainer is the GPT's: nothing in it knows which model it trains.
# On the held-out sentences **QLoRA lowers the validation loss to under two thirds of the base's**, training only the
# adapters (with seeds 0, 1 and 2 for the model, the data and the trainer, run while this notebook was written, it
# fell to 0.49, 0.58 and 0.42 of the base's: the assertion's margin is 0.08 below the worst of them).

# %%
from minilora import ByteTokenizer, InstructionSet, TokenStream, TrainConfig, english_documents, yoda_dataset
from minilora.data.corpus import split_documents
from minilora.train import evaluate, train

tok = ByteTokenizer()
train_text, val_text = split_documents(english_documents())
small = Llama(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                          num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=192))
pre = train(small, TrainConfig(mode="full", lr=3e-3, betas=(0.9, 0.95), warmup_steps=10, steps=150, batch_size=16,
                               eval_max_batches=5, progress=False),
            TokenStream(tok.encode(train_text[:300000]), 128), TokenStream(tok.encode(val_text[:30000]), 128))
yoda_train, yoda_val = (InstructionSet(ex, tok, 192) for ex in yoda_dataset(500, 100, seed=0))
before = evaluate(pre.model, yoda_val)
tuned = train(pre.model, TrainConfig(mode="qlora", targets=LLAMA_TARGETS, r=8, alpha=32, lr=3e-3, steps=150,
                                     batch_size=16, progress=False), yoda_train, yoda_val)
print(f"pretraining: loss {pre.losses[0]:.2f} -> {pre.losses[-1]:.2f}")
print(f"Yoda validation loss: base {before['loss']:.3f} -> QLoRA {tuned.final['loss']:.3f}; {tuned.params}")

# %%
assert tuned.final["loss"] < 2 / 3 * before["loss"], "claim 'under two thirds of the base's loss' broke"
assert all(n.endswith(("lora_A", "lora_B")) for n, p in tuned.model.named_parameters() if p.requires_grad)

# %% [markdown]
# ### The adapter in PEFT, on transformers' LlamaForCausalLM
#
# The adapter, saved in PEFT's layout, loads with PEFT onto transformers' `LlamaForCausalLM` holding the base
# (the NF4 base written out dense: its dequantized weights, what QLoRA trained on), and gives **the same logits
# as minilora's merged model, within 1e-5**.

# %%
import copy

from minilora import merge_qlora
from peft import PeftModel
from transformers import AutoModelForCausalLM

work = Path(tempfile.mkdtemp())
save_adapter(tuned.model, work / "adapter")
base = copy.deepcopy(tuned.model)  # the NF4 base alone: B = 0, merged to dense (its dequantized weights)
with torch.no_grad():
    for name, p in base.named_parameters():
        if name.endswith("lora_B"):
            p.zero_()
merge_qlora(base)[0].save_pretrained(work / "base")
merged, _ = merge_qlora(tuned.model)  # base + adapter, dense
idx = torch.tensor([tok.encode("Say it like Yoda. The function must return a new list.")])
with torch.no_grad():
    ours = merged.eval()(idx)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "base"), work / "adapter")
    theirs = peft_model.eval()(input_ids=idx).logits
gap = ((ours - theirs).abs().max() / theirs.abs().max()).item()
print(f"minilora (merged) vs transformers + PEFT (base + adapter): relative gap {gap:.1e}")
print("target_modules:", sorted(json.loads((work / "adapter" / "adapter_config.json").read_text())["target_modules"]))

# %%
assert gap < 1e-5, "claim 'the same logits within 1e-5' broke"
