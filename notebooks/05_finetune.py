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
# # 5 · Fine-tuning the GPT: full vs LoRA vs QLoRA
#
# Everything so far, put to work. A small GPT pretrained on English learns an instruction task three ways,
# with the same trainer, data, steps and batches:
#
# - **full**: every weight trains (and needs gradients and AdamW state): $W \leftarrow W - \eta\,\mathrm{AdamW}(\nabla_W L)$,
# - **LoRA**: the base $W_0$ is frozen; low-rank adapters on every linear layer train:
#   $h = W_0 x + \frac{\alpha}{r} B A x$ with $B$ of shape $d \times r$, $A$ of shape $r \times k$ and $r \ll \min(d, k)$,
# - **QLoRA**: the same, with the frozen base stored in NF4 with double quantization:
#   $h = \mathrm{doubleDequant}(c_1, c_2, W_0^{\mathrm{NF4}})\, x + \frac{\alpha}{r} B A x$.
#
# Then the questions the lecture raises, each answered by a measurement in this run: does merging the adapter
# change the answers; what does re-quantizing a merged QLoRA model cost; does fine-tuning make the model forget
# English; could a few examples in the prompt (in-context learning) do the job instead; and how do the rank,
# α and the learning rate matter. Every sentence that states a number or a comparison is followed by a cell
# that asserts it.
#
# The base model is the end-to-end demo's (`python -m minilora demo`): pretrained once and cached
# (`minilora.demos.get_base`, under `~/.cache/minilora` or `$MINILORA_CACHE`), so this notebook only
# fine-tunes. Everything computes in fp32 on the CPU (QLoRA's dequantized matmuls too); the lecture's bf16
# path changes the speed on a GPU, not the story.

# %%
import copy
import time
from dataclasses import asdict

import matplotlib.pyplot as plt
import torch

from minilora import GPT, LoRALinear, merge_lora, merge_qlora, plots
from minilora.data import IGNORE, InstructionSet, TokenStream, english_documents, load_tokenizer, prompt, \
    split_documents, yoda_dataset
from minilora.demos import DemoConfig, get_base
from minilora.memory import estimate as estimate_memory, scaled_config
from minilora.evaluate import evaluate, greedy_matches
from minilora.generate import respond
from minilora.train import TrainConfig, train

demo = DemoConfig(progress=False)  # the demo's settings: same base, same task, same fine-tuning budget
t_start = time.perf_counter()
base_dir, cached = get_base(demo, log=print)
print(f"base model: {base_dir} ({'from the cache' if cached else 'pretrained just now, cached for next time'})")
LR = {"full": demo.lr_full, "lora": demo.lr_lora, "qlora": demo.lr_lora}
print(f"fine-tuning: {demo.steps} steps of {demo.batch_size} examples; rank {demo.r}, alpha {demo.alpha}, "
      f"targets {demo.targets}; learning rates {LR}")

# %% [markdown]
# ## The instruction task
#
# Rewrite a plain sentence the way Yoda speaks: the verb phrase moves to the front, the subject and its modal
# to the end. Every record is (instruction, context, output); the loss covers only the output tokens, and a
# held-out sentence counts as solved when the model's greedy answer equals the reference exactly. **No
# held-out sentence appears in the training set.**

# %%
train_examples, val_examples = yoda_dataset(n_train=demo.n_train, n_val=demo.n_val, seed=demo.seed)
for ex in train_examples[:3]:
    print(f"{ex.instruction:<24} {ex.context:<48} -> {ex.output}")
tok = load_tokenizer(base_dir)
train_set = InstructionSet(train_examples, tok, demo.block_size)
val_set = InstructionSet(val_examples, tok, demo.block_size)
print(f"{len(train_examples)} training and {len(val_examples)} held-out examples")

# %%
assert not {e.context for e in val_examples} & {e.context for e in train_examples}, \
    "claim 'no held-out sentence appears in the training set' broke"

# %% [markdown]
# ## The base model, and held-out English to watch for forgetting
#
# The base never saw this word order: **it solves (almost) none of the held-out sentences** (at most 2 %).
# To measure forgetting we keep the base's own held-out English (the validation split of its pretraining
# text) and compute the language-modelling loss on it before and after each fine-tune.

