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
# 0. why "cheaply" matters: the 120 GB bill of full fine-tuning, and the three families of PEFT methods,
# 1. what an instruction dataset looks like,
# 2. why a product of two thin matrices, W = B·A, can stand in for a big one,
# 3. what a trained weight matrix looks like (close to a Gaussian: the fact NF4 is built on, notebook 2),
# 4. the LoRA layer, h = W0·x + (α/r)·B·A·x, why it starts out as the base model, and how A is initialised,
# 5. why the update is scaled by α/r (and what α/√r, rsLoRA, changes),
# 6. how many parameters LoRA trains (the lecture's table, recomputed),
# 7. merging the adapter back into W0 after training, and what the LoRA paper measured against full
#    fine-tuning (its GPT-2 table, labelled as the paper's).
#
# Every sentence below that states a number, an ordering or a comparison is followed by a cell that computes
# it and asserts it: if the library stops supporting a claim, the notebook stops with a message naming it.
# Where a claim holds only in a paper, the text says so and names the paper.

# %%
import copy
import math
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import minilora
from minilora import GPT, GPTConfig, LoRALinear, add_lora, count_parameters, evaluate, merge_lora
from minilora import format_count, lora_params_real, slide_table
from minilora.data import ByteTokenizer, TokenStream, english_documents, split_documents, yoda_dataset
from minilora.memory import GB, estimate, scaled_config
from minilora.params import linear_shapes_llama
from minilora.train import TrainConfig, train
from minilora import plots

torch.manual_seed(0)

# %% [markdown]
# ## The bill: 120 GB to fine-tune 10B parameters
#
# Full fine-tuning trains every weight, so every weight needs a gradient and AdamW's two moments. With the
# lecture's recipe (fp16 weights and gradients, 2 + 2 bytes; fp32 moments, 4 + 4 bytes) that is 12 bytes per
# parameter: for a 10B-parameter model, 120 GB before a single activation is stored — more than the largest
# single GPU of 80 GB holds. Freezing the base and training only LoRA's adapters (rank 64 on every linear layer)
# drops the gradients and moments of the base: the same model then needs under a quarter of that.
# (`minilora.memory.estimate` counts it; notebook 6 checks it against measured training steps.) LoRA's win is
# memory: per training step it still runs the whole forward and backward through the frozen weights, so it is
# not "much faster" per step (*slide erratum*, notebook 7 §19: about 70 % of a full step's FLOPs).

# %%
c10 = scaled_config(10_000_000_000, n_layer=31, n_embd=5120, n_head=40, block_size=2048)
bill = {mode: estimate(c10, mode, dtype="fp16", state_dtype="fp32", r=64, seq_len=2048)
        for mode in ("full", "lora")}
for mode, b in bill.items():
    print(f"{mode:>4}: weights {b.weights / GB:6.1f} GB, gradients {(b.gradients + b.adapter_gradients) / GB:5.1f} GB, "
          f"AdamW moments {(b.optimizer_state + b.adapter_optimizer_state) / GB:5.1f} GB -> {b.state_bytes / GB:6.1f} GB")
assert round(bill["full"].state_bytes / GB) == 120 and bill["full"].state_bytes > 80 * GB, \
    "claim broke: 120 GB, more than an 80 GB GPU"
assert bill["lora"].state_bytes < bill["full"].state_bytes / 4, "claim broke: LoRA needs under a quarter of it"

# %% [markdown]
# ## Three families of parameter-efficient fine-tuning (PEFT)
#
# PEFT methods keep almost all of the pretrained weights frozen and train few parameters. They come in three
# families:
#
# - **additive**: add new trainable modules or inputs and train only those — adapter layers inserted between
#   the blocks (Houlsby et al. 2019), or soft prompts / prefixes prepended to the input (prefix tuning);
# - **selective**: train a chosen subset of the existing weights — only the biases (BitFit), or only the top
#   layers — and freeze the rest;
# - **reparameterization**: train a small re-description of the weight *update* — LoRA's ΔW = B·A, which runs
#   in parallel to the frozen W0 and can be merged into it afterwards, so it adds no inference cost.
#
# This notebook builds the third. On a small GPT (the one trained below), the selective choices and LoRA each
# train under 6 % of the parameters; counted here:

# %%
_peft_gpt = GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=128))
_total = sum(p.numel() for p in _peft_gpt.parameters())
families = {
    "selective: biases only (BitFit)": sum(p.numel() for n, p in _peft_gpt.named_parameters() if n.endswith("bias")),
    "reparameterization: LoRA r=8 on c_attn, c_fc": count_parameters(
        add_lora(copy.deepcopy(_peft_gpt), ["c_attn", "c_fc"], r=8)).trainable,
}
for name, n_train in families.items():
    print(f"{name:<46} {n_train:>7,} of {_total:,} ({n_train / _total:.2%})")
assert all(n_train < 0.06 * _total for n_train in families.values()), "claim broke: each trains under 6 %"
torch.manual_seed(0)  # the cells below draw from the same random stream whether or not this cell ran

