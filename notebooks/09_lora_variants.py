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
# # 9 · Beyond plain LoRA: DoRA, PiSSA and LoftQ, and one base serving many adapters
#
# The lecture's adapter slide says the frozen base "may be shared by many tasks". This notebook takes three
# ideas the field built on top of LoRA and QLoRA and checks each one on minilora's own models:
#
# 1. **DoRA** splits the adapted weight into a length and a direction per output:
#    W = m · (W0 + s·BA) / ‖W0 + s·BA‖.
# 2. **LoftQ and PiSSA** start the adapter from the weight itself, so that a 4-bit base plus its adapter
#    starts closer to the full-precision model than the 4-bit base alone.
# 3. **Many adapters, one base**: a batch in which every example names its own adapter costs one forward.
#
# Section 4 then fine-tunes each of them on the demo's Yoda task, over three seeds: DoRA against LoRA at one
# budget, LoftQ and QPiSSA against plain QLoRA at 4 and at 2 bits, and the Yoda adapter beside a second task's
# adapter in one batch. Where a paper's result does not hold at this size, the notebook says what it measured.
#
# Every sentence that states a number or a comparison is followed by a cell that asserts it; claims that
# depend on random numbers are checked on three seeds. The base model is the demo's (built once by
# `minilora.demos.get_base`, then cached).

# %%
import contextlib
import copy
import statistics
import time

import torch

from minilora import (GPT, DoRALinear, TokenStream, add_lora, add_qlora, disable_adapters, evaluate, lora_layers,
                      set_adapter)
from minilora.data import english_documents, load_tokenizer, split_documents
from minilora.demos import DemoConfig, get_base

demo = DemoConfig(progress=False)
base_dir, cached = get_base(demo, log=print)
base = GPT.from_pretrained(base_dir).eval()
tok = load_tokenizer(base_dir)
SEEDS = (0, 1, 2)
print(f"base: {base.config.n_layer} layers x {base.config.n_embd} ({'cached' if cached else 'just built'}); "
      f"adapters r = {demo.r}, alpha = {demo.alpha}")

# %% [markdown]
# ## 1 · DoRA: a length and a direction for every output
#
# LoRA adds s·BA to W0. DoRA normalises every output row of V = W0 + s·BA to length 1 and multiplies it by a
# trained length m (one number per output, started at ‖W0‖ so the layer starts as the base):
#
#     y = (m / ‖V‖) ⊙ (W0 x + s·B A x) + b,   the norm ‖V‖ held constant in backward (the paper's §4.3).
#
# The layer below is checked against that equation written out by hand, on three seeds, after A, B and m have
# moved away from their start.

# %%
for seed in SEEDS:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(64, 32)
    layer = DoRALinear(lin, r=4, alpha=8)
    x = torch.randn(5, 64)
    assert torch.allclose(layer(x), lin(x), atol=1e-6), "claim broke: DoRA starts as the base layer"
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
        layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand(32))
    V = lin.weight + layer.scaling * layer.lora_B @ layer.lora_A
    W = layer.lora_magnitude_vector[:, None] * V / V.norm(dim=1, keepdim=True)
    by_hand = x @ W.T + lin.bias
    gap = ((layer(x) - by_hand).norm() / by_hand.norm()).item()
    print(f"seed {seed}: |DoRA layer − equation| / |equation| = {gap:.1e}; row lengths of W equal m: "
          f"{torch.allclose(W.norm(dim=1), layer.lora_magnitude_vector)}")
    assert gap < 1e-6, "claim broke: the layer computes m · V / ‖V‖"
    layer.merge()                                  # one matrix again: W = m · V / ‖V‖
    assert ((layer(x) - by_hand).norm() / by_hand.norm()).item() < 1e-5, "claim broke: merging keeps the output"

# %% [markdown]
# DoRA costs one extra number per output on top of LoRA's r · (in + out) per layer. On the demo's targets:

# %%
n_lora = sum(p.numel() for p in add_lora(copy.deepcopy(base), demo.targets, r=demo.r).parameters() if p.requires_grad)
n_dora = sum(p.numel() for p in add_lora(copy.deepcopy(base), demo.targets, r=demo.r, use_dora=True).parameters()
             if p.requires_grad)
