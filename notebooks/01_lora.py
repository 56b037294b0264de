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
# # 1 · Fine-tuning and LoRA
#
# Pre-training gives a base model that continues text. Fine-tuning changes its weights so that it follows
# instructions; in-context learning only changes the prompt and leaves every weight alone. This notebook is
# about changing the weights cheaply:
#
# 1. what an instruction dataset looks like,
# 2. why a product of two thin matrices, W = B·A, can stand in for a big one,
# 3. the LoRA layer, h = W0·x + (α/r)·B·A·x, and why it starts out as the base model,
# 4. how many parameters LoRA trains (the lecture's table, recomputed),
# 5. merging the adapter back into W0 after training.

# %%
import copy
import tempfile
from pathlib import Path

import torch

import minilora
from minilora import GPT, GPTConfig, LoRALinear, add_lora, count_parameters, merge_lora
from minilora import format_count, lora_params_real, slide_table
from minilora.data import ByteTokenizer, TokenStream, english_documents, split_documents, yoda_dataset
from minilora.params import linear_shapes_llama
from minilora.train import TrainConfig, train
from minilora import plots

torch.manual_seed(0)

# %% [markdown]
# ## An instruction dataset
#
# Each record has an instruction, an optional context, and the output we want. minilora builds one from a
# seed (a Yoda-style rewriting task, used again in notebook 5); the records have the shape of Alpaca's.

# %%
train_examples, _ = yoda_dataset(n_train=4, n_val=1, seed=0)
for ex in train_examples[:3]:
    print(f"instruction: {ex.instruction}\ncontext:     {ex.context}\noutput:      {ex.output}\n")

# %% [markdown]
# ## W = B·A: a big matrix from two thin ones
#
# A matrix W of shape m × n has m·n numbers. If it has rank r, it is exactly a product B·A with B of shape m × r
# and A of shape r × n: only r·(m + n) numbers. Most weight matrices are not exactly low rank, but the truncated
# SVD gives the *best* rank-r approximation, W_r = U_r·Σ_r·V_rᵀ, so B = U_r·Σ_r and A = V_rᵀ.
#
# To have a real weight to look at, we train a small minilora GPT for a few hundred steps on English text
# (the Python documentation that ships with every Python), and keep a copy of its initial weights.

# %%
docs = english_documents(("topics",))
train_text, val_text = split_documents(docs)
tok = ByteTokenizer()
stream = TokenStream(tok.encode(train_text), block_size=64)

config = GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=128)
model = GPT(config)
layer_name = "transformer.h.1.mlp.c_fc"
W_init = model.get_submodule(layer_name).weight.detach().clone()

pretrain = train(model, TrainConfig(mode="full", lr=3e-3, steps=300, batch_size=16, progress=False), stream)
losses = pretrain.losses
print(f"loss: {losses[0]:.2f} at step 1 -> {sum(losses[-20:]) / 20:.2f} (mean of the last 20 steps)")

W = model.get_submodule(layer_name).weight.detach().clone()
print(layer_name, tuple(W.shape))

# %% [markdown]
# The truncated SVD at rank 8, drawn to scale: W, the two thin factors, and their product.

# %%
U, S, Vh = torch.linalg.svd(W, full_matrices=False)
r = 8
B_r, A_r = U[:, :r] * S[:r], Vh[:r]
plots.plot_factorization(W, B_r, A_r, title=f"{layer_name}.weight at rank {r}");

# %% [markdown]
# ## Low rank as compression
#
# How much is lost at each rank? ‖W − W_r‖/‖W‖ = √(Σ_{i>r} σ_i²) / √(Σ σ_i²). Three matrices of the same shape:
#
# - a random Gaussian matrix (no structure: every direction matters equally),
# - the trained weight W,
# - the *update* ΔW = W − W_init that training made — the thing LoRA actually factorises (W0 stays frozen).