# %% [markdown]
# ## An instruction dataset
#
# Each record has an instruction, an optional context, and the output we want. minilora builds one from a
# seed (a Yoda-style rewriting task, used again in notebook 5); the records have the shape of Alpaca's.

# %%
train_examples, _ = yoda_dataset(n_train=4, n_val=1, seed=0)
for ex in train_examples[:3]:
    print(f"instruction: {ex.instruction}\ncontext:     {ex.context}\noutput:      {ex.output}\n")
assert all(ex.instruction and ex.output for ex in train_examples), "claim broke: every record has an instruction and an output"

# %% [markdown]
# ## W = B·A: a big matrix from two thin ones
#
# A matrix W of shape m × n has m·n numbers. If it has rank r, it is exactly a product B·A with B of shape m × r
# and A of shape r × n: only r·(m + n) numbers. A matrix of higher rank cannot be written exactly as such a
# product, whatever B and A are (*slide erratum*, notebook 7 §6: the intuition slide says any matrix decomposes
# as B·A); but the truncated SVD gives the *best* rank-r approximation (Eckart–Young),
# W_r = U_r·Σ_r·V_rᵀ, so B = U_r·Σ_r and A = V_rᵀ. Checked on a 200 × 300 matrix built with rank 5:

# %%
g = torch.Generator().manual_seed(0)
m, n, r = 200, 300, 5
M5 = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)
U, S, Vh = torch.linalg.svd(M5, full_matrices=False)
B5, A5 = U[:, :r] * S[:r], Vh[:r]
print(f"rank {int(torch.linalg.matrix_rank(M5))}; {m}·{n} = {m * n:,} numbers, B and A hold {B5.numel() + A5.numel():,}"
      f" = r·(m + n) = {r * (m + n):,}")
print(f"max |W − B·A| = {(M5 - B5 @ A5).abs().max().item():.2e}")
# (that a rank-r matrix is exactly B·A, and the truncated SVD is the best rank-r product, are theorems: checked
# in tests/test_lecture_facts.py, printed here)

# a full-rank matrix: no rank-4 product reproduces it; the SVD's rank-4 product is the closest, closer than
# rank-4 products found any other way (here: 20 random ones, and the best least-squares fit on a random A)
F = torch.randn(60, 80, generator=g, dtype=torch.float64)
U, S, Vh = torch.linalg.svd(F, full_matrices=False)
k = 4
svd_err = (F - (U[:, :k] * S[:k]) @ Vh[:k]).norm().item()
others = []
for _ in range(20):
    A_rand = torch.randn(k, 80, generator=g, dtype=torch.float64)
    B_fit = F @ torch.linalg.pinv(A_rand)          # the best B for this A
    others.append((F - B_fit @ A_rand).norm().item())
print(f"‖F − F_4‖ = {svd_err:.2f} (SVD) vs at best {min(others):.2f} (20 other rank-4 products); ‖F‖ = {F.norm():.2f}")
assert svd_err > 0.5 * F.norm().item(), "claim broke: a full-rank matrix is not close to any rank-4 product"

# %% [markdown]
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
assert sum(losses[-20:]) / 20 < losses[0] - 1.0, "claim broke: the pretraining run lowers the loss"

W = model.get_submodule(layer_name).weight.detach().clone()
print(layer_name, tuple(W.shape))

# %% [markdown]
# ### Batch size and epochs
#
# Two of the hyper-parameters every fine-tuning recipe sets. An **epoch** is one pass over the training data; the
# run above drew 300 batches of 16 windows of 64 bytes at random, printed below as a number of epochs. The
# **batch size** is how many examples one gradient averages: a larger batch gives a less noisy gradient, at the
# price of memory (notebook 4) and compute per step. Measured on the model just trained: the distance between a
# batch's gradient and the gradient of a large batch (128 windows) shrinks like 1/√B — from B = 2 to B = 32 (16×
# the batch) it falls by about 4× (a little less, since the large batch is noisy too); over three seeds, between
# 2.5× and 6×:

# %%
seen = 300 * 16 * 64
print(f"the pretraining run saw {seen:,} bytes = {seen / len(stream.tokens):.2f} epochs of its {len(stream.tokens):,}-byte training text")


def flat_grad(xb, yb):
    model.zero_grad(set_to_none=True)
    model(xb, yb)[1].backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


noise_ratio = []
for seed in range(3):
    gen = torch.Generator().manual_seed(100 + seed)
    g_big = flat_grad(*stream.sample(128, gen))
    noise = {b: sum((flat_grad(*stream.sample(b, gen)) - g_big).norm().item() for _ in range(4)) / 4 for b in (2, 32)}
    noise_ratio.append(noise[2] / noise[32])
    print(f"seed {seed}: ‖g_B − g_128‖ = {noise[2]:.3f} at B = 2, {noise[32]:.3f} at B = 32 ({noise_ratio[-1]:.1f}×)")
model.zero_grad(set_to_none=True)
assert all(2.5 < q < 6 for q in noise_ratio), f"claim broke: 16× the batch, about 4× less gradient noise ({noise_ratio})"

