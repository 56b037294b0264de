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
# 3. NF4: 16 buckets placed for normally distributed weights, derived here from the normal quantiles, against
#    int4 and FP4,
# 4. double quantization: the lecture's 5×5 example (100 → 34 bytes) and the real format's 4.127 bits,
# 5. affine (zero-point) quantization, the workshop's x_q = round(x/S + Z), against absmax on skewed data,
# 6. the same formats dequantized to bf16, the dtype QLoRA computes in.
#
# Every sentence that states a number, an ordering or a comparison is followed by a cell that asserts it; the
# slides' own misprints are collected, with the reasons, in notebook 7.

# %%
import matplotlib.pyplot as plt
import torch

from minilora import plots
from minilora.quant import (dequantize_4bit, dequantize_int8, dequantize_nf4, double_dequantize_int8,
                            double_quantize_int8, error_table, fp4_code, int4_code, nf4_code, quantize_4bit,
                            quantize_int8, quantize_nf4)
from minilora.quant.affine import dequantize_affine, quantize_affine

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
assert err.max() <= absmax / 254 + 1e-6, "claim broke: rounding is off by at most half a bucket, absmax/254"
wrong = [k for k in range(10) if q[k].item() != SLIDE_CODES[k]]
assert [SLIDE_CODES[k] for k in wrong] == [18, 69] and [q[k].item() for k in wrong] == [19, 70], \
    "claim broke: the slide's codes are off by one at 18 and 69 (19 and 70), and only there"
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
# With the outlier and one absmax, the 4,095 ordinary weights land in a handful of codes (under 20 of 255) and
# their error grows several-fold; with blocks, every block but the outlier's keeps exactly the error it had
# without the outlier.

