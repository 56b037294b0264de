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
# (through `torch.autograd.graph.saved_tensors_hooks`) and records the most bytes alive at once. Every
# sentence that states a number or a comparison is followed by a cell that asserts it, so if the library
# changes and the sentence becomes false, this notebook stops with a message naming the claim.
#
# Everything runs in fp32 on the CPU: the byte counts scale with the dtype (bf16 halves every activation),
# the ratios and the orderings do not.

# %%
import math
import time
import warnings

import torch

from minilora import GPT, GPTConfig, PagedAdamW, measure_saved_activations, plots, segment_bounds
from minilora.demos import long_sequence_demo

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


def block_forwards(model: GPT) -> int:
    """How many times a transformer block runs forward during one forward + backward (a hook counts)."""
    calls = [0]
    hooks = [b.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for b in model.transformer.h]
    model(idx, idx)[1].backward()
    for h in hooks:
        h.remove()
    return calls[0]

# %% [markdown]
# ## What a forward pass keeps
#
# Without checkpointing, every block's saved tensors stay alive until backward reaches that block, so the
# peak grows **linearly with depth**: each extra block adds the same number of bytes. With checkpointing at
# ⌈√n⌉ segments the peak grows only **like √n**, so it is **smaller at every depth from 4 blocks on**, and
# the gap widens with depth.

# %%
depths = [1, 4, 9, 16, 25, 36]  # squares, so √n is a whole number of segments
NO, CK = "no checkpointing", "checkpointing, ⌈√n⌉ segments"
peaks = {NO: [saved_peak(make_gpt(n, False)) for n in depths],
         CK: [saved_peak(make_gpt(n, True)) for n in depths]}

per_block = (peaks[NO][-1] - peaks[NO][0]) / (depths[-1] - depths[0])
block_input = torch.empty(B, T, WIDTH).nbytes  # what a checkpoint keeps: one block's input, fp32
print(f"{'n':>3} {'segments':>8} {'no ckpt':>12} {'ckpt':>12} {'ratio':>6} {'2√n/n':>6}")
for n, a, c in zip(depths, *peaks.values()):
    print(f"{n:>3} {len(segment_bounds(n)):>8} {a:>12,} {c:>12,} {c / a:>6.2f} {2 * math.sqrt(n) / n:>6.2f}")
print(f"\neach extra block keeps {per_block:,.0f} bytes; one block input is {block_input:,} bytes "
      f"({per_block / block_input:.1f}× smaller)")

# %%
steps = [(peaks[NO][i + 1] - peaks[NO][i]) / (depths[i + 1] - depths[i]) for i in range(len(depths) - 1)]
assert max(steps) - min(steps) <= 1e-3 * per_block, f"claim 'linear in depth' broke: bytes per block {steps}"
sqrt_steps = [peaks[CK][i + 1] - peaks[CK][i] for i in range(len(depths) - 1)]  # √n goes up by 1 each time
assert max(sqrt_steps) - min(sqrt_steps) <= 0.02 * max(sqrt_steps), \
    f"claim 'checkpointed peak grows like √n' broke: increments per +1 in √n {sqrt_steps}"
assert all(c < a for n, a, c in zip(depths, *peaks.values()) if n >= 4), \
    "claim 'checkpointing is smaller at every depth from 4 blocks on' broke"
ratios = [c / a for a, c in zip(*peaks.values())]
assert all(r2 < r1 for r1, r2 in zip(ratios, ratios[1:])), f"claim 'the gap widens with depth' broke: {ratios}"
print("checked: linear without checkpointing, √n with it, smaller from n = 4, gap widening")

# %% [markdown]
# ## Checkpointing: keep every segment's input, recompute the rest
#
# Split the n blocks into s segments. The forward pass runs each segment without recording a graph and keeps
# only its input. In backward, the segment being differentiated is run again from its input, this time with
# the graph, and then thrown away. The peak is about s kept inputs plus one segment's worth of activations:
# with s = √n both terms are √n, which is where the lecture's "every √n-th layer" comes from.
# `segment_bounds` gives the split: **⌈√n⌉ contiguous segments covering all n blocks**.

# %%
for n in (4, 9, 16, 10):
    print(f"n = {n:>2}: segments {segment_bounds(n)}")
fig = plots.plot_checkpointing(depths, peaks)