# %% [markdown]
# ### Catastrophic forgetting, and multi-task fine-tuning as the remedy
#
# Fine-tuning on a new task alone can overwrite what the model could do before: *catastrophic forgetting*. The
# remedy the lecture names is **multi-task fine-tuning**: keep examples of the old tasks in the training mix. A
# small version: the model above knows English (task A); the new task B is the same text written backwards.
# Full fine-tuning for 40 steps of 8 windows on B alone, against 40 steps on batches half A, half B (same batch
# size), from the
# same model, three seeds. On every seed, B alone raises the loss on held-out English (forgetting) and the mix
# raises it by less than half as much (the ratio is printed per seed; the claim's bound is ½), while both learn B
# (its loss falls by more than 0.3):

# %%
stream_B = TokenStream(tok.encode(train_text[::-1]), block_size=64)
val_A, val_B = TokenStream(tok.encode(val_text), 64), TokenStream(tok.encode(val_text[::-1]), 64)


def held_out(m) -> tuple[float, float]:
    return tuple(evaluate(m, v, batch_size=32, max_batches=2)["loss"] for v in (val_A, val_B))


def finetune_on(mix: bool, seed: int, steps: int = 40) -> tuple[float, float]:
    m = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        if mix:
            (xa, ya), (xb, yb) = stream.sample(4, gen), stream_B.sample(4, gen)
            xb_, yb_ = torch.cat([xa, xb]), torch.cat([ya, yb])
        else:
            xb_, yb_ = stream_B.sample(8, gen)
        loss = m(xb_, yb_)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return held_out(m)


before_AB = held_out(model)
forgetting = []
for seed in range(3):
    runs = {name: finetune_on(name == "A + B mixed", seed) for name in ("B alone", "A + B mixed")}
    print(f"seed {seed}: " + "; ".join(f"{k}: English loss {a - before_AB[0]:+.3f}, backwards loss {b - before_AB[1]:+.3f}"
                                      for k, (a, b) in runs.items())
          + f"; forgetting ratio mixed / alone {(runs['A + B mixed'][0] - before_AB[0]) / (runs['B alone'][0] - before_AB[0]):.2f}")
    forgetting.append(runs)
for runs in forgetting:
    (a_only, b_only), (a_mix, b_mix) = runs["B alone"], runs["A + B mixed"]
    assert a_only > before_AB[0] and a_mix - before_AB[0] < 0.5 * (a_only - before_AB[0]), \
        "claim broke: B alone forgets English; the mix forgets less than half as much"
    assert b_only < before_AB[1] - 0.3 and b_mix < before_AB[1] - 0.3, "claim broke: both learn B"

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
# At every rank from 1 to 64, the update is more compressible than the weight itself, and both are more
# compressible than noise (lower relative error at the same rank):

# %%
e_rand, e_W, e_dW = errors.values()
for k, a, b, c in zip(ranks, e_dW.tolist(), e_W.tolist(), e_rand.tolist()):
    if k <= 64:
        assert a < b < c, f"claim broke at rank {k}: error(ΔW) {a:.3f} < error(W) {b:.3f} < error(noise) {c:.3f}"
print(f"at rank 8: ΔW keeps all but {e_dW[3]:.0%}, W all but {e_W[3]:.0%}, noise all but {e_rand[3]:.0%}")

# %% [markdown]
# That is the bet LoRA makes: the change fine-tuning needs lives in a few directions.
#
# ## What a trained weight looks like
#
# NF4 (notebook 2) is built on one assumption about *weights* (not about the data): trained weight matrices are
# roughly normally distributed around zero. minilora's GPT starts from N(0, 0.02²), so the initial weights
# are Gaussian by construction; the question is whether they still are after training. The histogram of the
# trained W against the Gaussian with its mean and standard deviation, and the share of weights within 1, 2
# and 3 standard deviations (a Gaussian has 68.3 %, 95.4 % and 99.7 %):

# %%
def gaussian_report(w: torch.Tensor) -> dict:
    """Shares within 1, 2, 3 σ, excess kurtosis, and the Kolmogorov–Smirnov distance to N(mean, std²)."""
    w = w.flatten().double()
    z = ((w - w.mean()) / w.std()).sort().values
    ecdf = torch.arange(1, z.numel() + 1, dtype=torch.float64) / z.numel()
    ks = (ecdf - torch.special.ndtr(z)).abs().max().item()
    return {"within": [(z.abs() <= s).double().mean().item() for s in (1, 2, 3)],
            "kurtosis": (z ** 4).mean().item() - 3, "ks": ks}


gauss = [math.erf(s / math.sqrt(2)) for s in (1, 2, 3)]
reports = {"W at init": gaussian_report(W_init), "trained W": gaussian_report(W)}
for name, rep in reports.items():
    print(f"{name:>10}: within 1/2/3 σ " + " / ".join(f"{p:.3f}" for p in rep["within"]) +
          f"  (Gaussian {' / '.join(f'{p:.3f}' for p in gauss)}), excess kurtosis {rep['kurtosis']:+.2f}, "
          f"KS distance {rep['ks']:.3f}")