# %%
ordinary = torch.ones(4096, dtype=torch.bool)
ordinary[1000] = False
q_one, _ = quantize_int8(w_out)
codes_ordinary = q_one[ordinary].unique().numel()
print(f"codes used by the ordinary weights, one absmax + outlier: {codes_ordinary}")
assert codes_ordinary < 20, f"claim broke: the ordinary weights share a handful of buckets ({codes_ordinary})"
grow = errors["one absmax + outlier"][ordinary].mean() / errors["one absmax"][ordinary].mean()
print(f"their mean error grows {grow:.1f}× with the outlier under one absmax")
assert grow > 5, f"claim broke: one outlier coarsens every weight under one absmax ({grow:.1f}×)"
blk = errors["blocks of 64 + outlier"].reshape(-1, 64)
other = torch.ones(64, dtype=torch.bool)
other[1000 // 64] = False
assert torch.equal(blk[other], errors["blocks of 64"].reshape(-1, 64)[other]), \
    "claim broke: with blocks, the outlier only coarsens its own block"

# %% [markdown]
# ## 3 · NF4: buckets where the weights are
#
# Trained weights look roughly normal (notebook 1 measures it on a trained GPT; it is the weights, not the data,
# that NF4 assumes normal — *slide erratum*, notebook 7 §11), and after dividing a block by
# its absmax they crowd around zero. Evenly
# spaced buckets (int4) waste their outer levels on values that rarely occur. NF4 puts its 16 values at
# quantiles of N(0, 1): narrow buckets where the weights crowd, wide ones in the tails, and an exact zero.
# (For N(0, 1) itself quantile buckets would hold equal shares; after each block is divided by its absmax they
# do not, as measured below.) FP4 (a 4-bit float: sign, 2 exponent bits, 1 mantissa bit) sits in between.
#
# ### The NF4 table, derived
#
# NF4's 16 values come from the quantile function Q = Φ⁻¹ of N(0, 1). To make 0 exact, the table is
# asymmetric: 8 positive levels at probabilities evenly spaced from ½ (excluded) to 1 − δ, 7 negative ones
# mirrored from an even grid with one point fewer, and 0; then everything is divided by the largest, so the
# table spans [−1, 1]. δ = ½(1/32 + 1/30) keeps the outermost level finite (Q(1) = ∞): it is halfway between
# half a bucket's mass for 16 and for 15 equal buckets, 1/(2·16) and 1/(2·15). This is **bitsandbytes'
# construction** (its `create_normal_map`), the table QLoRA's code actually uses and the one minilora stores.
# Computed here in float64, it agrees with `minilora.quant.nf4_code()` to float32 rounding:

# %%
delta = 0.5 * (1 / 32 + 1 / 30)
p_pos = torch.linspace(1 - delta, 0.5, 9, dtype=torch.float64)[:-1]      # 8 probabilities above ½
p_neg = torch.linspace(1 - delta, 0.5, 8, dtype=torch.float64)[:-1]      # 7, mirrored below ½
levels = torch.cat([-torch.special.ndtri(p_neg), torch.zeros(1, dtype=torch.float64), torch.special.ndtri(p_pos)])
nf4_derived = (levels / levels.max()).sort().values
print("derived :", [round(v, 4) for v in nf4_derived.tolist()])
print("nf4_code:", [round(v, 4) for v in nf4_code().tolist()])
gap = (nf4_derived - nf4_code().double()).abs().max().item()
print(f"largest difference: {gap:.1e}; values below / at / above 0: "
      f"{int((nf4_derived < 0).sum())} / {int((nf4_derived == 0).sum())} / {int((nf4_derived > 0).sum())}")
assert gap < 1e-6, f"claim broke: the derived table is nf4_code() ({gap:.1e})"

# %% [markdown]
# ### The paper's equation is a different table
#
# The QLoRA paper (Dettmers et al. 2023, §3, eq. 4) writes the levels differently: each is the **average of two
# neighbouring quantiles**, q_i = ½·(Q(i/(2ᵏ+1)) + Q((i+1)/(2ᵏ+1))), for k = 4 bits. Taken literally its two
# outermost levels are infinite (they use Q(0) and Q(1)), so here its 17 probabilities are spread over
# [δ, 1 − δ] with bitsandbytes' δ; the result is symmetric and has **no exact zero** (the paper then describes
# an asymmetric variant to get one, which is what bitsandbytes' table above does, without the averaging). The
# two tables, and the error each gives on the same normal weights in blocks of 64:

# %%
p_eq = torch.linspace(delta, 1 - delta, 17, dtype=torch.float64)
q_eq = 0.5 * (torch.special.ndtri(p_eq[:-1]) + torch.special.ndtri(p_eq[1:]))
paper_table = q_eq / q_eq.abs().max()
print("bitsandbytes (nf4_code):", [round(v, 4) for v in nf4_code().tolist()])
print("paper, eq. 4           :", [round(v, 4) for v in paper_table.tolist()])
W_tables = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(1))
rms_table = {}
for name, code in (("bitsandbytes", nf4_code()), ("paper eq. 4", paper_table.float())):
    back = dequantize_4bit(quantize_4bit(W_tables, code, blocksize=64, double_quant=False))
    rms_table[name] = ((W_tables - back).square().mean().sqrt() / W_tables.std()).item()
    print(f"{name:<13} RMS error / std on N(0, 1) weights, blocks of 64: {rms_table[name]:.4f}")
table_gap = (paper_table - nf4_code().double()).abs().max().item()
print(f"largest difference between the tables: {table_gap:.3f}")
assert 0.0 in nf4_code().tolist() and 0.0 not in paper_table.tolist(), "claim broke: only bitsandbytes' table has an exact 0"
assert torch.allclose(paper_table, -paper_table.flip(0)) and not torch.allclose(nf4_code(), -nf4_code().flip(0)), \
    "claim broke: the paper's table is symmetric, bitsandbytes' is not"
assert table_gap > 0.05, f"claim broke: the two tables differ ({table_gap:.3f})"
assert 0.9 < rms_table["paper eq. 4"] / rms_table["bitsandbytes"] < 1, \
    "claim broke: the paper's symmetric table has the slightly lower RMS error"

# %% [markdown]
# On normal weights the paper's symmetric table even has the slightly lower RMS error (by less than 10 %): the exact
# zero of bitsandbytes' table is not free. It is kept because zeros occur exactly — padding, pruned weights — and
# should come back exactly. From here on, "NF4" means bitsandbytes' table, as in minilora, bitsandbytes and PEFT.

# %% [markdown]
# Below: 1M normal weights, blocks of 64, each format's 16 levels drawn over the distribution of w/absmax, the
# share of weights each code receives, and the measured error of the round trip. The shares are far from equal
# even for NF4 — every block puts its own absmax exactly on ±1, so the outermost codes hold little more than the
# absmax itself, and w/absmax is not N(0, 1) — but they are flatter than int4's.

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
# On normal weights NF4 has the lowest error of the three 4-bit formats and FP4 sits between NF4 and int4
# (RMS and mean error). int4 has the smallest *largest* error: its levels are evenly spaced, so no gap is wide,
# while NF4 and FP4 widen the gaps in the tails, where few weights fall, to narrow them where most do. NF4's
# busiest code takes at least 1.3 times less than int4's, and its least used one more than int4's. FP4's shares
# are flatter still than NF4's (a smaller spread around 1/16) although its error is higher: equal shares are not
# what minimizes the error. All three store the same 4.5 bits per weight here.