# %%
_, english_val_text = split_documents(english_documents())
english_val = TokenStream(tok.encode(english_val_text), demo.block_size)
base = GPT.from_pretrained(base_dir)
before = evaluate(base, val_set)
english = {"base": evaluate(base, english_val)["loss"]}
print(f"base model on the held-out sentences: loss {before['loss']:.3f}, exact match {before['exact_match']:.1%}")
print(f"base model on held-out English: loss {english['base']:.3f} ({english_val.tokens.numel():,} tokens)")
shown = val_examples[:3]
answers = {"base": [respond(base, tok, e.instruction, e.context, max_new_tokens=30) for e in shown]}

# %%
assert before["exact_match"] <= 0.02, f"claim 'the base solves (almost) none' broke: {before['exact_match']:.1%}"

# %% [markdown]
# ## In-context learning: show the base a few examples instead
#
# The lecture's first alternative to fine-tuning: put task demonstrations in the prompt and let the frozen
# model continue the pattern. The base's context is only 96 tokens, so the prompt holds as many solved
# examples as fit in front of each held-out sentence — one in the task's own format, or two in a compact
# "sentence -> Yoda" format — and the answer is scored with the same exact-match metric (one forward pass:
# greedy decoding reproduces the reference exactly when the argmax is right at every answer position).

# %%
def few_shot_rows(shots, query, compact: bool):
    """(prompt ids, answer ids): the shots, solved, then the query, in the task's template or compact."""
    if compact:
        text = "".join(f"{s.context} -> {s.output}\n" for s in shots) + f"{query.context} ->"
        answer = " " + query.output
    else:
        text = "".join(prompt(s.instruction, s.context) + s.output + "\n\n" for s in shots)
        text += prompt(query.instruction, query.context)
        answer = query.output
    return tok.encode(text), tok.encode(answer) + [tok.eos_id]


@torch.no_grad()
def few_shot_exact_match(model, k: int, compact: bool) -> tuple[float, int]:
    """Exact match of greedy answers with k training examples in the prompt; (rate, sentences that fit)."""
    rows = [few_shot_rows(train_examples[3 * i:3 * i + k], q, compact) for i, q in enumerate(val_examples)]
    rows = [(p, a) for p, a in rows if len(p) + len(a) - 1 <= demo.block_size]
    T = max(len(p) + len(a) - 1 for p, a in rows)
    x = torch.full((len(rows), T), tok.eos_id)
    y = torch.full((len(rows), T), IGNORE)
    for i, (p, a) in enumerate(rows):
        ids = torch.tensor(p + a)
        x[i, :len(ids) - 1] = ids[:-1]
        y[i, len(p) - 1:len(ids) - 1] = torch.tensor(a)
    return greedy_matches(model.eval()(x), y).float().mean().item(), len(rows)


icl = {}
for k, compact in ((0, True), (1, False), (1, True), (2, True)):
    rate, n = few_shot_exact_match(base, k, compact)
    icl[(k, compact)] = rate
    print(f"{k} shot(s), {'compact' if compact else 'task template'}: exact match {rate:.1%} "
          f"on the {n} held-out sentences whose prompt fits")

# %% [markdown]
# (The assert for in-context learning comes after the fine-tunes, next to the number it is compared with.)
#
# ## Three fine-tunes
#
# Same data, same steps, same batches (one seed), the demo's recipe (`DemoConfig.train_config`): AdamW with 10
# warm-up steps and a cosine decay to a tenth of the rate, 1e-3 for full fine-tuning and 5e-3 for the adapters
# (higher, as is usual), adapters of rank $r = 16$ with $\alpha = 64$ ($\alpha / r = 4$) on every linear
# layer and the output head. `measure_memory=True` measures the bytes of one training step of each (weights,
# gradients, optimizer state, saved activations). After each fine-tune, the held-out English loss is measured
# again.
#
# How the recipe was found. With rank 8 and 400 steps, the demo's first recipe, LoRA and QLoRA were still far
# from converged on some seeds: on seed 2, 44 % and 36 % exact match (validation loss 0.111 and 0.119) against
# 98 % for full fine-tuning (0.017). Their validation loss after 100 steps sat near 0.9 whatever the learning
# rate, warm-up or rank, against 0.3–0.6 for full fine-tuning: the adapters start from $B = 0$ and find the
# task later. A higher rate did not make up for it (on seed 0, 1e-2 gave 76 % and 2e-2 diverged), nor did a
# lower one (2e-3: 30 %), 50 warm-up steps or a constant rate; rank 16 and 600 steps converge on every seed
# measured (the spread is below, after the results table).