fig, ax = plt.subplots(figsize=(7, 3.2))
for name, w in (("W at init", W_init), ("trained W", W)):
    ax.hist(w.flatten().numpy(), bins=120, density=True, histtype="step", label=name)
grid = torch.linspace(W.min().item(), W.max().item(), 400)
mu, sd = W.mean().item(), W.std().item()
ax.plot(grid, torch.exp(-0.5 * ((grid - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi)), "k--", lw=1,
        label="Gaussian, same mean and std")
ax.set_xlabel("weight value"); ax.set_ylabel("density"); ax.set_title(f"{layer_name}.weight"); ax.legend();

# %% [markdown]
# The trained weights stay close to a Gaussian: within 0.05 of each Gaussian share and a small KS distance.
# They are not exactly Gaussian — training gives them heavier tails (positive excess kurtosis) than the
# initial N(0, 0.02²) — which is one reason NF4 scales every block by its own absmax instead of trusting σ.

# %%
rep = reports["trained W"]
assert all(abs(p - q) < 0.05 for p, q in zip(rep["within"], gauss)), f"claim broke: trained W within 1/2/3 σ {rep['within']}"
assert rep["ks"] < 0.05, f"claim broke: trained W is close to a Gaussian (KS distance {rep['ks']:.3f})"
assert rep["kurtosis"] > 0, f"claim broke: positive excess kurtosis after training ({rep['kurtosis']:+.2f})"
assert rep["kurtosis"] > reports["W at init"]["kurtosis"], "claim broke: training makes the tails heavier than at init"

# %% [markdown]
# ## The LoRA layer
#
# LoRA freezes W0 and learns ΔW = (α/r)·B·A next to it, in parallel:
#
#     h = W0·x + (α/r)·B·(A·x)
#
# A (r × in) starts random, B (out × r) starts at **zero**. So at step 0 the update is exactly zero and the
# adapted layer computes what the base layer computes. Both are then trained: A is not a fixed random projection
# (*slide erratum*, notebook 7 §16), and the QLoRA slide swaps the letters A and B (§12).

# %%
torch.manual_seed(0)
base = torch.nn.Linear(128, 512)
lora = LoRALinear(base, r=8, alpha=16)
print(lora)
print("A:", tuple(lora.lora_A.shape), "  B:", tuple(lora.lora_B.shape), "  scaling α/r =", lora.scaling)

x = torch.randn(4, 128)
init_gap = (lora(x) - base(x)).abs().max().item()
print("B is all zeros:", bool((lora.lora_B == 0).all()), "| max |LoRA(x) − W0 x| at init =", init_gap)
print(f"A: {lora.lora_A.unique().numel():,} distinct values of {lora.lora_A.numel():,}, std {lora.lora_A.std():.4f}")
# (shapes, B = 0 and scaling = α/r are the layer's definition: tests/test_lecture_facts.py checks them)
assert init_gap == 0.0, "claim broke: at step 0 the adapted layer computes exactly what the base layer computes"

# the forward pass, written out by hand, against the layer
with torch.no_grad():
    lora.lora_B.normal_()
by_hand = x @ base.weight.T + base.bias + lora.scaling * (x @ lora.lora_A.T) @ lora.lora_B.T
print("max |layer − by hand| =", (lora(x) - by_hand).abs().max().item())
assert torch.allclose(lora(x), by_hand, atol=1e-5), "claim broke: the layer computes W0·x + (α/r)·B·(A·x)"

# %% [markdown]
# ### How A starts: Kaiming-uniform (the default) or a normal distribution
#
# The lecture (and the LoRA paper, Hu et al. 2021) say only that A starts from a random Gaussian; neither gives
# its variance. minilora's default, like PEFT's, is the one `nn.Linear` uses for its own weights:
# Kaiming-uniform with a = √5, i.e. A ~ U(−1/√in, 1/√in): each entry of A·x has the same scale whatever r is.
# `init="gaussian"` draws A ~ N(0, 1/r²) — the variance is **PEFT's choice** (`init_lora_weights="gaussian"`,
# checked against the installed PEFT below), not the slides'. It is unbounded, with a spread that shrinks as r
# grows. Either way B = 0, so the layer starts as the base layer; what differs is the size of A·x: it grows like
# √r under Kaiming-uniform (r entries of fixed scale) and shrinks like 1/√r under N(0, 1/r²):

# %%
inits, Ax_size = {}, {}
for init in ("kaiming", "gaussian"):
    for rank in (4, 16, 64):
        torch.manual_seed(0)
        layer = LoRALinear(torch.nn.Linear(256, 256), r=rank, alpha=16, init=init)
        inits[init, rank] = layer
        Ax = torch.randn(512, 256) @ layer.lora_A.detach().T
        Ax_size[init, rank] = Ax.norm(dim=1).mean().item()
        print(f"{init:>8}, r = {rank:>2}: A in [{layer.lora_A.min():+.3f}, {layer.lora_A.max():+.3f}], "
              f"std {layer.lora_A.std():.4f}, ‖A·x‖ per sample {Ax.norm(dim=1).mean():.2f}, B = 0: {bool((layer.lora_B == 0).all())}")

bound = 1 / math.sqrt(256)
for rank in (4, 16, 64):
    Ak, Ag = inits["kaiming", rank].lora_A, inits["gaussian", rank].lora_A
    assert Ak.abs().max() <= bound, "claim broke: Kaiming-uniform A lies in ±1/√in"
    assert abs(Ag.std().item() - 1 / rank) < 0.1 / rank, "claim broke: the gaussian init has std 1/r"
    assert Ag.abs().max() > 3 / rank, "claim broke: the normal init is unbounded (values beyond 3σ occur)"
try:  # the dev extra installs PEFT; without it this comparison is skipped, and says so
    import peft
except ImportError as err:
    peft = None
    print(f"PEFT is not installed ({err}): the comparison with its init is skipped")
if peft is not None:
    for rank in (4, 16, 64):
        torch.manual_seed(0)
        theirs = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(256, 256)),
                                     peft.LoraConfig(r=rank, lora_alpha=16, target_modules=["0"],
                                                     init_lora_weights="gaussian"))
        A_peft = theirs.base_model.model[0].lora_A["default"].weight
        print(f"PEFT {peft.__version__}, init_lora_weights='gaussian', r = {rank}: std of A {A_peft.std():.4f} (1/r = {1 / rank:.4f})")
        assert abs(A_peft.std().item() - 1 / rank) < 0.1 / rank, "claim broke: N(0, 1/r²) is PEFT's gaussian init"