# %%
for stat in ("rel_rmse", "mean_abs"):
    assert table["nf4"][stat] < table["fp4"][stat] < table["int4"][stat], f"claim broke: NF4 < FP4 < int4 in {stat}"
assert table["int4"]["max_abs"] < min(table["nf4"]["max_abs"], table["fp4"]["max_abs"]), \
    "claim broke: int4 has the smallest largest error"
assert usage["int4"].max() > 1.3 * usage["NF4"].max() and usage["int4"].min() < usage["NF4"].min(), \
    "claim broke: NF4's shares are flatter than int4's"
print("spread of the shares around 1/16 (std): " + ", ".join(f"{k} {v.std().item():.4f}" for k, v in usage.items()))
assert usage["FP4"].std() < usage["NF4"].std() < usage["int4"].std(), "claim broke: FP4's shares flatter than NF4's"

# %% [markdown]
# ## 4 · Double quantization
#
# Blocks fix outliers but cost constants: one FP32 absmax per block of 64 is 32/64 = 0.5 extra bits per weight
# (the 4.5 bits above).
# Double quantization quantizes those constants too. The lecture's teaching version uses int8 absmax twice, on
# its 5×5 example with blocks of 5 (one per row): the weights become int8 with one constant c1 per block, and
# the five constants c1 are themselves stored as int8 with a single FP32 constant c2. (The slide's printed tables
# for this example do not follow from its printed weights: *slide errata*, notebook 7 §2-§4; the QLoRA slide swaps
# the names c1 and c2, §13.)

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
assert dq.nbytes == 34 and before == 100, "claim broke: 100 -> 34 bytes"
assert round(100 * (1 - dq.nbytes / before)) == 66, "claim broke: a 66 % saving"
assert int(diff.sum()) > 10, "claim broke: most cells of the slide's table differ from the computed codes"

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
mean_err = {}
for name, st in (("fp32 absmax", single), ("double quantized", double)):
    mean_err[name] = (W_big - dequantize_4bit(st)).abs().mean().item()
    print(f"mean |error| with {name:<17}: {mean_err[name]:.3e}")

# %% [markdown]
# The measured bits per weight are the formula's, to within the few bytes of per-tensor constants; double
# quantization saves 0.373 bits per weight and costs under 1 % in mean error:

# %%
assert abs(single.bits_per_param - 4.5) < 1e-3, f"claim broke: 4.5 bits with fp32 absmax ({single.bits_per_param})"
assert abs(double.bits_per_param - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-3, "claim broke: 4.127 bits with double quant"
assert abs(single.bits_per_param - double.bits_per_param - 0.373) < 1e-3, "claim broke: it saves 0.373 bits"
extra = mean_err["double quantized"] / mean_err["fp32 absmax"] - 1
print(f"extra mean error from double quantization: {extra:.3%}")
assert 0 <= extra < 0.01, f"claim broke: double quantization costs under 1 % in mean error ({extra:.3%})"

# %% [markdown]
# ## 5 · Affine (zero-point) quantization against absmax, on skewed data
#
# Absmax puts 0 in the middle of a symmetric grid spanning ±absmax. Data that is all on one side of 0 — the
# outputs of a ReLU or GELU, softmax probabilities, or the block constants themselves — then uses only half the
# codes. Affine quantization (the workshop's x_q = round(x/S + Z)) stretches the grid over each group's own
# [min, max] (0 included) with a scale S and an integer zero point Z:
#
#     S = (max − min) / (2^bits − 1),   Z = round(−min / S),   x_q = round(x / S + Z),   x' = S·(x_q − Z)
#
# `minilora.quant.affine` implements it; here the three lines are also written out and checked against it.
# Both at 4 bits in groups of 128, on skewed data (exponential, all positive) and on symmetric data (normal):
# absmax int4 has 15 levels k/7 of the group's absmax, affine 16 levels across [min, max].

# %%
torch.manual_seed(0)
data = {"skewed: Exp(1)": torch.empty(256, 1024).exponential_(), "symmetric: N(0, 1)": torch.randn(256, 1024)}
aff_rows = {}
for name, v in data.items():
    st_aff = quantize_affine(v, bits=4, groupsize=128)
    back_aff = dequantize_affine(st_aff)
    g_ = v.reshape(-1, 128)                                  # the three lines, by hand
    S_ = (g_.amax(1).clamp(min=0) - g_.amin(1).clamp(max=0)) / 15
    Z_ = torch.round(-g_.amin(1).clamp(max=0) / S_)
    by_hand = (S_[:, None] * (torch.round(g_ / S_[:, None] + Z_[:, None]).clamp(0, 15) - Z_[:, None])).reshape(v.shape)
    assert (by_hand - back_aff).abs().max() < 1e-5, "claim broke: the three lines are minilora.quant.affine"
    st_abs = quantize_4bit(v, int4_code(), blocksize=128, double_quant=False)
    back_abs = dequantize_4bit(st_abs)
    levels_abs = (back_abs.reshape(-1, 128) / st_abs.absmax[:, None]).mul(7).round().unique().numel()
    aff_rows[name] = {"absmax": (v - back_abs).square().mean().sqrt().item() / v.std().item(),
                      "affine": (v - back_aff).square().mean().sqrt().item() / v.std().item(),
                      "levels absmax": levels_abs, "bits affine": st_aff.bits_per_param,
                      "bits absmax": st_abs.bits_per_param}
print(f"{'data, 4 bits, groups of 128':<28} {'absmax RMS/std':>14} {'affine RMS/std':>14} {'levels used (absmax)':>21}")
for name, row in aff_rows.items():
    print(f"{name:<28} {row['absmax']:>14.4f} {row['affine']:>14.4f} {row['levels absmax']:>21}")
print(f"bits per weight: absmax {aff_rows['skewed: Exp(1)']['bits absmax']:.4f}, affine "
      f"{aff_rows['skewed: Exp(1)']['bits affine']:.4f} (scale and zero point per group)")

fig, ax = plt.subplots(1, 2, figsize=(9, 2.8), sharey=True)
for a_, (name, row) in zip(ax, aff_rows.items()):
    a_.bar(["absmax", "affine"], [row["absmax"], row["affine"]], color=["C0", "C1"])
    a_.set_title(name); a_.set_ylabel("RMS error / std")

# %% [markdown]
# On the skewed data absmax uses only the 8 non-negative levels (0 … 7/7) and affine's error is less than
# half of absmax's; on symmetric data affine is only a little better (its 16 levels against absmax's 15, and
# a grid fitted to each group's [min, max]), by less than a quarter.
# The price is a zero point per group: 4.3125 bits per weight against absmax's 4.25 at groups of 128.

# %%
sk, sy = aff_rows["skewed: Exp(1)"], aff_rows["symmetric: N(0, 1)"]
assert sk["levels absmax"] <= 8, f"claim broke: absmax on positive data uses at most 8 levels ({sk['levels absmax']})"
assert sk["affine"] < 0.5 * sk["absmax"], "claim broke: affine's error is under half of absmax's on skewed data"
assert 0.75 < sy["affine"] / sy["absmax"] <= 1, "claim broke: on symmetric data affine is only a little better"
assert sk["bits affine"] == 4.3125 and sk["bits absmax"] == 4.25, "claim broke: 4.3125 vs 4.25 bits per weight"

# %% [markdown]
# ## 6 · Dequantizing to bf16
#
# The cells above dequantize to fp32 on the CPU. QLoRA computes in bf16: the NF4 weight is dequantized straight
# to bf16 (`dequantize_nf4(state, torch.bfloat16)`), which adds bf16's rounding (a relative 2⁻⁸ at most per
# value: 8 significant bits) on top of the 4-bit quantization error — at least 20 times smaller than it, so it changes the total
# error by under 1 %:

# %%
st_bf = quantize_nf4(W_big)
deq32, deq16 = dequantize_nf4(st_bf), dequantize_nf4(st_bf, torch.bfloat16)
rounding = ((deq16.float() - deq32).abs() / deq32.abs().clamp(min=1e-30)).max().item()
err32 = (W_big - deq32).square().mean().sqrt().item()
err16 = (W_big - deq16.float()).square().mean().sqrt().item()
bf_part = (deq16.float() - deq32).square().mean().sqrt().item()
print(f"dtype {deq16.dtype}; largest relative bf16 rounding {rounding:.2e} (2^-8 = {2 ** -8:.2e})")
print(f"RMS error vs the original: fp32 dequantize {err32:.3e}, bf16 dequantize {err16:.3e}; "
      f"bf16 rounding alone {bf_part:.3e}")
assert rounding <= 2 ** -8, "claim broke: bf16 rounding is at most 2^-8 relative"
assert bf_part * 20 < err32, "claim broke: bf16 rounding is at least 20× smaller than the 4-bit error"
assert abs(err16 / err32 - 1) < 0.01, "claim broke: bf16 changes the total error by under 1 %"

# %% [markdown]
# ## Exercises
#
# Fill in each `answer_…` (they start as `None`) and run the check cell: it says "fill in …" while an answer is
# `None` and stops with an assertion when a filled-in answer is wrong.
#
# 1. With the lecture's absmax 10.2, which int8 code does 3.0 get?
# 2. Bits per weight of NF4 in blocks of 64 with one fp32 absmax per block (no double quantization)?
# 3. How many of NF4's 16 values are negative?
# 4. Bytes of the lecture's 5×5 example in int8 blocks of 5 with fp32 constants, *without* double quantization?
# 5. Int8 absmax with absmax = 2.54: the largest possible rounding error?
# 6. *Code it:* write int8 absmax quantization of a 1-D tensor in `my_absmax_int8` (return the int8 codes and the
#    absmax). The check compares it with `minilora.quant.quantize_int8` once it returns something.
# 7. *Code it:* write bitsandbytes' NF4 table in `my_nf4_table` (16 sorted values in [−1, 1], from
#    `torch.special.ndtri` and δ = ½(1/32 + 1/30)), without looking at the cell above. Checked against `nf4_code()`.

# %%
answer_1 = None  # int8 code of 3.0 when absmax = 10.2
answer_2 = None  # bits per weight, NF4, blocks of 64, fp32 absmax
answer_3 = None  # negative NF4 values
answer_4 = None  # bytes, 5×5 in int8 blocks of 5 + fp32 constants
answer_5 = None  # largest rounding error for absmax 2.54


def my_absmax_int8(x: torch.Tensor):
    """Exercise 6: return (codes as torch.int8, absmax) for a 1-D tensor x (replace the `return None`)."""
    return None


def my_nf4_table() -> torch.Tensor | None:
    """Exercise 7: return the 16 NF4 values, sorted (replace the `return None`)."""
    return None


# %%
def check(name, answer, expected, tol=0.0):
    """'fill in' while the answer is None; an AssertionError (without the solution) when it is wrong."""
    if answer is None:
        print(f"fill in {name}")
        return
    assert abs(float(answer) - float(expected)) <= tol, f"{name} = {answer} is not right yet; try again"
    print(f"{name}: right")


_q, _ = quantize_int8(torch.tensor([3.0, 10.2]))
check("answer_1", answer_1, _q[0].item())
check("answer_2", answer_2, quantize_nf4(torch.randn(64, 64), double_quant=False).bits_per_param, tol=1e-6)
check("answer_3", answer_3, int((nf4_code() < 0).sum()))
_q5, _a5 = quantize_int8(W5, 5)
check("answer_4", answer_4, _q5.numel() * _q5.element_size() + _a5.numel() * _a5.element_size())
check("answer_5", answer_5, 2.54 / 254, tol=1e-6)

_x6 = torch.randn(1000, generator=torch.Generator().manual_seed(6)) * 3
_mine = my_absmax_int8(_x6)
if _mine is None:
    print("fill in my_absmax_int8")
else:
    _q6, _a6 = quantize_int8(_x6)
    assert _mine[0].dtype == torch.int8 and torch.equal(_mine[0], _q6.to(torch.int8)), "my_absmax_int8: codes differ; try again"
    assert abs(float(_mine[1]) - _a6.item()) < 1e-6, "my_absmax_int8: absmax differs; try again"
    print("my_absmax_int8: right")
_t7 = my_nf4_table()
if _t7 is None:
    print("fill in my_nf4_table")
else:
    assert torch.allclose(torch.as_tensor(_t7).double(), nf4_code().double(), atol=1e-6), "my_nf4_table: not NF4 yet; try again"
    print("my_nf4_table: right")