# %%
results = {}
for mode in ("full", "lora", "qlora"):
    cfg = demo.train_config(mode, compute_dtype="float32")  # the demo's recipe, exactly
    results[mode] = train(GPT.from_pretrained(base_dir), cfg, train_set, val_set, measure_memory=True)
    english[mode] = evaluate(results[mode].model, english_val)["loss"]
    answers[mode] = [respond(results[mode].model, tok, e.instruction, e.context, max_new_tokens=30) for e in shown]
    print(f"{mode:>5}: {results[mode].params}; {results[mode].seconds:.0f} s; exact match by step: "
          + ", ".join(f"{e['step']}: {e['exact_match']:.0%}" for e in results[mode].evals))

fig = plots.plot_loss_curves({m: r.losses for m, r in results.items()}, {m: r.evals for m, r in results.items()},
                             title="Yoda fine-tuning: training and validation loss")

# %% [markdown]
# ## The results table
#
# Memory is what one measured training step holds (fp32 on the CPU here; on a GPU the base would be 16-bit).
# Time is given relative to full fine-tuning, measured in this run (it depends on the machine's load and is
# not asserted). **All three reach at least 90 % exact match on the held-out sentences**, and **LoRA and QLoRA
# reach a validation loss at most twice full fine-tuning's** (the next section shows how far from these bounds
# the recorded seeds are). On this tiny model LoRA trains **under a fifth of the parameters** full fine-tuning
# trains (at the same rank on a 1B-parameter GPT it is under 1 %: LoRA's share shrinks as the layers widen),
# QLoRA holds **fewer weight bytes** than LoRA, and the measured step totals order **full > LoRA > QLoRA**.

# %%
MB = 1e6
t_full = results["full"].seconds
print(f"{'mode':<6} {'trainable':>10} {'weights':>9} {'grads':>8} {'optim.':>8} {'activ.':>8} {'total':>8} "
      f"{'val loss':>8} {'exact':>6} {'time':>6}")
print(f"{'base':<6} {'-':>10} {'':>9} {'':>8} {'':>8} {'':>8} {'':>8} {before['loss']:>8.3f} "
      f"{before['exact_match']:>6.1%} {'':>6}")
for mode, r in results.items():
    m = r.memory
    print(f"{mode:<6} {r.params.trainable:>10,} {(m.weights + m.quantized_weights + m.adapters) / MB:>7.2f}MB "
          f"{(m.gradients + m.adapter_gradients) / MB:>6.2f}MB {(m.optimizer_state + m.adapter_optimizer_state) / MB:>6.2f}MB "
          f"{m.activations / MB:>6.2f}MB {m.total / MB:>6.2f}MB {r.final['loss']:>8.3f} {r.final['exact_match']:>6.1%} "
          f"{r.seconds / t_full:>5.2f}×")

# %%
CLAIM_EXACT_MATCH, CLAIM_LOSS_RATIO = 0.90, 2.0  # the two claims above; the next section gives their margins
final = {m: r.final for m, r in results.items()}
for mode, f in final.items():
    assert f["exact_match"] >= CLAIM_EXACT_MATCH, \
        f"claim 'all three reach ≥ 90 % exact match' broke: {mode} {f['exact_match']:.1%}"
for mode in ("lora", "qlora"):
    assert final[mode]["loss"] <= CLAIM_LOSS_RATIO * final["full"]["loss"], \
        f"claim '{mode} reaches at most twice full fine-tuning's validation loss' broke: {final}"
