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
# Everything so far, put to work. We pretrain a small GPT on English, then teach it an instruction task three
# ways with the same trainer, data and number of steps:
#
# - **full**: every weight trains (and needs gradients and AdamW state),
# - **LoRA**: the base is frozen; low-rank adapters on the chosen linear layers train,
# - **QLoRA**: the same, with the frozen base stored in NF4 with double quantization.
#
# The run is sized for a laptop CPU in about a minute, so the model is tiny and the training short: the numbers
# show the trade-off, not the final quality a longer run reaches (`python -m minilora demo` runs a longer one).

# %%
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from minilora import GPT, plots
from minilora.data import InstructionSet, load_tokenizer, yoda_dataset
from minilora.demos import DemoConfig, pretrain_base
from minilora.train import TrainConfig, evaluate, respond, train

# The demo's learning rates and adapter settings; a small fixed model and short runs, so this takes ~1 minute.
demo = replace(DemoConfig(), n_layer=4, n_head=4, n_embd=128, block_size=96, vocab_size=1024, pretrain_steps=300,
               steps=150, n_train=2000, progress=False, cache="")
LR = {"full": demo.lr_full, "lora": demo.lr_lora, "qlora": demo.lr_lora}
workdir = Path(tempfile.mkdtemp(prefix="minilora-nb5-"))
print(f"base: {demo.n_layer} layers x {demo.n_embd} wide, BPE vocabulary {demo.vocab_size}, "
      f"{demo.pretrain_steps} pretraining steps; fine-tuning: {demo.steps} steps of {demo.batch_size} examples, "
      f"rank {demo.r}, alpha {demo.alpha}, learning rates {LR}")

# %% [markdown]
# ## The instruction task
#
# Rewrite a plain sentence the way Yoda speaks: the verb phrase moves to the front, the subject and its modal
# to the end. Every record is (instruction, context, output); the loss covers only the output tokens, and a
# held-out sentence counts as solved when the model's greedy answer equals the reference exactly.

# %%
train_examples, val_examples = yoda_dataset(n_train=demo.n_train, n_val=100, seed=demo.seed)
for ex in train_examples[:3]:
    print(f"{ex.instruction:<24} {ex.context:<48} -> {ex.output}")

# %% [markdown]
# ## A base model
#
# A small GPT with a byte-level BPE tokenizer, both trained from scratch on the English text of Python's
# standard library (`minilora.demos.pretrain_base`).

# %%
t0 = time.perf_counter()
pretrained = pretrain_base(demo, workdir / "base", log=print)
base_dir = workdir / "base"
tok = load_tokenizer(base_dir)
print(f"pretraining: loss {pretrained.losses[0]:.2f} -> {pretrained.losses[-1]:.2f}, "
      f"validation {pretrained.final['loss']:.2f} ({time.perf_counter() - t0:.0f} s)")

train_set = InstructionSet(train_examples, tok, demo.block_size)
val_set = InstructionSet(val_examples, tok, demo.block_size)
base = GPT.from_pretrained(base_dir)
before = evaluate(base, val_set)
print(f"base model on the held-out sentences: loss {before['loss']:.3f}, exact match {before['exact_match']:.0%}")
shown = val_examples[:3]
answers = {"base": [respond(base, tok, e.instruction, e.context, max_new_tokens=30) for e in shown]}

# %% [markdown]
# ## Three fine-tunes
#
# Same data, same steps, same batches (one seed), the demo's learning rates (higher for the adapters, as is
# usual). `measure_memory=True` measures the bytes of one training step of each (weights, gradients,
# optimizer state, saved activations).

# %%
results = {}
for mode in ("full", "lora", "qlora"):
    cfg = TrainConfig(mode=mode, r=demo.r, alpha=demo.alpha, targets=demo.targets, lr=LR[mode], steps=demo.steps,
                      batch_size=demo.batch_size, warmup_steps=10, eval_every=demo.steps // 3, seed=demo.seed,
                      compute_dtype="float32", progress=False)
    results[mode] = train(GPT.from_pretrained(base_dir), cfg, train_set, val_set, measure_memory=True)
    answers[mode] = [respond(results[mode].model, tok, e.instruction, e.context, max_new_tokens=30) for e in shown]
    print(f"{mode:>5}: {results[mode].params}")

fig = plots.plot_loss_curves({m: r.losses for m, r in results.items()}, {m: r.evals for m, r in results.items()},
                             title="Yoda fine-tuning: training and validation loss")
gap = max(abs(a - b) for a, b in zip(results["lora"].losses, results["qlora"].losses))
print(f"largest difference between the LoRA and QLoRA training losses at any step: {gap:.3f} "
      f"(the loss itself ends at {results['lora'].losses[-1]:.3f})")

# %% [markdown]
# ## The results table
#
# Memory is what one measured training step holds (fp32 on the CPU here; on a GPU the base would be 16-bit).
# Time is given relative to full fine-tuning, measured in this run.

# %%
MB = 1e6
t_full = results["full"].seconds
print(f"{'mode':<6} {'trainable':>10} {'weights':>9} {'grads':>8} {'optim.':>8} {'activ.':>8} {'total':>8} "
      f"{'val loss':>8} {'exact':>6} {'time':>6}")
print(f"{'base':<6} {'-':>10} {'':>9} {'':>8} {'':>8} {'':>8} {'':>8} {before['loss']:>8.3f} "
      f"{before['exact_match']:>6.0%} {'':>6}")
for mode, r in results.items():
    m = r.memory
    print(f"{mode:<6} {r.params.trainable:>10,} {(m.weights + m.quantized_weights + m.adapters) / MB:>7.2f}MB "
          f"{(m.gradients + m.adapter_gradients) / MB:>6.2f}MB {(m.optimizer_state + m.adapter_optimizer_state) / MB:>6.2f}MB "
          f"{m.activations / MB:>6.2f}MB {m.total / MB:>6.2f}MB {r.final['loss']:>8.3f} {r.final['exact_match']:>6.0%} "
          f"{r.seconds / t_full:>5.2f}×")

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
# What the run says, in a few numbers. (This budget is short on purpose; `python -m minilora demo` trains
# longer, which gives the adapters time to catch up.)

# %%
final = {m: r.final for m, r in results.items()}
order = sorted(final, key=lambda m: final[m]["loss"])
print("validation loss, best first:", ", ".join(f"{m} {final[m]['loss']:.3f}" for m in order))
print(f"trainable parameters, LoRA / full: {results['lora'].params.trainable / results['full'].params.trainable:.1%}")
w = {m: r.memory.weights + r.memory.quantized_weights + r.memory.adapters for m, r in results.items()}
print(f"weights held during training, QLoRA / LoRA: {w['qlora'] / w['lora']:.2f}; "
      f"final validation loss, QLoRA - LoRA: {final['qlora']['loss'] - final['lora']['loss']:+.3f}")