for init, power in (("kaiming", 0.5), ("gaussian", -0.5)):   # ‖A·x‖ ∝ r^power, within 15 %
    ratio = Ax_size[init, 64] / Ax_size[init, 4]
    assert abs(ratio / 16 ** power - 1) < 0.15, f"claim broke: ‖A·x‖ scales like r^{power} under {init} ({ratio:.2f})"

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
assert drift[0] == 0.0, "claim broke: the logits do not move right after add_lora"

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
unchanged = all(torch.equal(p, base_weights[n]) for n, p in frozen.items())
print(f"{len(frozen)} frozen tensors, all unchanged after training the adapters:", unchanged)
assert drift[-1] > 0.1, "claim broke: training the adapters moves the output away from the base"
assert unchanged and len(frozen) == len(base_weights), "claim broke: every base tensor stays frozen and unchanged"
plots.plot_output_drift(steps, drift, ylabel="max |logits − base logits|");

# %% [markdown]
# ### The same layer in bf16
#
# The cells above compute in fp32 on the CPU. On a GPU, LoRA usually runs in 16 bits; with a bf16 base layer
# the adapters are created in bf16 too and the whole forward is bf16. The output then differs from the fp32
# one by bf16's rounding, a relative error of the order of its unit roundoff 2⁻⁸ ≈ 0.4 % (8 significant bits),
# not more than 1 %:

# %%
torch.manual_seed(0)
base32 = torch.nn.Linear(128, 512)
lora32 = LoRALinear(base32, r=8, alpha=16)
with torch.no_grad():
    lora32.lora_B.normal_(std=0.1)
lora16 = copy.deepcopy(lora32).to(torch.bfloat16)
x = torch.randn(16, 128)
y32, y16 = lora32(x), lora16(x.bfloat16())
rel = ((y16.float() - y32).norm() / y32.norm()).item()
print(f"adapters in {lora16.lora_A.dtype}, output in {y16.dtype}; relative difference to fp32: {rel:.3%}")
assert 1e-4 < rel < 0.01, f"claim broke: bf16 differs from fp32 by rounding of order 2^-8 ({rel:.3%})"

# %% [markdown]
# ## Why the update is scaled by α/r
#
# Adam moves every entry of A and B by about the learning rate per step, whatever r is. Take the first step
# (A random, B = 0, so only B moves) on one training input x: every column of B moves so as to push the output
# for x the same way, so B·A·x is a sum of r contributions that add up — it grows like r. Dividing by r
# cancels that: with α fixed, the change of the output, ΔW·x = (α/r)·B·A·x, has the same size at every rank,
# so the first step's effect on the output does not depend on r. That is the reason the LoRA paper (Hu et al.
# 2021, §4.1) gives for setting α once, to the first r it tries, and not retuning the learning rate when r changes
# (the paper's practice, not measured here). Without the 1/r the output change grows with r.
#
# In directions other than x the r contributions add up like random vectors (like √r), so the whole matrix,
# ‖ΔW‖_F, shrinks like 1/√r under α/r, and stays the same under α/√r. Measured after one Adam step (lr 10⁻³) on a
# 256 × 256 layer, ranks 2 to 64:

# %%
def first_step(rank: int, rule: str) -> tuple[float, float]:
    """(‖ΔW·x‖ / ‖W0·x‖, ‖ΔW‖_F / ‖W0‖_F) after one Adam step on a single input x."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(256, 256), r=rank, alpha=16, use_rslora=(rule == "α/√r"))
    if rule == "α":
        layer.scaling = layer.alpha          # the same layer without the 1/r
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(1, 256, generator=g), torch.randn(1, 256, generator=g)
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-3)
    (layer(x) - target).square().mean().backward()
    opt.step()
    with torch.no_grad():
        dW, W0 = layer.delta_weight(), layer.base_layer.weight
        return ((x @ dW.T).norm() / (x @ W0.T).norm()).item(), (dW.norm() / W0.norm()).item()


scale_ranks = [2, 4, 8, 16, 32, 64]
on_x, frob = {}, {}
for rule in ("α/r", "α/√r", "α"):
    on_x[rule], frob[rule] = zip(*[first_step(rk, rule) for rk in scale_ranks])
    print(f"scaling {rule:>4}: ‖ΔW·x‖/‖W0·x‖ " + " ".join(f"{v:.4f}" for v in on_x[rule]) +
          "  | ‖ΔW‖/‖W0‖ " + " ".join(f"{v:.4f}" for v in frob[rule]))
spread = lambda v: max(v) / min(v)  # noqa: E731
print(f"largest / smallest over r = 2..64 — output change: α/r {spread(on_x['α/r']):.1f}×, α {spread(on_x['α']):.0f}×; "
      f"whole matrix: α/√r {spread(frob['α/√r']):.2f}×, α/r r=64 vs r=2: {frob['α/r'][-1] / frob['α/r'][0]:.2f}"
      f" (1/√32 = {1 / math.sqrt(32):.2f})")
assert spread(on_x["α/r"]) < 2, "claim broke: with α/r the output change has about the same size at every rank"
assert on_x["α"][-1] / on_x["α"][0] > 10, "claim broke: without the 1/r the output change grows with r"
assert spread(frob["α/√r"]) < 1.5, "claim broke: α/√r keeps ‖ΔW‖_F about fixed"
assert 0.1 < frob["α/r"][-1] / frob["α/r"][0] < 0.3, "claim broke: under α/r ‖ΔW‖_F shrinks like 1/√r"

fig, ax = plt.subplots(1, 2, figsize=(9, 3))
for rule in on_x:
    ax[0].loglog(scale_ranks, on_x[rule], "o-", label=f"scaling {rule}")
    ax[1].loglog(scale_ranks, frob[rule], "o-", label=f"scaling {rule}")
ax[0].set_title("output change on x, ‖ΔW·x‖/‖W0·x‖"); ax[1].set_title("whole update, ‖ΔW‖/‖W0‖")
for a_ in ax:
    a_.set_xlabel("rank r")
ax[0].legend();

# %% [markdown]
# ### What rsLoRA is for
#
# rsLoRA (rank-stabilized LoRA, Kalajdzievski 2023; `use_rslora=True` in minilora and PEFT) scales by α/√r
# instead. Its reason is **learning that stays stable as r grows**, over a whole training run — not one step on
# one input. The paper shows that under α/r the adapters' gradients shrink as r grows, so large ranks learn
# more slowly and end no better than small ones (its experiments, paper only: the training curves of very
# different ranks nearly coincide under α/r and separate under α/√r); α/√r is the scaling that keeps the
# gradients and activations of the adapter at the same size for every r. The one-step check above invites the
# opposite conclusion only because Adam divides every gradient by its own size: the first step of Adam is about
# lr per entry whatever the gradient's size. The gradient itself, which plain SGD would follow and which sets
# how Adam's moments build up, is where α/r and α/√r differ. Measured at step 0 (B's gradient; A's is 0 while
# B = 0), ranks 2 to 64: under α/r it shrinks like 1/√r (r = 64 against r = 2: between 0.1 and 0.3, 1/√32 ≈ 0.18),
# under α/√r it stays within 1.5× over the whole range:

# %%
def grad_B_norm(rank: int, rslora: bool) -> float:
    """‖∂L/∂B‖_F at step 0 on 32 inputs (same layer, data and target at every rank)."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(256, 256), r=rank, alpha=16, use_rslora=rslora)
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(32, 256, generator=g), torch.randn(32, 256, generator=g)
    (layer(x) - target).square().mean().backward()
    return layer.lora_B.grad.norm().item()


gradB = {rule: [grad_B_norm(rk, rule == "α/√r") for rk in scale_ranks] for rule in ("α/r", "α/√r")}
for rule, v in gradB.items():
    print(f"scaling {rule:>4}: ‖∂L/∂B‖ at r = {scale_ranks}: " + " ".join(f"{g_:.4f}" for g_ in v))
assert 0.1 < gradB["α/r"][-1] / gradB["α/r"][0] < 0.3, "claim broke: under α/r B's gradient shrinks like 1/√r"
assert spread(gradB["α/√r"]) < 1.5, "claim broke: under α/√r B's gradient keeps its size"