assert results["lora"].params.trainable < 0.20 * results["full"].params.trainable, "claim 'LoRA trains < 20 %' broke"
big = estimate_memory(scaled_config(1_000_000_000, n_layer=18, n_embd=2048, n_head=16), "lora", r=demo.r,
                      batch_size=1, seq_len=1)
print(f"rank {demo.r} on every block's linear layers of a 1B GPT: {big.n_trainable / big.n_params:.2%} trainable")
assert big.n_trainable < 0.01 * big.n_params, "claim 'under 1 % on a 1B-parameter GPT' broke"
w = {m: r.memory.weights + r.memory.quantized_weights + r.memory.adapters for m, r in results.items()}
assert w["qlora"] < w["lora"], f"claim 'QLoRA holds fewer weight bytes than LoRA' broke: {w}"
tot = {m: r.memory.total for m, r in results.items()}
assert tot["full"] > tot["lora"] > tot["qlora"], f"claim 'full > LoRA > QLoRA in memory' broke: {tot}"

# %% [markdown]
# ## The same recipe on other seeds
#
# One run is one draw: the seed fixes the base's pretraining, the data and the adapters' initialization, and
# the trajectory also depends on the CPU's floating-point paths. The demo was run with this recipe for several
# seeds (`python -m minilora demo --seed S --no-progress`, recorded by `tools/seed_spread.py` in
# `notebooks/seed_spread.json`, together with the recipe, which must be this notebook's; the recipe was chosen
# while looking at seeds 0–2, and the later seeds were run with it unchanged). The claims above are
# kept **at least 5 points of exact match below the lowest recorded run**, and the loss bound at least
# **1.5 times the largest recorded ratio** of LoRA's or QLoRA's validation loss to full fine-tuning's.

# %%
import json
from pathlib import Path

import minilora

recorded = json.loads((Path(minilora.__file__).resolve().parent.parent / "notebooks" / "seed_spread.json").read_text())
recipe = {k: v for k, v in json.loads(json.dumps(asdict(demo))).items()
          if k not in ("seed", "out", "overwrite", "cache", "progress", "n_show")}
assert recorded["recipe"] == recipe, "seed_spread.json was recorded with another recipe: run tools/seed_spread.py again"
print(f"recorded {recorded['recorded']} on {recorded['machine']}: {recorded['command']}")
print(f"{'seed':>4} " + " ".join(f"{m + ' exact / loss':>22}" for m in ("full", "lora", "qlora")))
for run in recorded["runs"]:
    print(f"{run['seed']:>4} " + " ".join(f"{run[m]['exact_match']:>13.1%} / {run[m]['loss']:.4f}"
                                          for m in ("full", "lora", "qlora")))
lowest = min(run[m]["exact_match"] for run in recorded["runs"] for m in ("full", "lora", "qlora"))
worst_ratio = max(run[m]["loss"] / run["full"]["loss"] for run in recorded["runs"] for m in ("lora", "qlora"))
print(f"{len(recorded['runs'])} seeds: lowest exact match {lowest:.1%} (the claim: ≥ {CLAIM_EXACT_MATCH:.0%}, "
      f"{100 * (lowest - CLAIM_EXACT_MATCH):.1f} points below it); largest loss ratio to full fine-tuning "
      f"{worst_ratio:.2f} (the claim: ≤ {CLAIM_LOSS_RATIO:g}, {CLAIM_LOSS_RATIO / worst_ratio:.1f}× above it)")
print(f"this run (seed {demo.seed}): " + ", ".join(f"{m} {f['exact_match']:.1%} / {f['loss']:.4f}" for m, f in final.items()))

# %%
assert len(recorded["runs"]) >= 3, "claim 'recorded over at least three seeds' broke"
assert lowest >= CLAIM_EXACT_MATCH + 0.05, f"claim 'at least 5 points of margin' broke: lowest {lowest:.1%}"
assert CLAIM_LOSS_RATIO >= 1.5 * worst_ratio, f"claim 'loss bound 1.5× the largest ratio' broke: {worst_ratio:.2f}"

# %% [markdown]
# ## Generations, before and after
#
# Greedy answers on held-out sentences the fine-tunes never saw:

# %%
for i, ex in enumerate(shown):
    print(f"context:   {ex.context}\nreference: {ex.output}")
    for who, outs in answers.items():
        print(f"{who + ':':<10} {outs[i]!r}")
    print()

# %% [markdown]
# ## In-context learning against fine-tuning
#
# With the same metric, **the best few-shot prompt stays far below every fine-tune** (under half of the
# lowest fine-tuned exact match). A 0.9M-parameter model trained on documentation prose has no instruction
# following to fall back on; large models do much better in context, which is why the lecture suggests
# trying prompting first. What it costs here: the few-shot prompt has to be paid for at every query, the
# fine-tune once.

# %%
best_icl = max(icl.values())
print(f"best few-shot exact match {best_icl:.1%}; lowest fine-tuned {min(f['exact_match'] for f in final.values()):.1%}")
assert best_icl < 0.5 * min(f["exact_match"] for f in final.values()), \
    "claim 'few-shot stays under half of every fine-tune' broke"

# %% [markdown]
# ## Merging: the same model without the adapter
#
# `merge_lora` folds W0 + (α/r)·B·A into each base weight and removes the adapters: one plain GPT again, no
# extra latency. **The merged model gives the same logits (to 1e-4, relative) and the same greedy answers.**
#
# A QLoRA model cannot be merged into its 4-bit weights as they are: `merge_qlora` dequantizes each base
# weight, adds (α/r)·B·A in fp32 and gives a dense model, **as exact as the LoRA merge**; with
# `requantize=True` it rounds the merged weight back to NF4 to keep the memory saving, which **adds a
# rounding error of several percent per weight matrix** (‖Q(W) − W‖/‖W‖ between 2 % and 20 %) and moves the
# logits **far more than the dense merge does**.

# %%
def logit_gap(a, b) -> float:
    """max |logits_a − logits_b| / max |logits_b| over the held-out batch."""
    x, _ = val_set.collate(list(range(len(val_set))))
    with torch.no_grad():
        la, lb = a.eval()(x), b.eval()(x)
    return ((la - lb).abs().max() / lb.abs().max()).item()


merged_lora = merge_lora(copy.deepcopy(results["lora"].model))
merged_q = {rq: merge_qlora(copy.deepcopy(results["qlora"].model), requantize=rq) for rq in (False, True)}
gaps = {"LoRA, merged": logit_gap(merged_lora, results["lora"].model),
        "QLoRA, merged (dense)": logit_gap(merged_q[False][0], results["qlora"].model),
        "QLoRA, merged + re-quantized": logit_gap(merged_q[True][0], results["qlora"].model)}
em = {"LoRA, merged": evaluate(merged_lora, val_set)["exact_match"],
      "QLoRA, merged (dense)": evaluate(merged_q[False][0], val_set)["exact_match"],
      "QLoRA, merged + re-quantized": evaluate(merged_q[True][0], val_set)["exact_match"]}
rounding = merged_q[True][1]
for name in gaps:
    print(f"{name:<30} logits differ by {gaps[name]:.1e} (relative); exact match {em[name]:.1%}")
print(f"re-quantizing the merged weights: ‖Q(W) − W‖/‖W‖ from {min(rounding.values()):.3f} to "
      f"{max(rounding.values()):.3f} over {len(rounding)} layers")

# %%
assert gaps["LoRA, merged"] < 1e-4, f"claim 'merged LoRA gives the same logits' broke: {gaps['LoRA, merged']:.1e}"
assert em["LoRA, merged"] == final["lora"]["exact_match"], "claim 'merged LoRA gives the same answers' broke"
assert gaps["QLoRA, merged (dense)"] < 1e-4, "claim 'the dense QLoRA merge is as exact as the LoRA merge' broke"
assert 0.02 < min(rounding.values()) and max(rounding.values()) < 0.2, f"claim 'several percent' broke: {rounding}"
assert gaps["QLoRA, merged + re-quantized"] > 10 * gaps["QLoRA, merged (dense)"], \
    "claim 're-quantizing moves the logits far more than the dense merge' broke"