outs = sum(m.out_features for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)
           and any(n == t or n.endswith("." + t) for t in demo.targets))
print(f"LoRA r={demo.r}: {n_lora:,} trainable; DoRA r={demo.r}: {n_dora:,} (+{n_dora - n_lora:,} = one per output)")
assert n_dora - n_lora == outs

# %% [markdown]
# ## 2 · LoftQ and QPiSSA: a 4-bit base that starts closer to the model
#
# Plain QLoRA quantizes W to NF4 and starts B at zero, so the model starts with NF4's whole error W − deq(Q).
# **LoftQ** alternates Q_t = NF4(W − s·B A) and s·B A = the best rank-r approximation of W − deq(Q_t);
# **QPiSSA** moves W's top r singular directions into B A and quantizes only the rest. Per layer of the demo
# base, the error each starts from, as a fraction of plain NF4's:

# %%
names = [n for n, m in base.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
weights = {n: base.get_submodule(n).weight.detach().float().clone() for n in names}
kw = dict(r=demo.r, alpha=demo.alpha, compute_dtype=torch.float32)


def start_errors(model):
    """name -> ‖W − (deq(Q) + s·B A)‖, the error the model starts training from."""
    return {n: (weights[n] - l.base_layer.dequantized_weight(torch.float32) - l.delta_weight()).norm().item()
            for n, l in lora_layers(model).items()}


models = {"NF4": add_qlora(copy.deepcopy(base), names, **kw)}
for it in range(1, 6):
    models[f"LoftQ {it}"] = add_qlora(copy.deepcopy(base), names, init="loftq", loftq_iter=it, **kw)
models["QPiSSA"] = add_qlora(copy.deepcopy(base), names, init="pissa", **kw)
errors = {k: start_errors(m) for k, m in models.items()}
print(f"{'layer':30s} {'NF4':>7s} " + " ".join(f"{k:>8s}" for k in list(models)[1:]))
for n in names:
    print(f"{n:30s} {errors['NF4'][n]:7.4f} " + " ".join(f"{errors[k][n] / errors['NF4'][n]:8.3f}"
                                                        for k in list(models)[1:]))

# %% [markdown]
# On every layer, LoftQ after five rounds starts at least 3 % below plain NF4 (PEFT's own test asks for 3 %; here
# it is more than 10 %), and every round lowers the error further. QPiSSA also starts below NF4 on every layer:
# the residual it quantizes has a smaller spread than W.

# %%
for n in names:
    assert errors["LoftQ 5"][n] <= 0.97 * errors["NF4"][n], n
    assert errors["LoftQ 5"][n] <= 0.90 * errors["NF4"][n], n
    assert all(errors[f"LoftQ {i + 1}"][n] < errors[f"LoftQ {i}"][n] for i in range(1, 5)), n
    assert errors["QPiSSA"][n] < errors["NF4"][n], n
print("LoftQ 5 / NF4, worst layer:", round(max(errors["LoftQ 5"][n] / errors["NF4"][n] for n in names), 3))

# %% [markdown]
# What the model computes follows the weights: on held-out English, the logits of the 4-bit model plus its
# starting adapter are closer to the full-precision model's with LoftQ and with QPiSSA than with plain NF4.

# %%
_, val_text = split_documents(english_documents())
val = TokenStream(tok.encode(val_text[:60_000]), base.config.block_size)
batch = val.sample(16, torch.Generator().manual_seed(0))[0]
with torch.no_grad():
    full = base(batch)
    logit_err = {k: ((models[k].eval()(batch) - full).norm() / full.norm()).item() for k in ("NF4", "LoftQ 5", "QPiSSA")}
    loss = {k: evaluate(models[k], val, batch_size=32, max_batches=4)["loss"] for k in ("NF4", "LoftQ 5", "QPiSSA")}
    loss["fp32"] = evaluate(base, val, batch_size=32, max_batches=4)["loss"]
print("relative logit error:", {k: round(v, 4) for k, v in logit_err.items()})
print("held-out loss:", {k: round(v, 4) for k, v in loss.items()})
assert logit_err["LoftQ 5"] < logit_err["NF4"] and logit_err["QPiSSA"] < logit_err["NF4"]

# %% [markdown]
# ## 3 · One base, many adapters, one batch
#
# Two adapters sit on the same base; every example of a batch names the one it goes through
# (`model(idx, adapter_names=[...])`, `"__base__"` for none). The result is the same as running each adapter's
# examples on their own with that adapter set, on three seeds of adapter weights:

# %%
idx = torch.randint(0, base.config.vocab_size, (6, 48), generator=torch.Generator().manual_seed(0))
row_names = ["yoda", "other", "__base__", "other", "yoda", "yoda"]
for seed in SEEDS:
    torch.manual_seed(seed)
    two = copy.deepcopy(base)
    add_lora(two, demo.targets, r=demo.r, alpha=demo.alpha, adapter_name="yoda")
    add_lora(two, demo.targets, r=demo.r, alpha=demo.alpha, adapter_name="other")
    with torch.no_grad():
        for layer in lora_layers(two).values():
            layer.lora_B.normal_(std=0.02)
            for parked in layer.parked_adapters.values():
                parked.B.normal_(std=0.02)
        mixed = two(idx, adapter_names=row_names)
        separate = torch.empty_like(mixed)  # the same examples, each adapter's rows in a forward of their own
        for name in set(row_names):
            rows = [i for i, n in enumerate(row_names) if n == name]
            set_adapter(two, "yoda" if name == "__base__" else name)
            with disable_adapters(two) if name == "__base__" else contextlib.nullcontext():
                separate[rows] = two(idx[rows])
        worst = max(((mixed[i] - separate[i]).norm() / separate[i].norm()).item() for i in range(len(row_names)))
    print(f"seed {seed}: largest relative difference, mixed batch vs each adapter's rows alone: {worst:.1e}")
    assert worst < 1e-5, "claim broke: a mixed batch computes what each adapter computes alone"

# %% [markdown]
# The cost: the two adapters are stacked into one of rank 2r and each example keeps only its own adapter's
# columns, so the mixed batch runs one base matmul and one low-rank product per layer. Timed in this run on
# the same batch (the median of interleaved repeats): a mixed batch against one adapter's forward. The issue
# asked for at most 1.3×; a loaded machine moves timings, so the assertion only guards against a mixed batch
# costing as much as two forwards.

# %%
set_adapter(two, "yoda")
big = torch.randint(0, base.config.vocab_size, (16, base.config.block_size), generator=torch.Generator().manual_seed(1))
names16 = ["yoda", "other"] * 8
times = {"one adapter": [], "mixed batch": []}
with torch.no_grad():
    for _ in range(7):
        for k, fn in (("one adapter", lambda: two(big)), ("mixed batch", lambda: two(big, adapter_names=names16))):
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
ratio = statistics.median(times["mixed batch"]) / statistics.median(times["one adapter"])
print({k: f"{statistics.median(v) * 1e3:.1f} ms" for k, v in times.items()}, f"-> mixed / one = {ratio:.2f}")
assert ratio < 2.0

# %% [markdown]
# ## 4 · Trained on the Yoda task, over three seeds
#
# The questions that matter need fine-tuning runs: does DoRA learn the task better than LoRA for the same
# number of trainable parameters; do LoftQ and QPiSSA, which start closer to the full-precision model, still
# end better after training, at 4 bits and at 2; and do two trained adapters share one base in one batch.
# Nine arms on three seeds are too many runs for a notebook that CI executes, so `tools/variant_spread.py`
# trains them all with one short recipe and records what it measured in `notebooks/variant_spread.json`:
#
# | arm | what trains |
# | --- | --- |
# | `lora` | LoRA, rank 16 on the demo's targets (the Yoda adapter of part c) |
# | `dora` | DoRA at rank 15: its magnitude vectors fill the gap, so it trains no more than `lora` |
# | `qlora4`, `loftq4`, `pissa4` | QLoRA on an NF4 base: B = 0, LoftQ's start (5 rounds), QPiSSA's start |
# | `qlora2`, `loftq2`, `pissa2` | the same on a 2-bit (NF2) base |
# | `question` | LoRA on a second task: the same sentences turned into yes/no questions (`minilora.data.questions`) |
#
# Every arm fine-tunes the demo's base (the one above) for 200 steps of 16 examples at the adapter learning
# rate of the demo (5e-3, 10 warm-up steps, cosine), α/r = 4, and is scored on the 200 held-out sentences of
# its seed: validation loss over the answer tokens and exact match of the greedy answer. The seed draws the
# sentences, the batches and the adapter's random start. The recipe is written into the file; this notebook
# refuses a file recorded with another one. The file was recorded as three processes side by side, one seed and
# one thread each, on two shared cores (the last column: the minutes each arm took there).

# %%
import json
from pathlib import Path

import minilora
from minilora.data import InstructionSet, yoda_dataset
from minilora.data.questions import question_dataset
from minilora.train import TrainConfig, train

RECIPE = {"base": "minilora.demos.get_base(DemoConfig())", "n_train": 2000, "n_val": 200, "steps": 200,
          "batch_size": 16, "lr": 5e-3, "warmup_steps": 10, "r": 16, "alpha": 64.0,
          "targets": ["c_attn", "c_proj", "c_fc", "lm_head"], "loftq_iter": 5, "dora_r": 15}
ARMS = ["lora", "dora", "qlora4", "loftq4", "pissa4", "qlora2", "loftq2", "pissa2", "question"]
recorded = json.loads((Path(minilora.__file__).resolve().parent.parent / "notebooks" / "variant_spread.json").read_text())
assert recorded["recipe"] == RECIPE, "variant_spread.json was recorded with another recipe: run tools/variant_spread.py"
assert (list(RECIPE["targets"]), RECIPE["r"], RECIPE["alpha"], RECIPE["lr"], RECIPE["warmup_steps"], RECIPE["batch_size"],
        RECIPE["n_train"], RECIPE["n_val"]) == (list(demo.targets), demo.r, demo.alpha, demo.lr_lora, demo.warmup_steps,
                                                demo.batch_size, demo.n_train, demo.n_val), "the recipe is the demo's"
runs = {int(seed): arms for seed, arms in recorded["runs"].items()}
assert len(runs) >= 3 and all(set(ARMS) <= set(arms) and "serving" in arms for arms in runs.values()), \
    "variant_spread.json lacks a seed or an arm: run tools/variant_spread.py"
print(f"recorded {recorded['recorded']} on {recorded['machine']}: {recorded['command']}")
print(f"{'arm':>9} {'trainable':>10} " + " ".join(f"{f'seed {s}: loss / exact':>24}" for s in runs) + f" {'minutes, 3 seeds':>17}")
for arm in ARMS:
    print(f"{arm:>9} {runs[0][arm]['trainable']:>10,} " + " ".join(
        f"{runs[s][arm]['loss']:>15.4f} / {runs[s][arm]['exact_match']:>5.1%}" for s in runs)
        + f" {sum(runs[s][arm]['seconds'] for s in runs) / 60:>17.1f}")
per_seed = lambda arm, key: [runs[s][arm][key] for s in runs]

# %% [markdown]
# ### a · DoRA against LoRA at the same budget
#
# DoRA adds one magnitude per output to LoRA's r · (in + out) per layer, so at the same rank it trains more. On
# the demo's targets one rank of LoRA is worth 9,344 parameters and DoRA's magnitudes 5,632, so no whole rank
# makes the two equal: DoRA at rank 15 trains 2.5 % fewer parameters than LoRA at rank 16 (counted here, and
# equal to what the recording trained).

# %%
count = lambda **kw: sum(p.numel() for p in add_lora(copy.deepcopy(base), demo.targets, **kw).parameters()
                         if p.requires_grad)
budget = {"lora": count(r=RECIPE["r"]), "dora": count(r=RECIPE["dora_r"], use_dora=True)}
print(f"LoRA r={RECIPE['r']}: {budget['lora']:,} trainable; DoRA r={RECIPE['dora_r']}: {budget['dora']:,} "
      f"({budget['dora'] / budget['lora'] - 1:+.1%})")
assert all(runs[s][arm]["trainable"] == budget[arm] for s in runs for arm in budget)
assert budget["dora"] <= budget["lora"] and budget["dora"] > 0.97 * budget["lora"], "claim 'within 3 %, not more' broke"
for s in runs:
    d, l = runs[s]["dora"], runs[s]["lora"]
    print(f"seed {s}: val loss DoRA {d['loss']:.4f} vs LoRA {l['loss']:.4f} ({d['loss'] / l['loss']:.2f}×); "
          f"exact match {d['exact_match']:.1%} vs {l['exact_match']:.1%} ({100 * (d['exact_match'] - l['exact_match']):+.1f} points)")

# %% [markdown]
# The papers report DoRA ahead of LoRA (by 2.9–4.4 points on commonsense reasoning for LLaMA-2-7B and LLaMA-3-8B
# at the same rank). **Not here**: at this size and this short budget, trained with LoRA's recipe, DoRA learns
# the Yoda task far more slowly. On every recorded seed it ends with **at least twice LoRA's validation loss**
# and **at least 25 points less exact match**; the cell prints how far the recorded seeds are from those bounds.
# It is not a difference from PEFT's DoRA: minilora's DoRA gives PEFT's logits and PEFT's gradients for A, B and m
# (tests/test_dora.py), so PEFT trained the same way would land at the same place. Why DoRA is slower here is not
# measured (the recipe is LoRA's, and no longer run was recorded), so the notebook claims only the gap it
# measured at this budget, not that DoRA is worse in general.

# %%
DORA_LOSS_RATIO, DORA_POINTS = 2.0, 25
ratio = min(d / l for d, l in zip(per_seed("dora", "loss"), per_seed("lora", "loss")))
points = min(100 * (l - d) for d, l in zip(per_seed("dora", "exact_match"), per_seed("lora", "exact_match")))
print(f"over {len(runs)} seeds: DoRA's loss at least {ratio:.2f}× LoRA's (the claim: ≥ {DORA_LOSS_RATIO:g}×), its "
      f"exact match at least {points:.1f} points lower (the claim: ≥ {DORA_POINTS})")
assert ratio >= DORA_LOSS_RATIO, "claim 'DoRA ends with at least twice LoRA's validation loss' broke"
assert points >= DORA_POINTS, "claim 'DoRA ends at least 25 points of exact match below LoRA' broke"

# %% [markdown]
# ### b · LoftQ and QPiSSA against plain QLoRA, at 4 bits and at 2
#
# Before training: every quantized layer's ‖W − (deq(Q) + s·B A)‖ / ‖W‖, the error the model starts from. The
# recording measured it on every seed; it depends on no random number, so this notebook measures it again (at
# 4 bits it is section 2's error, divided by ‖W‖; at 2 bits the base is NF2, `add_qlora(..., bits=2)`) and
# checks that both agree.

# %%
AT_4_BITS = {"qlora4": "NF4", "loftq4": "LoftQ 5", "pissa4": "QPiSSA"}  # arm -> its model in section 2
models2 = {"qlora2": add_qlora(copy.deepcopy(base), names, bits=2, **kw),
           "loftq2": add_qlora(copy.deepcopy(base), names, init="loftq", loftq_iter=RECIPE["loftq_iter"], bits=2, **kw),
           "pissa2": add_qlora(copy.deepcopy(base), names, init="pissa", bits=2, **kw)}
live = {arm: {n: errors[key][n] / weights[n].norm().item() for n in names} for arm, key in AT_4_BITS.items()}
live |= {arm: {n: e / weights[n].norm().item() for n, e in start_errors(m).items()} for arm, m in models2.items()}
print(f"{'layer':30s} " + " ".join(f"{arm:>7s}" for arm in live))
for n in names:
    print(f"{n:30s} " + " ".join(f"{live[arm][n]:7.3f}" for arm in live))
drift = max(abs(runs[s][arm]["start_error"][n] / live[arm][n] - 1) for s in runs for arm in live for n in names)
print(f"largest relative difference from the recorded errors, over {len(runs)} seeds: {drift:.1e}")
assert all(set(runs[s][arm]["start_error"]) == set(names) for s in runs for arm in live)
assert drift < 1e-3, "claim 'the recorded start errors are this notebook's' broke"

# %% [markdown]
# Two bits is a much coarser grid: NF2 keeps four levels per block, and **every layer starts more than four
# times as far from W as with NF4** (about 56 % of ‖W‖ against 9 %). There the starts from the weight matter
# more: **LoftQ and QPiSSA start at least 15 % below NF2 on every layer**.

# %%
worst = {arm: max(live[arm][n] / live["qlora2"][n] for n in names) for arm in ("loftq2", "pissa2")}
wider = min(live["qlora2"][n] / live["qlora4"][n] for n in names)
print(f"NF2 / NF4 start error, smallest over layers: {wider:.1f}×; worst layer, as a fraction of NF2's: "
      + ", ".join(f"{arm} {v:.3f}" for arm, v in worst.items()))
assert wider > 4, "claim 'more than four times as far with NF2' broke"
assert all(v <= 0.85 for v in worst.values()), "claim 'LoftQ and QPiSSA at least 15 % below NF2' broke"

# %% [markdown]
# After training, per seed: validation loss and exact match of each start, at each width of the base.

# %%
for bits in (4, 2):
    for s in runs:
        print(f"{bits} bits, seed {s}: " + "   ".join(
            f"{arm[:-1]:>5} {runs[s][arm]['loss']:.4f} / {runs[s][arm]['exact_match']:5.1%}"
            for arm in (f"qlora{bits}", f"loftq{bits}", f"pissa{bits}")))

# %% [markdown]
# What held on every recorded seed (each bound is printed next to the recorded figure nearest to it):
#
# - At 2 bits LoftQ ended with a lower validation loss than plain QLoRA on the three recorded seeds, but that is
#   **not claimed**: the same arms run on two further seeds (`tools/variant_spread.py --seeds 3 --arms qlora2
#   loftq2`, and seed 4; not in the file) put LoftQ behind on seed 3 (0.153 against 0.141). The cell prints the
#   recorded ratios only.
# - **Plain QLoRA at 2 bits still learns the task**: at least 30 % exact match on every seed, although its base
#   starts with more than half of ‖W‖ as error: 150 k trainable parameters make up for it on one narrow task.
# - **At 4 bits LoftQ and plain QLoRA are not in one order**: LoftQ ended better on some seeds and worse on
#   others, so at this width nothing is claimed for it beyond its smaller start.
# - **QPiSSA ends worse than plain QLoRA at both widths**, with at least 1.25 times its validation loss and at
#   least 5 points less exact match. That is the opposite of the PiSSA paper's result (QPiSSA 86.05 against
#   QLoRA's 81.73 on GSM8K for LLaMA-3-70B). Why is not measured here: the recipe, learning rate included, is
#   LoRA's, and QPiSSA's adapter starts as W's largest singular directions rather than at zero.

# %%
loss = lambda arm: per_seed(arm, "loss")
em = lambda arm: per_seed(arm, "exact_match")
loftq_gain = min(q / l for q, l in zip(loss("qlora2"), loss("loftq2")))
loftq_points = min(100 * (l - q) for q, l in zip(em("qlora2"), em("loftq2")))
plain2 = min(em("qlora2"))
order4 = [l < q for q, l in zip(loss("qlora4"), loss("loftq4"))]
pissa_ratio = min(p / q for b in (4, 2) for q, p in zip(loss(f"qlora{b}"), loss(f"pissa{b}")))
pissa_points = min(100 * (q - p) for b in (4, 2) for q, p in zip(em(f"qlora{b}"), em(f"pissa{b}")))
print(f"2 bits: plain QLoRA's loss / LoftQ's, smallest over the recorded seeds {loftq_gain:.2f}; LoftQ's exact "
      f"match ahead by at least {loftq_points:.1f} points (neither claimed)")
print(f"2 bits: plain QLoRA's lowest exact match {plain2:.1%} (the claim: ≥ 30 %)")
print(f"4 bits: LoftQ's loss below plain QLoRA's on {sum(order4)} of {len(order4)} seeds")
print(f"QPiSSA / plain QLoRA loss, smallest over seeds and widths: {pissa_ratio:.2f} (the claim: ≥ 1.25); "
      f"exact match behind by at least {pissa_points:.1f} points (the claim: ≥ 5)")
assert plain2 >= 0.30, "claim 'plain QLoRA at 2 bits reaches 30 % exact match' broke"
assert 0 < sum(order4) < len(order4), "claim 'at 4 bits LoftQ and plain QLoRA are not in one order' broke"
assert pissa_ratio >= 1.25 and pissa_points >= 5, "claim 'QPiSSA ends worse than plain QLoRA' broke"

# %% [markdown]
# ### c · The Yoda adapter and a second task's adapter on one base, in one batch
#
# The second task asks for the same sentences as yes/no questions ("The function must return a new list." →
# "Must the function return a new list?"). For every seed the recording trained a LoRA adapter on it with the
# Yoda recipe, then put it beside the Yoda adapter (`lora`) on one base and scored each adapter, and the base,
# on both tasks:

# %%
CROSS = ["yoda adapter on yoda", "question adapter on yoda", "base on yoda",
         "question adapter on question", "yoda adapter on question", "base on question"]
for who in CROSS:
    print(f"{who:>29}: " + "   ".join(f"{runs[s]['serving']['cross'][who]['loss']:7.3f} / "
                                      f"{runs[s]['serving']['cross'][who]['exact_match']:5.1%}" for s in runs))

# %% [markdown]
# On every seed, **each adapter solves its own task** (at least 15 % exact match) **and at most 1 % of the other
# task**, as does the base (it was never taught either); its validation loss on its own task is **at least ten
# times lower** than the other adapter's and the base's there. In the recorded mixed batch (all 400 held-out
# examples of both tasks), **every row's logits equal its adapter's alone** (to 1e-5, relative) and so do the
# greedy answers.

# %%
cross = lambda who, key: [runs[s]["serving"]["cross"][who][key] for s in runs]
own = {t: f"{t} adapter on {t}" for t in ("yoda", "question")}
others = {t: [f"{'question' if t == 'yoda' else 'yoda'} adapter on {t}", f"base on {t}"] for t in own}
own_em = min(min(cross(own[t], "exact_match")) for t in own)
other_em = max(max(cross(w, "exact_match")) for t in own for w in others[t])
loss_ratio = min(o / m for t in own for w in others[t] for m, o in zip(cross(own[t], "loss"), cross(w, "loss")))
mixed = [runs[s]["serving"]["mixed_batch"] for s in runs]
print(f"own task: lowest exact match {own_em:.1%} (the claim: ≥ 15 %); other task and base: highest {other_em:.1%} "
      f"(the claim: ≤ 1 %); loss of the others / own, smallest {loss_ratio:.1f}× (the claim: ≥ 10×)")
print("mixed batch: largest logit gap " + ", ".join(f"{m['max_relative_logit_gap']:.1e}" for m in mixed)
      + "; exact match mixed / alone " + ", ".join(f"{m['exact_match_mixed']:.1%} / {m['exact_match_alone']:.1%}" for m in mixed))
assert own_em >= 0.15 and other_em <= 0.01, "claim 'each adapter solves its own task, not the other' broke"
assert loss_ratio >= 10, "claim 'ten times lower loss on its own task' broke"
assert all(m["max_relative_logit_gap"] < 1e-5 and m["exact_match_mixed"] == m["exact_match_alone"] for m in mixed), \
    "claim 'the recorded mixed batch equals each adapter alone' broke"

# %% [markdown]
# The same, live: both adapters trained here on seed 0 with the recipe (two of the recording's 27 runs, the
# only ones this notebook repeats), then one batch holding every held-out example of both tasks, alternating,
# each row naming its adapter, against each adapter's rows run alone.

# %%
t_live = time.perf_counter()
tasks = {"yoda": yoda_dataset(RECIPE["n_train"], RECIPE["n_val"], seed=0),
         "question": question_dataset(RECIPE["n_train"], RECIPE["n_val"], seed=0)}
recipe = TrainConfig(mode="lora", r=RECIPE["r"], alpha=RECIPE["alpha"], targets=tuple(RECIPE["targets"]),
                     steps=RECIPE["steps"], lr=RECIPE["lr"], warmup_steps=RECIPE["warmup_steps"],
                     batch_size=RECIPE["batch_size"], seed=0, progress=False)
trained = {task: train(GPT.from_pretrained(base_dir), recipe, InstructionSet(tr, tok, base.config.block_size),
                       InstructionSet(va, tok, base.config.block_size)) for task, (tr, va) in tasks.items()}
for task, res in trained.items():
    arm = "lora" if task == "yoda" else "question"
    print(f"{task:>8} adapter, seed 0: val loss {res.final['loss']:.4f}, exact match {res.final['exact_match']:.1%} "
          f"(recorded: {runs[0][arm]['loss']:.4f}, {runs[0][arm]['exact_match']:.1%})")
print(f"two fine-tunes in {time.perf_counter() - t_live:.0f} s (not asserted)")

# %%
import tempfile

from minilora import load_adapter, save_adapter
from minilora.evaluate import greedy_matches

served = trained["yoda"].model.eval()          # the Yoda adapter is "default"; the question adapter joins it
with tempfile.TemporaryDirectory() as tmp:
    save_adapter(trained["question"].model, tmp)
    load_adapter(served, tmp, adapter_name="question")
examples, row_names = [], []
for pair in zip(tasks["yoda"][1], tasks["question"][1]):
    examples += pair
    row_names += ["default", "question"]
both = InstructionSet(examples, tok, base.config.block_size)
x, y = both.collate(list(range(len(both))))
other = {"default": "question", "question": "default"}
with torch.no_grad():
    mixed = served(x, adapter_names=row_names)
    swapped = served(x, adapter_names=[other[n] for n in row_names])      # every row through the wrong adapter
    bare = served(x, adapter_names=["__base__"] * len(row_names))          # and through none
    alone = torch.empty_like(mixed)
    for name in ("default", "question"):
        rows = [i for i, n in enumerate(row_names) if n == name]
        set_adapter(served, name)
        alone[rows] = served(x[rows])
gap = ((mixed - alone).flatten(1).norm(dim=1) / alone.flatten(1).norm(dim=1)).max().item()
hit_mixed, hit_alone = greedy_matches(mixed, y), greedy_matches(alone, y)
print(f"{len(row_names)} rows, two adapters: largest relative logit difference, mixed vs alone: {gap:.1e}; "
      f"the same greedy answers on {int((hit_mixed == hit_alone).sum())} of {len(row_names)} rows")
live_em = {(who, task): greedy_matches(logits, y)[k::2].float().mean().item()
           for who, logits in (("own", mixed), ("other", swapped), ("base", bare))
           for k, task in enumerate(("yoda", "question"))}
for k, task in enumerate(("yoda", "question")):
    print(f"{task:>8} rows: exact match {live_em[('own', task)]:.1%} through their own adapter in the mixed batch "
          f"({trained[task].final['exact_match']:.1%} evaluated alone), {live_em[('other', task)]:.1%} through the "
          f"other adapter, {live_em[('base', task)]:.1%} through the base")

# %% [markdown]
# Live, as recorded: **the mixed batch computes, row by row, what each adapter computes alone** (to 1e-5,
# relative, and the same greedy answer on every row), and each adapter solves its own task (at least 15 %)
# and at most 1 % of the other's, as does the base. The two live fine-tunes **land within 30 % of the recorded
# seed 0's validation loss and within 15 points of its exact match** (the same recipe and seed; the float
# sums of another machine or thread count move a trajectory a little).

# %%
print(f"live against recorded seed 0: " + ", ".join(
    f"{task} loss {trained[task].final['loss'] / runs[0][arm]['loss']:.2f}×, exact match "
    f"{100 * (trained[task].final['exact_match'] - runs[0][arm]['exact_match']):+.1f} points"
    for task, arm in (("yoda", "lora"), ("question", "question"))))
assert gap < 1e-5 and bool((hit_mixed == hit_alone).all()), "claim 'a mixed batch equals each adapter alone' broke"
assert all(live_em[("own", t)] >= 0.15 and live_em[("other", t)] <= 0.01 and live_em[("base", t)] <= 0.01
           for t in ("yoda", "question")), "claim 'each adapter solves its own task, not the other' broke"
for task, arm in (("yoda", "lora"), ("question", "question")):
    assert abs(trained[task].final["loss"] / runs[0][arm]["loss"] - 1) <= 0.30, f"claim 'within 30 %' broke: {task}"
    assert abs(trained[task].final["exact_match"] - runs[0][arm]["exact_match"]) <= 0.15, \
        f"claim 'within 15 points' broke: {task}"
print(f"section 4 ran in {time.perf_counter() - t_live:.0f} s of live work (not asserted)")