# %%
def relative_error_by_rank(M: torch.Tensor) -> torch.Tensor:
    """‖M − M_r‖_F / ‖M‖_F for r = 1 .. min(m, n), from the singular values."""
    s2 = torch.linalg.svdvals(M.double()) ** 2
    tail = s2.sum() - s2.cumsum(0)
    return (tail.clamp(min=0) / s2.sum()).sqrt()


matrices = {"random Gaussian": torch.randn_like(W), "trained W": W, "update ΔW = W − W_init": W - W_init}
ranks = [1, 2, 4, 8, 16, 32, 64, 96, 128]
errors = {name: relative_error_by_rank(M)[[k - 1 for k in ranks]] for name, M in matrices.items()}
spectra = {name: torch.linalg.svdvals(M) for name, M in matrices.items()}
for name, e in errors.items():
    print(f"{name:>24}: " + "  ".join(f"r={k}: {v:.2f}" for k, v in zip(ranks, e.tolist())))
plots.plot_rank_reconstruction(ranks, errors, shape=tuple(W.shape), spectra=spectra);

# %% [markdown]
# The update is far more compressible than the weight itself, and both are far more compressible than noise.
# That is the bet LoRA makes: the change fine-tuning needs lives in a few directions.
#
# ## The LoRA layer
#
# LoRA freezes W0 and learns ΔW = (α/r)·B·A next to it, in parallel:
#
#     h = W0·x + (α/r)·B·(A·x)
#
# A (r × in) starts random, B (out × r) starts at **zero**. So at step 0 the update is exactly zero and the
# adapted layer computes what the base layer computes.

# %%
torch.manual_seed(0)
base = torch.nn.Linear(128, 512)
lora = LoRALinear(base, r=8, alpha=16)
print(lora)
print("A:", tuple(lora.lora_A.shape), "  B:", tuple(lora.lora_B.shape), "  scaling α/r =", lora.scaling)

x = torch.randn(4, 128)
print("B is all zeros:", bool((lora.lora_B == 0).all()),
      "| max |LoRA(x) − W0 x| at init =", (lora(x) - base(x)).abs().max().item())

# the forward pass, written out by hand, against the layer
with torch.no_grad():
    lora.lora_B.normal_()
by_hand = x @ base.weight.T + base.bias + lora.scaling * (x @ lora.lora_A.T) @ lora.lora_B.T
print("max |layer − by hand| =", (lora(x) - by_hand).abs().max().item())

# %% [markdown]
# The same holds for a whole model: wrap the attention and MLP projections of our trained GPT and its logits do
# not move until the adapters are trained. Then train only A and B for a few steps and watch the output drift
# away from the base model's.

# %%
probe, _ = stream.sample(4, torch.Generator().manual_seed(1))
with torch.no_grad():
    base_logits = model(probe)

wrapped = add_lora(copy.deepcopy(model), ["c_attn", "c_fc"], r=8, alpha=16)  # a wrapped copy, untrained
print(count_parameters(wrapped))
with torch.no_grad():
    steps, drift = [0], [(wrapped(probe) - base_logits).abs().max().item()]
print("max |logits − base logits| right after add_lora:", drift[0])

base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}


def record(step: int, loss: float) -> None:
    """Called by the trainer after every optimizer step: how far have the logits moved?"""
    if step % 5 == 0:
        with torch.no_grad():
            steps.append(step)
            drift.append((model(probe) - base_logits).abs().max().item())


# the trainer's "lora" mode wraps the same layers (add_lora) and trains only A and B
train(model, TrainConfig(mode="lora", targets=("c_attn", "c_fc"), r=8, alpha=16, lr=1e-2, steps=40,
                         batch_size=16, progress=False), stream, callback=record)
print(f"max |logits − base logits| after {steps[-1]} steps of LoRA: {drift[-1]:.3f}")
frozen = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if not p.requires_grad}
print(f"{len(frozen)} frozen tensors, all unchanged after training the adapters:",
      all(torch.equal(p, base_weights[n]) for n, p in frozen.items()))
