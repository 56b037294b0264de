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
# # 4 · Gradient checkpointing and the paged optimizer
#
# Training runs out of memory for two reasons the weights do not explain: the **activations** a forward pass
# keeps for backward, and **spikes** — one long sequence in a batch makes them jump. Two tools:
#
# - gradient checkpointing keeps only a few activations and recomputes the rest during backward;
# - a paged optimizer lets its state leave the device when a spike needs the room, and come back after.
#
# Every byte below is measured: minilora's saved-tensor meter sees each tensor autograd keeps for backward
# (through `torch.autograd.graph.saved_tensors_hooks`) and records the most bytes alive at once.

# %%
import math
import time

import torch

from minilora import GPT, GPTConfig, PagedAdamW, measure_saved_activations, segment_bounds
from minilora.demos import long_sequence_demo
from minilora import plots

B, T, VOCAB, WIDTH = 4, 64, 256, 32
idx = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(0))


def make_gpt(n_layer: int, checkpointing: bool, segments: int | None = None) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(block_size=T, vocab_size=VOCAB, n_layer=n_layer, n_head=2, n_embd=WIDTH,
                       gradient_checkpointing=checkpointing, checkpoint_segments=segments)
    return GPT(config).train()


def saved_peak(model: GPT) -> int:
    """Most bytes autograd holds for backward during one forward + backward (parameters left out)."""
    return measure_saved_activations(lambda: model(idx, idx)[1].backward(), exclude=model).peak

# %% [markdown]
# ## What a forward pass keeps
#
# Without checkpointing, every block's saved tensors stay alive until backward reaches that block, so the
# peak grows linearly with depth.

# %%
depths = [1, 4, 9, 16, 25, 36]
peaks = {"no checkpointing": [], "checkpointing, ⌈√n⌉ segments": []}
for n in depths:
    peaks["no checkpointing"].append(saved_peak(make_gpt(n, False)))
    peaks["checkpointing, ⌈√n⌉ segments"].append(saved_peak(make_gpt(n, True)))

per_block = (peaks["no checkpointing"][-1] - peaks["no checkpointing"][0]) / (depths[-1] - depths[0])
block_input = torch.empty(B, T, WIDTH).nbytes  # what a checkpoint keeps: one block's input, fp32
print(f"{'n':>3} {'segments':>8} {'no ckpt':>12} {'ckpt':>12} {'ratio':>6} {'2√n/n':>6}")
for n, a, c in zip(depths, *peaks.values()):
    print(f"{n:>3} {len(segment_bounds(n)):>8} {a:>12,} {c:>12,} {c / a:>6.2f} {2 * math.sqrt(n) / n:>6.2f}")
print(f"\neach extra block keeps {per_block:,.0f} bytes; one block input is {block_input:,} bytes "
      f"({per_block / block_input:.0f}× smaller)")

# %% [markdown]
# ## Checkpointing: keep every segment's input, recompute the rest
#
# Split the n blocks into s segments. The forward pass runs each segment without recording a graph and keeps
# only its input. In backward, the segment being differentiated is run again from its input, this time with
# the graph, and then thrown away. The peak is about s kept inputs plus one segment's worth of activations:
# with s = √n both terms are √n, which is where the lecture's "every √n-th layer" comes from.
# `segment_bounds` gives the split:

# %%
for n in (4, 9, 16):
    print(f"n = {n:>2}: segments {segment_bounds(n)}")
fig = plots.plot_checkpointing(depths, peaks)

# %% [markdown]
# Recomputing must give the same gradients, and it costs time: each segment runs forward twice. Measured
# here for 16 blocks (the fastest of three passes each, as a ratio):

# %%
plain, ckpt = make_gpt(16, False), make_gpt(16, True)
models = {"plain": plain, "ckpt": ckpt}
best = {name: math.inf for name in models}
for model in models.values():
    model(idx, idx)[1].backward()  # warm-up
for _ in range(3):  # interleaved, so a change in machine load hits both alike
    for name, model in models.items():
        t0 = time.perf_counter()
        model(idx, idx)[1].backward()
        best[name] = min(best[name], time.perf_counter() - t0)
for model in models.values():  # one clean backward each, to compare gradients
    model.zero_grad(set_to_none=True)
    model(idx, idx)[1].backward()
grad_diff = max(((p.grad - q.grad).norm() / q.grad.norm()).item()
                for p, q in zip(ckpt.parameters(), plain.parameters()))
print(f"largest relative gradient difference, checkpointed vs plain: {grad_diff:.1e}")
print(f"forward + backward time, checkpointed / plain: {best['ckpt'] / best['plain']:.2f}×")