# %% [markdown]
# ## Forgetting
#
# The lecture lists "less prone to catastrophic forgetting" among LoRA's advantages, because the original
# weights stay as they are (Biderman et al., *LoRA Learns Less and Forgets Less*, 2024, measure this on large
# models). Here the held-out English loss before and after each fine-tune is what this run measures; the
# sentence under the numbers is generated from them, not written in advance.

# %%
print(f"{'model':<6} {'English loss':>12} {'change':>8}")
for who, loss in english.items():
    print(f"{who:<6} {loss:>12.3f} {loss - english['base']:>+8.3f}")
rise = {m: english[m] - english["base"] for m in results}
order = sorted(rise, key=rise.get)
print(f"\nmeasured: the English loss rose least after {order[0]} ({rise[order[0]]:+.3f}) and most after "
      f"{order[-1]} ({rise[order[-1]]:+.3f}).")
if rise["lora"] < rise["full"]:
    print("On this run LoRA forgot less English than full fine-tuning, as the lecture says.")
else:
    print("On this run LoRA did NOT forget less English than full fine-tuning: the lecture's claim does not "
          "hold at this size and budget.")

# %% [markdown]
# ## Hyper-parameters: rank, α and the learning rate
#
# The lecture: "the LoRA paper recommends a rank of 8 as the minimum; higher ranks lead to better results".
# And the scaling α/r: with **α fixed**, raising r shrinks every update's scale (α/r); with **α/r fixed**
# (here 4, the demo's 64/16) the scale stays and only the rank changes. A sweep of LoRA runs, shorter than
# the main table's (the same data and seed), at two learning rates, shows how this task responds. The
# conclusions under the plot are computed from the sweep.

# %%
SWEEP_STEPS = 100
RANKS = [1, 2, 4, 8, 16]
SWEEP_LRS = [demo.lr_lora, demo.lr_lora / 5]
sweep = {}  # (scheme, lr, r) -> final eval
t_sweep = time.perf_counter()
for lr in SWEEP_LRS:
    for r in RANKS:
        for scheme, alpha in (("α fixed = 32", 32.0), ("α/r fixed = 4", 4.0 * r)):
            key = (alpha, lr, r)
            if key not in sweep:
                cfg = TrainConfig(mode="lora", r=r, alpha=alpha, targets=demo.targets, lr=lr, steps=SWEEP_STEPS,
                                  batch_size=demo.batch_size, warmup_steps=demo.warmup_steps, seed=demo.seed, progress=False)
                sweep[key] = train(GPT.from_pretrained(base_dir), cfg, train_set, val_set).final
            sweep[(scheme, lr, r)] = sweep[key]
print(f"sweep: {len({k for k in sweep if isinstance(k[0], float)})} runs of {SWEEP_STEPS} steps in "
      f"{time.perf_counter() - t_sweep:.0f} s")

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for scheme in ("α fixed = 32", "α/r fixed = 4"):
    for lr, style in zip(SWEEP_LRS, ("-o", "--s")):
        label = f"{scheme}, lr {lr:g}"
        axes[0].plot(RANKS, [100 * sweep[(scheme, lr, r)]["exact_match"] for r in RANKS], style, label=label)
        axes[1].plot(RANKS, [sweep[(scheme, lr, r)]["loss"] for r in RANKS], style, label=label)
for ax, title in zip(axes, (f"exact match after {SWEEP_STEPS} steps (%)", f"validation loss after {SWEEP_STEPS} steps")):
    ax.set_xscale("log", base=2)
    ax.set_xticks(RANKS, [str(r) for r in RANKS])
    ax.set_xlabel("rank r")
    ax.set_title(title)
axes[1].set_yscale("log")
axes[0].legend(fontsize=8)
fig.tight_layout()

print(f"{'':<16} " + " ".join(f"{'r=' + str(r):>13}" for r in RANKS))
for scheme in ("α fixed = 32", "α/r fixed = 4"):
    for lr in SWEEP_LRS:
        print(f"{scheme[:13]:<13} lr {lr:<7g}" + " ".join(
            f"{sweep[(scheme, lr, r)]['exact_match']:>6.0%} {sweep[(scheme, lr, r)]['loss']:>6.3f}" for r in RANKS))

