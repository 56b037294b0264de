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
# # 2 · Quantization: from int8 buckets to NF4 with double quantization
#
# Quantizing means cutting a range of real numbers into a fixed number of buckets and storing, for every
# weight, only the number of its bucket. This notebook follows the lecture's path:
#
# 1. int8 absmax on the lecture's ten numbers (and where the slide's codes are off by one),
# 2. the outlier problem, and blockwise quantization as its cure,
# 3. NF4: 16 buckets placed for normally distributed weights, against int4 and FP4,
# 4. double quantization: the lecture's 5×5 example (100 → 34 bytes) and the real format's 4.127 bits.

# %%
import torch

from minilora import plots
from minilora.quant import (dequantize_4bit, dequantize_int8, double_dequantize_int8, double_quantize_int8,
                            error_table, fp4_code, int4_code, nf4_code, quantize_4bit, quantize_int8, quantize_nf4)

torch.manual_seed(0)

# %% [markdown]
# ## 1 · Int8 absmax
#
# Scale the tensor so its largest magnitude lands on 127, then round:
#
#     c = 127 / absmax(X),    X_int8 = round(c · X),    X ≈ X_int8 / c
#
# The buckets are all the same width, absmax/127, so rounding to the nearest one is off by at most half a
# bucket, absmax/254. The lecture's example (the slide's printed codes are typed in below, for comparison only):

# %%
x = torch.tensor([1.5, 2.3, 3.7, 4.1, 5.6, 6.8, 7.9, 8.4, 9.2, 10.2])
SLIDE_CODES = [18, 29, 46, 51, 69, 85, 98, 105, 115, 127]  # as printed on the slide

q, absmax = quantize_int8(x)
c = 127 / absmax.item()
x_back = dequantize_int8(q, absmax)
print(f"absmax = {absmax.item():g},  c = 127/absmax = {c:.4f}")
print("c·x      :", [round(v, 2) for v in (c * x).tolist()])
print("X_int8   :", q.tolist())
print("slide    :", SLIDE_CODES)
for k, (ours, slide) in enumerate(zip(q.tolist(), SLIDE_CODES)):
    if ours != slide:
        print(f"  x = {x[k].item():g}: c·x = {c * x[k].item():.2f} rounds to {ours}; the slide prints {slide}; "
              f"cutting off the fraction would give {int(c * x[k].item())}")
print("dequantized:", [round(v, 3) for v in x_back.tolist()])
err = (x - x_back).abs()
print(f"largest error {err.max().item():.4f} <= absmax/254 = {absmax.item() / 254:.4f}: {bool(err.max() <= absmax / 254 + 1e-6)}")
fig = plots.plot_int8_example(x, c * x, q, absmax.item(), slide_q=SLIDE_CODES)

# %% [markdown]
# ## 2 · The outlier problem, and blocks
#
# One constant for a whole tensor means one large value sets the bucket width for everyone. Take 4,096 weights
# drawn from N(0, 1) and put one outlier among them: with a single absmax, the ordinary weights share a handful
# of buckets near zero. Blockwise quantization gives every block of 64 consecutive weights its own absmax, so
# the outlier only coarsens its own block — at the price of one more constant per block.

# %%
w = torch.randn(4096)
w_out = w.clone()
w_out[1000] = 60.0  # one outlier

errors, used = {}, {}
for name, blocksize in (("one absmax", None), ("blocks of 64", 64)):
    for label, v in (("", w), (" + outlier", w_out)):
        qv, a = quantize_int8(v, blocksize)
        errors[name + label] = (v - dequantize_int8(qv, a, blocksize)).abs()
        used[name + label] = qv.unique().numel()
print(f"{'int8 scheme':<28} {'mean |error|':>12} {'codes used':>10}")
for k in errors:
    print(f"{k:<28} {errors[k].mean().item():>12.5f} {used[k]:>10}")
per_block = {name: errors[name + " + outlier"].reshape(-1, 64).mean(1) for name in ("one absmax", "blocks of 64")}
fig = plots.plot_outlier_effect(w_out, per_block, blocksize=64)

# %% [markdown]
# ## 3 · NF4: buckets where the weights are
#
# Trained weights look roughly normal, and after dividing a block by its absmax they crowd around zero. Evenly
# spaced buckets (int4) waste their outer levels on values that rarely occur. NF4 puts its 16 values at
# quantiles of N(0, 1), so each bucket receives about the same share of weights, and it keeps an exact zero.
# FP4 (a 4-bit float: sign, 2 exponent bits, 1 mantissa bit) sits in between.
#
# Below: 1M normal weights, blocks of 64, each format's 16 levels drawn over the distribution of w/absmax, the
# share of weights each code receives, and the measured error of the round trip. The shares are not exactly
# equal even for NF4 — every block puts its own absmax exactly on ±1, and w/absmax is not quite N(0, 1) — but
# they are far flatter than int4's, whose middle codes take most of the weights.

# %%
W = torch.randn(1024, 1024)
books = {"NF4": nf4_code(), "FP4": fp4_code(), "int4": int4_code()}
print("NF4 levels:", [round(v, 4) for v in books["NF4"].tolist()])

usage = {}
for name, code in books.items():
    state = quantize_4bit(W, code, blocksize=64, double_quant=False)
    # two 4-bit codes per byte, the first element in the high nibble
    idx = torch.stack([state.packed >> 4, state.packed & 15], dim=1).flatten()[:W.numel()].long()
    usage[name] = torch.bincount(idx, minlength=16).float() / W.numel()