# %% [markdown]
# Recomputing must give **the same gradients**, and it costs compute: **each block runs forward twice**
# (once without a graph, once again in backward), where plain training runs it once. That count is what we
# assert; the wall-clock ratio for 16 blocks is printed for illustration only (the fastest of three passes,
# interleaved), since it depends on the machine and on whatever else it is running.

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
forwards = {name: block_forwards(model) for name, model in models.items()}
print(f"largest relative gradient difference, checkpointed vs plain: {grad_diff:.1e}")
print(f"block forward passes in one training step: plain {forwards['plain']}, checkpointed {forwards['ckpt']}")
print(f"forward + backward time, checkpointed / plain: {best['ckpt'] / best['plain']:.2f}× (not asserted)")

# %%
assert grad_diff < 1e-5, f"claim 'the same gradients' broke: relative difference {grad_diff:.1e}"
assert forwards == {"plain": 16, "ckpt": 32}, f"claim 'each block runs forward twice' broke: {forwards}"

# %% [markdown]
# ### Is √n really the best number of checkpoints?
#
# Only if keeping one block input costs as much as one block's activations. Here a block keeps **far more
# than its input** (attention scores, the 4× wider MLP, layer norms: a/x between 15 and 17, measured above), so **every
# extra checkpoint keeps paying off**: sweeping s for 16 blocks, the peak falls with every added segment and
# is lowest at **s = n**, where the model s·x + (n/s)·a puts it (√(n·a/x), capped at n).

# %%
n = 16
sweep = list(range(1, n + 1))
sweep_peaks = [saved_peak(make_gpt(n, True, s)) for s in sweep]
best_s = sweep[min(range(len(sweep)), key=sweep_peaks.__getitem__)]
no_ckpt_16 = saved_peak(make_gpt(n, False))
model_s = min(n, math.sqrt(n * per_block / block_input))
print(f"s = ⌈√n⌉ = {math.isqrt(n - 1) + 1}: {sweep_peaks[math.isqrt(n - 1)]:,} bytes;  "
      f"lowest at s = {best_s}: {min(sweep_peaks):,} bytes;  no checkpointing: {no_ckpt_16:,}")
print(f"s·x + (n/s)·a is smallest at s = √(n·a/x) = {math.sqrt(n * per_block / block_input):.1f} "
      f"with a/x = {per_block / block_input:.1f} measured above")
fig = plots.plot_segment_sweep(sweep, sweep_peaks, n, no_checkpointing=no_ckpt_16)

# %%
assert 15 < per_block / block_input < 17, f"claim 'a/x between 15 and 17' broke: a/x = {per_block / block_input:.1f}"
assert all(b < a for a, b in zip(sweep_peaks, sweep_peaks[1:])), \
    f"claim 'the peak falls with every added segment' broke: {sweep_peaks}"
assert best_s == n, f"claim 'lowest at s = n' broke: lowest at s = {best_s}"
assert abs(best_s - model_s) <= 1, f"claim 'the model puts it there' broke: model {model_s:.1f}, measured {best_s}"

# %% [markdown]
# **The compute does not depend on s**: whatever the split, backward recomputes every block once, so
# checkpointing costs one extra forward pass of every block — 2n block forwards per step for every s. What s
# trades is memory against memory — kept inputs (s·x) against one segment's activations (n/s·a). The
# lecture's √n is the balance point when x and a are about equal (the slide states √n as the rule; notebook 7
# lists this as a slide erratum); the measured a/x moves the balance, but
# **the saving over no checkpointing is large at every s ≥ 2** (at least 2×, measured here), while a single
# segment saves almost nothing (it only keeps the input instead of the first block's activations).

# %%
counts = {s: block_forwards(make_gpt(n, True, s)) for s in sweep}
print("block forwards per training step, by s:", counts)
assert set(counts.values()) == {2 * n}, f"claim 'the compute does not depend on s (2n forwards)' broke: {counts}"
savings = [no_ckpt_16 / p for p in sweep_peaks]
assert min(savings[1:]) >= 2, f"claim 'at least 2× at every s ≥ 2' broke: {min(savings[1:]):.2f}×"
assert savings[0] < 1.1, f"claim 'a single segment saves almost nothing' broke: {savings[0]:.2f}×"
print(f"saving over no checkpointing: s = 1 {savings[0]:.2f}×, s = 2 {savings[1]:.2f}×, s = n {savings[-1]:.2f}×")