# %% [markdown]
# What the sweep says, computed (each printed line is a comparison the sweep supports, with its numbers):

# %%
hi, lo = SWEEP_LRS
loss = {k: v["loss"] for k, v in sweep.items() if isinstance(k[0], str)}
best_rank = {(s, lr): min(RANKS, key=lambda r: loss[(s, lr, r)]) for s in ("α fixed = 32", "α/r fixed = 4") for lr in SWEEP_LRS}
for (s, lr), r_best in best_rank.items():
    print(f"{s}, lr {lr:g}: lowest validation loss at rank {r_best} "
          f"({loss[(s, lr, r_best)]:.3f}; rank 8: {loss[(s, lr, 8)]:.3f}; rank 1: {loss[(s, lr, 1)]:.3f})")
lr_wins = sum(loss[(s, hi, r)] < loss[(s, lo, r)] for s in ("α fixed = 32", "α/r fixed = 4") for r in RANKS)
print(f"the higher learning rate gives the lower loss in {lr_wins} of {2 * len(RANKS)} settings")
below_8 = [(s, lr, r) for s in ("α fixed = 32", "α/r fixed = 4") for lr in SWEEP_LRS for r in (1, 2, 4)
           if loss[(s, lr, r)] <= loss[(s, lr, 8)]]
print(f"a rank below 8 matches or beats rank 8 in {len(below_8)} of 12 settings: 'rank 8 is the minimum' "
      f"{'does not hold' if below_8 else 'holds'} as a rule on this task")
scales = {(a, r): LoRALinear(torch.nn.Linear(32, 32), r=r, alpha=a).scaling for a, r in ((32.0, 1), (32.0, 16), (4.0, 1), (64.0, 16))}
assert scales[(32.0, 16)] < scales[(32.0, 1)], "claim 'with α fixed, raising r shrinks the scale' broke"
assert scales[(4.0, 1)] == scales[(64.0, 16)] == 4.0, "claim 'with α/r fixed the scale stays' broke"
print(f"\nthis notebook ran in {time.perf_counter() - t_start:.0f} s after the kernel started (not asserted)")

# %% [markdown]
# ## Exercises
#
# Fill in each `answer_…` (it starts as `None`) and run the cell after it: it says whether the answer is
# right, without printing the solution.
#
# 1. How many trainable parameters does a LoRA adapter of the demo's rank (16) add to **one** `c_attn` layer of this base
#    (a 128 → 384 linear)?
# 2. With α fixed at 32, what is the scaling α/r at rank 16? And with α/r fixed at 4? Give a tuple
#    `(scaling_alpha_fixed, scaling_ratio_fixed)`.
# 3. Which of the three fine-tunes reached the lowest validation loss on the Yoda task in this run?
#    (`"full"`, `"lora"` or `"qlora"`)
# 4. Which of the three fine-tunes raised the held-out English loss the most in this run?
# 5. What exact match did the merged LoRA model reach, as a fraction (three decimals are enough)?

# %%
answer_1 = None  # an int
answer_2 = None  # a tuple of two floats
answer_3 = None  # "full", "lora" or "qlora"
answer_4 = None  # "full", "lora" or "qlora"
answer_5 = None  # a float in [0, 1]


def check(name, answer, is_right):
    if answer is None:
        print(f"{name}: fill in your answer above and run this cell again")
        return
    assert is_right(answer), f"{name}: {answer!r} is not right, try again"
    print(f"{name}: right")


c_attn = results["lora"].model.transformer.h[0].attn.c_attn
check("exercise 1", answer_1, lambda a: a == c_attn.lora_A.numel() + c_attn.lora_B.numel())
check("exercise 2", answer_2, lambda a: len(a) == 2 and abs(a[0] - 32 / 16) < 1e-9 and abs(a[1] - 4) < 1e-9)
check("exercise 3", answer_3, lambda a: a == min(final, key=lambda m: final[m]["loss"]))
check("exercise 4", answer_4, lambda a: a == max(rise, key=rise.get))
check("exercise 5", answer_5, lambda a: abs(a - em["LoRA, merged"]) < 5e-4)