# the round-trip error of each format on the same weights, int8 (blocks of 64) as a reference
table = {row["format"]: row for row in error_table({"N(0, 1)": W}, formats=("nf4", "fp4", "int4", "int8"))}
print(f"\n{'format, blocks of 64':<22} {'bits/param':>10} {'mean |error|':>12} {'RMS error / std':>15} {'max |error|':>11}")
for fmt, row in table.items():
    print(f"{fmt:<22} {row['bits_per_param']:>10.3f} {row['mean_abs']:>12.4f} {row['rel_rmse']:>15.4f} {row['max_abs']:>11.4f}")
best = min(("nf4", "fp4", "int4"), key=lambda f: table[f]["rel_rmse"])
print(f"\nlowest RMS error among the 4-bit formats: {best}")
print("share of weights in the busiest / the least used code:")
for name, p in usage.items():
    print(f"  {name:<5} {p.max().item():.3f} / {p.min().item():.3f}")

absmax_blocks = W.reshape(-1, 64).abs().amax(1, keepdim=True)
normalized = (W.reshape(-1, 64) / absmax_blocks).flatten()
fig = plots.plot_codebooks(books, normalized, usage, errors={n: table[n.lower()]["mean_abs"] for n in books})

# %% [markdown]
# ## 4 · Double quantization
#
# Blocks fix outliers but cost constants: one FP32 absmax per block of 64 is 32/64 = 0.5 extra bits per weight.
# Double quantization quantizes those constants too. The lecture's teaching version uses int8 absmax twice, on
# its 5×5 example with blocks of 5 (one per row): the weights become int8 with one constant c1 per block, and
# the five constants c1 are themselves stored as int8 with a single FP32 constant c2.

# %%
W5 = torch.tensor([[-0.7, -0.3, 0.0, -0.4, 0.3],
                   [-1.0, 0.2, 0.7, 1.7, -0.9],
                   [-0.1, -1.5, -0.1, 0.8, 0.5],
                   [1.2, -1.7, -0.9, -0.3, 0.7],
                   [0.4, 0.1, -1.4, 2.2, -1.1]])
SLIDE_BLOCKWISE = [[-127, -54, 0, -73, 54],  # the slide's int8 table after blockwise quantization, as printed
                   [-77, 13, 51, 127, -74],
                   [-9, -127, -12, 70, 40],
                   [93, -127, -64, -24, 52],
                   [22, 8, -81, 127, -66]]

dq = double_quantize_int8(W5, blocksize=5)
print("W_int8 (one absmax per row):\n", dq.q)
print("c1 as int8:", dq.c1.tolist(), "  c2 (fp32):", round(dq.c2.item(), 4))
slide = torch.tensor(SLIDE_BLOCKWISE, dtype=torch.int8)
diff = (dq.q != slide)
print(f"\ncells where the slide's table differs from round(127·w/absmax_row): {int(diff.sum())} of 25")
for i, j in diff.nonzero().tolist():
    exact = 127 * W5[i, j].item() / W5[i].abs().max().item()
    print(f"  row {i}, col {j}: 127·{W5[i, j].item():g}/{W5[i].abs().max().item():g} = {exact:7.2f} -> {dq.q[i, j].item():4d}"
          f"  (slide {SLIDE_BLOCKWISE[i][j]})")

before = W5.numel() * W5.element_size()
print(f"\nbytes: {before} (25 fp32) -> {dq.nbytes} = {dq.q.numel()} (int8 weights) + {dq.c1.numel()} (int8 c1) + 4 (fp32 c2)"
      f"  — {1 - dq.nbytes / before:.0%} smaller (the slide rounds this to about 70%)")
W5_back = double_dequantize_int8(dq)
print(f"largest round-trip error: {(W5 - W5_back).abs().max().item():.4f}")

# %% [markdown]
# ### The real format: 4.127 bits per parameter
#
# QLoRA (and bitsandbytes) store NF4 codes in blocks of 64; each block's FP32 absmax is replaced by an 8-bit
# code (centred on the mean absmax and quantized with an 8-bit dynamic map, in groups of 256 blocks), plus one
# FP32 constant per group: 4 + 8/64 + 32/(64·256) bits per weight. `QuantState.nbytes` counts the bytes actually
# stored, for a 4096 × 4096 weight:

# %%
W_big = torch.randn(4096, 4096) * 0.02
single = quantize_nf4(W_big, blocksize=64, double_quant=False)
double = quantize_nf4(W_big, blocksize=64, double_quant=True)
n = W_big.numel()
print(f"{'storage':<36} {'bytes':>12} {'bits/param':>11}")
print(f"{'bf16':<36} {2 * n:>12,} {16:>11.3f}")
print(f"{'NF4, fp32 absmax per 64':<36} {single.nbytes:>12,} {single.bits_per_param:>11.3f}")
print(f"{'NF4 + double quantization':<36} {double.nbytes:>12,} {double.bits_per_param:>11.3f}")
print(f"formula 4 + 8/64 + 32/(64·256) = {4 + 8 / 64 + 32 / (64 * 256):.3f}")
for name, st in (("fp32 absmax", single), ("double quantized", double)):
    e = (W_big - dequantize_4bit(st)).abs().mean().item()
    print(f"mean |error| with {name:<17}: {e:.3e}")