# %% [markdown]
# ## How many parameters does LoRA train?
#
# The lecture's table treats a model of N parameters as if it were one square matrix of side √N. LoRA of rank r
# on it trains A (r × √N) and B (√N × r): 2·r·√N numbers. `minilora.params.slide_table` computes every cell;
# below, each cell is printed the slide's way (rounded) next to the figure the slide shows (typed in from the
# slide, only for comparison). Where they differ, the slide cut off the digits instead of rounding; notebook 7
# lists which cells the slide rounds and which it truncates.

# %%
SLIDE = {  # the slide's printed figures
    "1": ["167K", "228K", "529K", "849K"], "2": ["334K", "456K", "1M", "2M"],
    "8": ["1M", "2M", "4M", "7M"], "16": ["3M", "4M", "8M", "14M"],
    "512": ["86M", "117M", "270M", "434M"], "1024": ["171M", "233M", "542M", "869M"],
    "8192": ["1.4B", "1.8B", "4.3B", "7B"], "Full": ["7B", "13B", "70B", "180B"],
}


def truncated(x: float) -> str:
    """format_count's unit and digits, cut off instead of rounded."""
    for unit, size, digits in (("B", 1e9, 1), ("M", 1e6, 0), ("K", 1e3, 0)):
        if x >= size:
            v = math.floor(x / size * 10 ** digits) / 10 ** digits
            return (f"{v:.{digits}f}".removesuffix(".0") if digits else f"{int(v)}") + unit
    return str(int(x))


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
            differs.append((rank, m, row[m], slide_cell))
        cells.append(f"{ours:>6}{mark:>16}")
    print(f"{rank:>6} | " + " | ".join(cells))
print("\ncells where the slide truncates:")
for rank, m, exact, slide_cell in differs:
    print(f"  rank {rank:>5}, {m:>4}: 2·r·√N = {exact:>13,.0f}, slide prints {slide_cell}, cut off: {truncated(exact)}")
    assert truncated(exact) == slide_cell, f"claim broke: the slide's {slide_cell} (rank {rank}, {m}) is the truncated count"
assert differs, "claim broke: some cells differ from the rounded count"
plots.plot_lora_table(table);

# %% [markdown]
# A real model is not one square matrix: it has many layers, each with its own in × out shape, and LoRA adds
# r·(in + out) per adapted layer. (Which layers to adapt: the LoRA paper adapted attention only, and its own
# table favours all four attention matrices — *slide errata*, notebook 7 §8; how small r can be: §10.)
# For LLaMA-2 7B's shapes (its 6.74B parameters: the linear layers, two
# 32,000 × 4,096 embedding matrices and 65 RMSNorm vectors), the real count is several times the
# square-matrix estimate — already with only the attention's q and v adapted, the LoRA paper's choice:

# %%
llama = linear_shapes_llama()
llama_total = sum(i * o for i, o in llama.values()) + 2 * 32000 * 4096 + 65 * 4096
print(f"LLaMA-2 7B: {llama_total:,} parameters")
for targets in (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]):
    for rank in (8, 16):
        n = lora_params_real(llama, targets, rank)
        print(f"r={rank:>2}, {'+'.join(t.split('_')[0] for t in targets):>26}: {n:>12,} ({format_count(n)}), "
              f"{100 * n / llama_total:.3f}% of 6.74B")
qv8 = lora_params_real(llama, ["q_proj", "v_proj"], 8)
print(f"the square-matrix estimate at r=8: {format_count(table['8']['7B'])}; q and v at r=8: {format_count(qv8)}")
assert qv8 > 3 * table["8"]["7B"], "claim broke: the real count is several times the square-matrix estimate"

# %% [markdown]
# ## Merging
#
# After training, W = W0 + (α/r)·B·A is one ordinary matrix. `merge_lora` folds every adapter into its base
# weight and puts plain `nn.Linear` layers back: the merged model computes the same function (to fp32
# rounding), with no extra matmul at inference. The adapter alone (A and B) is what one saves and shares: here
# under 10 % of the model's bytes.

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
gap = (merged_logits - lora_logits).abs().max().item()
print("before merge:", before)
print("after merge: ", after)
print("LoRA layers left:", len(minilora.lora_layers(model)))
print("max |merged − LoRA logits| =", gap)
print(f"full model in fp32: {4 * after.total:,} bytes; the adapter is {adapter_bytes / (4 * after.total):.1%} of it")
assert len(minilora.lora_layers(model)) == 0 and after.total == before.total - before.trainable, \
    "claim broke: merging leaves plain layers and only the base's parameters"
assert gap < 1e-3, f"claim broke: the merged model computes the same function ({gap:.2e})"
assert adapter_bytes < 0.1 * 4 * after.total, "claim broke: the adapter is under 10 % of the model's bytes"