# %% [markdown]
# ### Is √n really the best number of checkpoints?
#
# Only if keeping one block input costs as much as one block's activations. Here a block keeps far more than
# its input (attention scores, the 4× wider MLP, layer norms), so more checkpoints keep paying off. Sweep the
# number of segments for 16 blocks:

# %%
n = 16
sweep = list(range(1, n + 1))
sweep_peaks = [saved_peak(make_gpt(n, True, s)) for s in sweep]
best_s = sweep[min(range(len(sweep)), key=sweep_peaks.__getitem__)]
print(f"s = ⌈√n⌉ = {math.isqrt(n - 1) + 1}: {sweep_peaks[math.isqrt(n - 1)]:,} bytes;  "
      f"lowest at s = {best_s}: {min(sweep_peaks):,} bytes;  no checkpointing: {saved_peak(make_gpt(n, False)):,}")
print(f"s·x + (n/s)·a is smallest at s = √(n·a/x) = {math.sqrt(n * per_block / block_input):.1f} "
      f"with a/x = {per_block / block_input:.1f} measured above")
fig = plots.plot_segment_sweep(sweep, sweep_peaks, n, no_checkpointing=saved_peak(make_gpt(n, False)))

# %% [markdown]
# The time does not depend on s: whatever the split, backward recomputes every block once, so checkpointing
# costs about one extra forward pass. What s trades is memory against memory — kept inputs (s·x) against one
# segment's activations (n/s·a). The lecture's √n is the balance point when x and a are about equal; the
# measured a/x moves the balance, but the saving over no checkpointing is large either way.

# %% [markdown]
# ## The paged optimizer
#
# AdamW keeps two fp32 numbers per trainable parameter (the moments m and v): 8 bytes, twice an fp32 weight.
# `PagedAdamW` cuts that state into fixed-size pages. At most `device_budget` bytes of pages stay on the
# device; when the budget shrinks, the least recently used pages are copied out to host memory, and a page
# comes back just before the update that needs it. The update itself is AdamW's, so the numbers are the same.

# %%
torch.manual_seed(0)
w = torch.nn.Parameter(torch.randn(1024, 64))
opt = PagedAdamW([w], lr=1e-2, page_size=4096, device_budget=4 * 4096)
print(f"state: {opt.state_nbytes():,} bytes in pages of {opt.pager.page_size} bytes "
      f"({opt.state_nbytes() // opt.pager.page_size} pages); device budget: 4 pages")
for step in range(3):
    w.grad = torch.randn_like(w)
    opt.step()
    s = opt.stats
    print(f"after step {step}: pages born {s.pages_born}, in {s.pages_in}, out {s.pages_out}, "
          f"resident now {opt.pager.resident_bytes:,} bytes, peak resident {s.peak_resident_bytes:,}")

# %% [markdown]
# ### One long sequence, one spike
#
# `long_sequence_demo` trains a small checkpointed GPT on short batches with one long batch in the middle, on a
# modelled device whose capacity fits weights, gradients, the whole optimizer state and a short batch's
# activations — but not the long batch's activations next to the whole state. (On this CPU-only machine the
# device is a byte budget; the page copies are real copies.) Plain AdamW runs out of memory at the spike;
# PagedAdamW moves pages out for the spike and back after it, and ends with the same weights.

# %%
demo = long_sequence_demo()
print(f"device capacity {demo.device_bytes:,} bytes = weights + gradients {demo.fixed_bytes:,} "
      f"+ {demo.device_bytes - demo.fixed_bytes:,} for optimizer pages and activations")
print(f"full optimizer state: {demo.state_bytes:,} bytes in pages of {demo.page_size}")
print(f"plain AdamW: out of memory at step {demo.unpaged_oom_step}")
print(f"{'step':>4} {'tokens':>6} {'activation peak':>16} {'pages on device':>16} {'out':>4} {'in':>4} {'plain fits':>10}")
for s in demo.steps:
    print(f"{s.step:>4} {s.seq_len:>6} {s.activation_peak:>16,} {s.resident_at_peak // demo.page_size:>16} "
          f"{s.pages_out:>4} {s.pages_in:>4} {str(s.fits_unpaged):>10}")
print(f"paged run: most bytes in use {demo.max_used_bytes:,} (capacity {demo.device_bytes:,}); "
      f"{demo.total_pages_out} pages out, {demo.total_pages_in} in, {demo.total_bytes_moved:,} bytes moved")
print(f"weights after training, paged vs unconstrained AdamW: max relative difference {demo.max_param_rel_diff:.1e}")
fig = plots.plot_paging_demo(demo)