# %% [markdown]
# ## The paged optimizer
#
# AdamW keeps **two fp32 numbers per trainable parameter** (the moments m and v): **8 bytes, twice an fp32
# weight**. `PagedAdamW` cuts that state into fixed-size pages. At most `device_budget` bytes of pages stay on
# the device; when the budget shrinks, the least recently used pages are copied out to host memory, and a page
# comes back just before the update that needs it. **The update itself is AdamW's, so the numbers are the
# same** as `torch.optim.AdamW` — and **the resident pages never exceed the budget**.

# %%
torch.manual_seed(0)
w = torch.nn.Parameter(torch.randn(1024, 64))
w_ref = torch.nn.Parameter(w.detach().clone())
PAGE, BUDGET = 4096, 4 * 4096
opt = PagedAdamW([w], lr=1e-2, page_size=PAGE, device_budget=BUDGET)
ref = torch.optim.AdamW([w_ref], lr=1e-2)
print(f"state: {opt.state_nbytes():,} bytes in pages of {opt.pager.page_size} bytes "
      f"({opt.state_nbytes() // opt.pager.page_size} pages); device budget: {BUDGET // PAGE} pages")
for step in range(3):
    g = torch.randn_like(w)
    w.grad, w_ref.grad = g, g.clone()
    opt.step()
    ref.step()
    s = opt.stats
    print(f"after step {step}: pages born {s.pages_born}, in {s.pages_in}, out {s.pages_out}, "
          f"resident now {opt.pager.resident_bytes:,} bytes, peak resident {s.peak_resident_bytes:,}")
diff = ((w - w_ref).norm() / w_ref.norm()).item()
print(f"weights after 3 steps, PagedAdamW vs torch.optim.AdamW: relative difference {diff:.1e}")

# %%
assert diff < 1e-6, f"claim 'the numbers are the same as torch.optim.AdamW' broke: {diff:.1e}"
assert opt.stats.peak_resident_bytes <= BUDGET, "claim 'resident pages never exceed the budget' broke"
assert opt.stats.pages_out > 0 and opt.stats.pages_in > 0, "the example was meant to page: nothing moved"

# %% [markdown]
# ### How bitsandbytes pages, and how minilora's pager differs
#
# QLoRA's paged optimizers (`bitsandbytes.optim.PagedAdamW`, Dettmers et al., *QLoRA*, 2023) do not move pages
# themselves. They allocate the optimizer state with **CUDA unified memory** (`cudaMallocManaged`): one
# address range valid on both the GPU and the CPU. The CUDA driver then does the paging:
#
# - when the GPU runs short of memory (say, during an activation spike), the driver **evicts** managed pages
#   to host RAM — *oversubscription*, which needs a Pascal or newer GPU on Linux;
# - when a kernel touches an evicted page, the GPU takes a **page fault**, stalls that access, and the
#   driver migrates the page back over PCIe (migration granularity and its prefetch heuristics are the
#   driver's business — NVIDIA's *CUDA C++ Programming Guide*, "Unified Memory Programming", documents them);
# - to avoid paying a fault per page during the update, bitsandbytes calls **`cudaMemPrefetchAsync`** on a
#   parameter's state tensors just before its update, which moves them in bulk.
#
# These are facts about bitsandbytes' source and CUDA, not something a CPU can measure. What can be read in the
# installed bitsandbytes' source is checked by `tests/test_lecture_facts.py`: state buffers come from `get_paged`
# (unified memory, `cget_managed_ptr`) **only for parameters of at least 10⁵ elements** (smaller state stays
# ordinary device memory), and they are prefetched before each update. What the cell below runs: **on the CPU
# the paged optimizer falls back to ordinary tensors** (it warns and pages nothing).
#
# minilora's `PagedAdamW` is the same idea made explicit: the pager owns fixed-size pages, keeps an LRU list,
# evicts when told the budget shrank (by the demo below, which plays the role of the driver's memory
# pressure), and brings a page back before the update that needs it. Every move is a visible copy and is
# counted (`pages_in`, `pages_out`, `bytes_moved`), which is what the numbers in this notebook are. The price
# is that minilora must be told when memory is tight; the driver notices by itself.

# %%
try:
    import bitsandbytes as bnb