# %% [markdown]
# ## What the LoRA paper measured against full fine-tuning (paper only)
#
# The lecture shows the LoRA paper's GPT-2 table (Hu et al. 2021, Table 3: GPT-2 medium and large on the E2E NLG
# Challenge). Its figures are the paper's, typed in below, not computed here: LoRA trains about 0.1 % of the
# parameters of full fine-tuning (FT) and scores at least as well on every metric the table reports for
# GPT-2 medium. (Notebook 5 compares full fine-tuning, LoRA and QLoRA on a task this machine can train.)

# %%
E2E = {  # LoRA paper, Table 3, GPT-2 M: trainable parameters (M), BLEU, NIST, METEOR, ROUGE-L, CIDEr
    "FT": (354.92, 68.2, 8.62, 46.2, 71.0, 2.47),
    "Adapter (L)": (0.37, 66.3, 8.41, 45.0, 69.8, 2.40),
    "PreLayer": (0.35, 69.7, 8.81, 46.1, 71.4, 2.49),
    "LoRA": (0.35, 70.4, 8.85, 46.8, 71.8, 2.53),
}
print(f"{'GPT-2 M':<12} {'params (M)':>10} {'BLEU':>6} {'NIST':>6} {'MET':>6} {'ROUGE-L':>8} {'CIDEr':>6}")
for name, row in E2E.items():
    print(f"{name:<12} {row[0]:>10.2f} " + " ".join(f"{v:>6.2f}" for v in row[1:]))
lora_share = E2E["LoRA"][0] / E2E["FT"][0]
print(f"LoRA trains {lora_share:.2%} of FT's parameters")
assert lora_share < 0.002 and all(l_ >= f_ for l_, f_ in zip(E2E["LoRA"][1:], E2E["FT"][1:])), \
    "claim broke (as typed in from the paper): about 0.1 % of the parameters, at least as good on every metric"

# %% [markdown]
# ## Exercises
#
# Fill in each `answer_…` (they start as `None`) and run the check cell below: it says "fill in …" while an
# answer is `None`, and stops with an assertion when a filled-in answer is wrong.
#
# 1. How many parameters does LoRA of rank 4 add to an `nn.Linear(300, 500)`?
# 2. A and B are random, r = 3, the layer is 20 × 30. What is the rank of ΔW = B·A?
# 3. r = 32 and α = 16: what is the scaling LoRA multiplies B·A by?
# 4. The lecture's square-matrix estimate for a 1B-parameter model at rank 4 (to the nearest integer)?
# 5. You double r and keep α fixed. By what factor does the scaling change?
# 6. *Code it:* write LoRA's forward pass, h = W0·x + b + (α/r)·B·(A·x), for a batch of row vectors x in
#    `my_lora_forward` below. The check compares it with minilora's `LoRALinear` once it returns something.

# %%
answer_1 = None  # parameters added by rank-4 LoRA on Linear(300, 500)
answer_2 = None  # rank of B·A for r = 3 on a 20 × 30 layer
answer_3 = None  # scaling for r = 32, α = 16
answer_4 = None  # 2·r·√N for N = 1e9, r = 4, nearest integer
answer_5 = None  # factor by which the scaling changes when r doubles


def my_lora_forward(x, W0, b, A, B, alpha, r):
    """Exercise 6: x is (batch, in), W0 (out, in), b (out,), A (r, in), B (out, r). Replace the `return None`."""
    return None


# %%
def check(name, answer, expected, tol=0.0):
    """'fill in' while the answer is None; an AssertionError (without the solution) when it is wrong."""
    if answer is None:
        print(f"fill in {name}")
        return
    assert abs(float(answer) - float(expected)) <= tol, f"{name} = {answer} is not right yet; try again"
    print(f"{name}: right")


check("answer_1", answer_1, count_parameters(LoRALinear(torch.nn.Linear(300, 500), r=4)).trainable)
_l = LoRALinear(torch.nn.Linear(30, 20), r=3)
with torch.no_grad():
    _l.lora_B.normal_()
check("answer_2", answer_2, int(torch.linalg.matrix_rank(_l.delta_weight())))
check("answer_3", answer_3, LoRALinear(torch.nn.Linear(64, 64), r=32, alpha=16).scaling, tol=1e-9)
check("answer_4", answer_4, minilora.params.lora_params_square(1e9, 4), tol=1.0)
check("answer_5", answer_5, LoRALinear(torch.nn.Linear(64, 64), r=16, alpha=16).scaling
      / LoRALinear(torch.nn.Linear(64, 64), r=8, alpha=16).scaling, tol=1e-9)

_lay = LoRALinear(torch.nn.Linear(24, 40), r=4, alpha=12)
with torch.no_grad():
    _lay.lora_B.normal_()
_x6 = torch.randn(7, 24)
_h6 = my_lora_forward(_x6, _lay.base_layer.weight.detach(), _lay.base_layer.bias.detach(), _lay.lora_A.detach(),
                      _lay.lora_B.detach(), 12, 4)
if _h6 is None:
    print("fill in my_lora_forward")
else:
    assert torch.allclose(_h6, _lay(_x6), atol=1e-5), "my_lora_forward is not LoRALinear's forward yet; try again"
    print("my_lora_forward: right")