plots.plot_output_drift(steps, drift, ylabel="max |logits − base logits|");

# %% [markdown]
# ## How many parameters does LoRA train?
#
# The lecture's table treats a model of N parameters as if it were one square matrix of side √N. LoRA of rank r
# on it trains A (r × √N) and B (√N × r): 2·r·√N numbers. `minilora.params.slide_table` computes every cell;
# below, each cell is printed the slide's way next to the figure the slide shows (typed in from the slide, only
# for comparison). Where they differ, the slide cut off a digit instead of rounding.

# %%
SLIDE = {  # the slide's printed figures
    "1": ["167K", "228K", "529K", "849K"], "2": ["334K", "456K", "1M", "2M"],
    "8": ["1M", "2M", "4M", "7M"], "16": ["3M", "4M", "8M", "14M"],
    "512": ["86M", "117M", "270M", "434M"], "1024": ["171M", "233M", "542M", "869M"],
    "8192": ["1.4B", "1.8B", "4.3B", "7B"], "Full": ["7B", "13B", "70B", "180B"],
}
table = slide_table()
models = list(table["1"])
print(f"{'rank':>6} | " + " | ".join(f"{m:>22}" for m in models))
differs = []
for rank, row in table.items():
    cells = []
    for m, slide_cell in zip(models, SLIDE[rank]):
        ours = format_count(row[m])
        mark = "" if ours == slide_cell else " ≠ slide " + slide_cell
        if mark:
            differs.append((rank, m, f"{row[m]:,.0f}", slide_cell))
        cells.append(f"{ours:>6}{mark:>16}")
    print(f"{rank:>6} | " + " | ".join(cells))
print("\ncells where the slide truncates:")
for rank, m, exact, slide_cell in differs:
    print(f"  rank {rank:>5}, {m:>4}: 2·r·√N = {exact:>13}, slide prints {slide_cell}")
plots.plot_lora_table(table);

# %% [markdown]
# A real model is not one square matrix: it has many layers, each with its own in × out shape, and LoRA adds
# r·(in + out) per adapted layer. For LLaMA-2 7B's shapes:

# %%
llama = linear_shapes_llama()
for targets in (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]):
    for rank in (8, 16):
        n = lora_params_real(llama, targets, rank)
        print(f"r={rank:>2}, {'+'.join(t.split('_')[0] for t in targets):>26}: {n:>12,} ({format_count(n)}), "
              f"{100 * n / 6.74e9:.3f}% of 6.74B")
print(f"the square-matrix estimate at r=8: {format_count(table['8']['7B'])}")

# %% [markdown]
# ## Merging
#
# After training, W = W0 + (α/r)·B·A is one ordinary matrix. `merge_lora` folds every adapter into its base
# weight and puts plain `nn.Linear` layers back: the merged model computes the same function, with no extra
# matmul at inference. The adapter alone (A and B) is what one saves and shares.

# %%
model.eval()
with torch.no_grad():
    lora_logits = model(probe)
with tempfile.TemporaryDirectory() as d:
    minilora.save_adapter(model, d)
    adapter_bytes = sum(f.stat().st_size for f in Path(d).iterdir())
    print("adapter files:", sorted(f.name for f in Path(d).iterdir()), f"— {adapter_bytes:,} bytes in all")
before = count_parameters(model)
merge_lora(model)
after = count_parameters(model)
with torch.no_grad():
    merged_logits = model(probe)
print("before merge:", before)
print("after merge: ", after)
print("LoRA layers left:", len(minilora.lora_layers(model)))
print("max |merged − LoRA logits| =", (merged_logits - lora_logits).abs().max().item())
print(f"full model in fp32: {4 * after.total:,} bytes; the adapter is {adapter_bytes / (4 * after.total):.1%} of it")