except ImportError as err:  # the dev extra installs it; without it this check is skipped, and says so
    bnb = None
    print(f"bitsandbytes is not installed ({err}); the checks of its paging code are skipped")
if bnb is not None:  # (what its source says — unified memory, 10⁵ elements, prefetch — tests/test_lecture_facts.py reads)
    wb = torch.nn.Parameter(torch.randn(1000, 200))  # 2·10⁵ elements: large enough to be paged on a GPU
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bopt = bnb.optim.PagedAdamW([wb], lr=1e-3)
        wb.grad = torch.randn_like(wb)
        bopt.step()
    state1 = bopt.state[wb]["state1"]
    print(f"bitsandbytes {bnb.__version__} on {wb.device}: state1 is paged: {getattr(state1, 'is_paged', False)}; "
          f"warnings: {[str(c.message) for c in caught]}")
    if wb.device.type == "cpu":
        assert not getattr(state1, "is_paged", False) and any("not supported on CPU" in str(c.message) for c in caught), \
            "claim 'on the CPU bitsandbytes falls back to ordinary tensors and warns' broke"

# %% [markdown]
# ### One long sequence, one spike
#
# `long_sequence_demo` trains a small checkpointed GPT on short batches with one long batch in the middle, on a
# modelled device whose capacity fits weights, gradients, the whole optimizer state and a short batch's
# activations — **but not the long batch's activations next to the whole state**. (On this CPU-only machine
# the device is a byte budget; the page copies are real copies.) **Plain AdamW runs out of memory at the
# spike**; **PagedAdamW moves pages out for the spike and back after it**, **never uses more than the
# capacity**, and **ends with the same weights**.

# %%
demo = long_sequence_demo()
long_step = max(demo.steps, key=lambda s: s.seq_len)
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

# %%
assert not long_step.fits_unpaged and all(s.fits_unpaged for s in demo.steps if s is not long_step), \
    "claim 'the capacity fits every short step with the whole state, but not the long one' broke"
assert demo.unpaged_oom_step == long_step.step, \
    f"claim 'plain AdamW runs out of memory at the spike' broke: step {demo.unpaged_oom_step}, spike {long_step.step}"
assert long_step.pages_out > 0, "claim 'pages move out for the spike' broke"
assert sum(s.pages_in for s in demo.steps if s.step > long_step.step) + long_step.pages_in > 0, \
    "claim 'pages come back after the spike' broke"
assert demo.max_used_bytes <= demo.device_bytes, "claim 'never uses more than the capacity' broke"
assert demo.max_param_rel_diff < 1e-5, f"claim 'the same weights' broke: {demo.max_param_rel_diff:.1e}"
print("checked: out of memory at the spike without paging; with paging within capacity and the same weights")

# %% [markdown]
# ## Exercises
#
# Fill in each `answer_…` (it starts as `None`) and run the cell after it: it says whether the answer is
# right, without printing the solution.
#
# 1. A checkpointed GPT with **n = 25** blocks and the default ⌈√n⌉ segments: how many block forward passes
#    does one training step (forward + backward) run?
# 2. With the **a/x measured above**, which whole number of segments s minimises s·x + (n/s)·a for
#    **n = 36**? (The check accepts the nearest whole number to the model's optimum, capped at n.)
# 3. `PagedAdamW` with `page_size=4096` over one fp32 parameter of shape **(512, 96)**: how many pages does its
#    state fill?
# 4. In the installed bitsandbytes, would a CUDA `PagedAdamW` put the state of a **300 × 300** weight in
#    unified memory? Answer `True` or `False`.

# %%
answer_1 = None  # an int
answer_2 = None  # an int
answer_3 = None  # an int
answer_4 = None  # True or False


def check(name, answer, is_right):
    if answer is None:
        print(f"{name}: fill in your answer above and run this cell again")
        return
    assert is_right(answer), f"{name}: {answer!r} is not right, try again"
    print(f"{name}: right")


check("exercise 1", answer_1, lambda a: a == block_forwards(make_gpt(25, True)))
check("exercise 2", answer_2, lambda a: a == min(36, round(math.sqrt(36 * per_block / block_input))))
check("exercise 3", answer_3, lambda a: a == PagedAdamW([torch.nn.Parameter(torch.zeros(512, 96))], page_size=4096)
      .state_nbytes() // 4096)
check("exercise 4", answer_4, lambda a: a is (300 * 300 >= 1e5))
