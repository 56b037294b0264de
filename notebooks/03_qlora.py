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
# # 3 · QLoRA: a frozen NF4 weight plus LoRA adapters
#
# QLoRA stores the frozen base weight W in NF4 with double quantization and trains LoRA adapters next to it:
#
#     Y = X · doubleDequant(c1, c2, W_nf4)ᵀ + (α/r) · X · Aᵀ · Bᵀ
#
# This notebook opens the layer up: what it stores, what its forward and backward compute, which tensors
# autograd keeps and which it recomputes, why the computation runs in bf16 rather than fp16, and the Triton
# kernel that fuses dequantization into the matmul. The kernel runs here on the CPU under Triton's interpreter.
# Nothing has to be set for that: `minilora.kernels` imports a second copy of its kernel modules with the
# interpreter switched on and uses it for CPU tensors, while CUDA tensors get the compiled kernels
# (`kernels/_runtime.py`), so the import order does not matter.
#
# Every sentence that states a number, an ordering or a comparison is followed by a cell that asserts it.

# %%
import inspect
import math
import os

import torch
import torch.nn as nn

from minilora import GPT, GPTConfig, add_lora, count_parameters, measure_saved_activations
from minilora.qlora import NF4Linear, QLoRALinear, quantize_model
from minilora.quant import dequantize_nf4, quantize_nf4
from minilora.kernels import configs  # plain Python: the tile plans need no Triton

try:  # Triton publishes wheels for Linux only; without it the cells that run the kernels say what they would show
    import triton  # noqa: F401
    import minilora.kernels as K
except ImportError as e:
    K = None
    print(f"Triton is not installed here ({e}): the kernels will not run in this notebook")

torch.manual_seed(0)
print("TRITON_INTERPRET in this kernel's environment:", os.environ.get("TRITON_INTERPRET", "not set"))

# %% [markdown]
# ## What the layer stores
#
# Take an ordinary linear layer (512 → 1024) and turn it into a QLoRA layer of rank 8. The weight becomes packed
# 4-bit codes plus the double-quantized block constants; A and B are the only parameters that train. On a GPU the
# compute dtype would be BF16; on this CPU we use FP32 so that every comparison below is exact to rounding.

# %%
dense = nn.Linear(512, 1024)
layer = QLoRALinear.from_linear(dense, r=8, alpha=16, compute_dtype=torch.float32)
print(layer)
state = layer.base_layer.quant_state()
n = dense.weight.numel()
print(f"\nweight as fp32: {4 * n:>9,} bytes\nweight as bf16: {2 * n:>9,} bytes")
print(f"weight as NF4 : {layer.base_layer.quantized_nbytes:>9,} bytes ({state.bits_per_param:.3f} bits per weight)")
for name in ("packed", "absmax", "nested_absmax", "offset"):
    t = getattr(layer.base_layer, name)
    print(f"    {name:<14} {str(t.dtype).removeprefix('torch.'):<8} {tuple(t.shape)}")
pc = count_parameters(layer)
print(pc)
assert layer.base_layer.quantized_nbytes < 0.27 * 2 * n, "claim broke: NF4 takes about a quarter of bf16's bytes"

# %% [markdown]
# ## Forward and backward
#
# The forward is the formula above. In backward only A and B receive gradients (the NF4 weight is a buffer,
# not a parameter), and the input gradient needs W again: dX = dY · W. Checked against the same computation
# written out with a dense copy of the dequantized weight (equal to fp32 rounding, 1e-4). The 4-bit
# quantization error of the output against the original fp32 layer is printed too; how large it is, and why,
# is the next cell's question.

# %%
with torch.no_grad():
    layer.lora_B.normal_(std=0.02)  # as if it had trained a little: B = 0 would hide the adapter terms
x = torch.randn(6, 512, requires_grad=True)
y = layer(x)
dy = torch.randn_like(y)
y.backward(dy)

W = dequantize_nf4(state).float()          # the dense weight, only for the check
A, B, s = layer.lora_A.detach().requires_grad_(), layer.lora_B.detach().requires_grad_(), layer.scaling
x_ref = x.detach().requires_grad_()
y_ref = x_ref @ W.T + dense.bias.detach() + s * (x_ref @ A.T) @ B.T
y_ref.backward(dy)
print("max |Y − reference|        :", (y - y_ref).abs().max().item())
print("max |dX − reference|       :", (x.grad - x_ref.grad).abs().max().item())
print("max |dA − reference|       :", (layer.lora_A.grad - A.grad).abs().max().item())
print("max |dB − reference|       :", (layer.lora_B.grad - B.grad).abs().max().item())
print("quantization error of Y vs the original fp32 layer:",
      f"{((layer.base_layer(x) - dense(x)).norm() / dense(x).norm()).item():.3%} (relative)")
print("tensors that got a gradient:", [n for n, p in layer.named_parameters() if p.grad is not None])
for what, a, b in (("Y", y, y_ref), ("dX", x.grad, x_ref.grad), ("dA", layer.lora_A.grad, A.grad),
                   ("dB", layer.lora_B.grad, B.grad)):
    assert (a - b).abs().max() < 1e-4, f"claim broke: {what} equals the dense reference"
assert [n for n, p in layer.named_parameters() if p.grad is not None] == ["lora_A", "lora_B"], \
    "claim broke: only A and B receive gradients"
q_err = ((layer.base_layer(x) - dense(x)).norm() / dense(x).norm()).item()

# %% [markdown]
# That error, between 5 and 15 %, is what 4 bits in blocks of 64 cost, not a sign that the weights are the wrong
# shape. A fresh `nn.Linear`'s weights are uniform, not the normal distribution NF4 is built for; but a layer
# whose weights are drawn from a normal distribution with the same standard deviation loses about as much —
# 5 to 15 % as well, within a quarter of the uniform layer's error, over five draws of the weights and inputs.
# Sixteen levels are coarse whatever the distribution; NF4 places them well for normal weights, it does not
# make 4 bits fine.

# %%
def nf4_output_error(weight_init, seed: int) -> float:
    """Relative error of Y = X·Wᵀ + b when W is stored in NF4 (blocks of 64, double quantization)."""
    torch.manual_seed(seed)
    lin = nn.Linear(512, 1024)
    weight_init(lin.weight)
    xs = torch.randn(64, 512)
    quant = QLoRALinear.from_linear(lin, r=8, alpha=16, compute_dtype=torch.float32).base_layer
    with torch.no_grad():
        return ((quant(xs) - lin(xs)).norm() / lin(xs).norm()).item()


std_uniform = 1 / math.sqrt(3 * 512)                  # nn.Linear's init: U(±1/√in), std 1/√(3·in)
errs = {"uniform (nn.Linear)": [nf4_output_error(lambda w: None, s) for s in range(5)],
        "normal, same std": [nf4_output_error(lambda w: nn.init.normal_(w, std=std_uniform), s) for s in range(5)]}
for name, v in errs.items():
    print(f"{name:<20} NF4 output error over 5 seeds: " + ", ".join(f"{e:.2%}" for e in v))
assert all(0.05 < e < 0.15 for v in errs.values() for e in v), f"claim broke: 5 to 15 % for both ({errs})"
ratios = [n / u for u, n in zip(*errs.values())]
assert all(0.75 < q < 1.25 for q in ratios), f"claim broke: normal weights lose about as much ({ratios})"

# %% [markdown]
# ## What autograd keeps, and what it recomputes
#
# A straightforward implementation would dequantize W and call `x @ W.T`. Autograd then keeps the dense W until
# backward (it needs it for dX) — a full 16- or 32-bit copy of every layer's weight, alive for the whole forward
# pass, which defeats the point of storing it in 4 bits. minilora's QLoRA function saves only what is small and
# dequantizes W a second time in backward. List every tensor saved for backward in both cases:

# %%
def saved_for_backward(fn):
    """(shape, dtype, bytes, is-a-stored-buffer) of each tensor autograd saves while fn() runs."""
    stored = {t.untyped_storage().data_ptr() for t in [*layer.buffers(), *layer.parameters()]}
    seen = []

    def pack(t):
        seen.append((tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numel() * t.element_size(),
                     t.untyped_storage().data_ptr() in stored))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().sum().backward()
    return seen


def naive(x):
    W = dequantize_nf4(layer.base_layer.quant_state()).float()  # dense copy, made under autograd's eyes
    return x @ W.T + layer.base_layer.bias + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T


x = torch.randn(6, 512, requires_grad=True)
saved = {}
for title, fn in (("dequantize, then x @ W.T", lambda: naive(x)), ("minilora QLoRALinear", lambda: layer(x))):
    rows = saved_for_backward(fn)
    saved[title] = rows
    new = sum(b for *_, b, old in rows if not old)
    print(f"{title}: {new:,} new bytes saved")
    for shape, dtype, nbytes, old in rows:
        print(f"    {str(shape):<14} {dtype:<8} {nbytes:>9,} bytes{'  (already stored: the layer itself)' if old else ''}")

# %% [markdown]
# The naive version keeps a dense fp32 copy of W (1024 × 512, as its transpose, 2 MiB) for backward; minilora's keeps no new
# tensor of W's size — only the input, the small x·Aᵀ and the layer's own stored tensors — and saves at least
# 2 MiB less:

# %%
W_shape, W_bytes = (1024, 512), 4 * 1024 * 512
naive_rows, ours_rows = saved["dequantize, then x @ W.T"], saved["minilora QLoRALinear"]
assert any(math.prod(sh) == math.prod(W_shape) and dt == "float32" and not old for sh, dt, _, old in naive_rows), \
    "claim broke: the naive version keeps a dense fp32 W (or its transpose)"
assert not any(math.prod(sh) >= 1024 * 512 and not old for sh, _, _, old in ours_rows), \
    "claim broke: minilora keeps no new tensor of W's size"
new_naive = sum(b for *_, b, old in naive_rows if not old)
new_ours = sum(b for *_, b, old in ours_rows if not old)
assert new_naive - new_ours >= W_bytes, f"claim broke: minilora saves at least a dense W less ({new_naive - new_ours:,})"

# %% [markdown]
# The same on a whole GPT: quantize every linear layer of the blocks, add adapters, and compare with LoRA on the
# fp32 model. The stored weights shrink; the bytes autograd holds for backward (measured over one training step,
# the model's own tensors left out) stay those of LoRA — no dense copy of any weight appears among them.

# %%
config = GPTConfig(block_size=64, vocab_size=256, n_layer=4, n_head=4, n_embd=128)
idx = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))

torch.manual_seed(0)
lora_gpt = add_lora(GPT(config), ["c_attn", "c_proj", "c_fc"], r=8)
torch.manual_seed(0)
qlora_gpt = add_lora(quantize_model(GPT(config), compute_dtype=torch.float32), ["c_attn", "c_proj", "c_fc"], r=8)

stats = {}
for name, model in (("LoRA, fp32 base", lora_gpt), ("QLoRA, NF4 base", qlora_gpt)):
    peak = measure_saved_activations(lambda: model(idx, idx)[1].backward(), exclude=model).peak
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    stats[name] = (weights, peak)
    print(f"{name}: weights and buffers {weights:>10,} bytes, saved activations peak {peak:>10,} bytes")
(w_l, a_l), (w_q, a_q) = stats.values()
print(f"weights {w_l / w_q:.2f}× smaller (embeddings and norms stay fp32); saved activations: "
      f"{'identical' if a_l == a_q else f'{a_q / a_l:.3f}×'}")
print(count_parameters(qlora_gpt))
assert w_q < w_l / 2, "claim broke: the stored weights shrink (more than 2× here)"
assert abs(a_q / a_l - 1) < 0.01, f"claim broke: QLoRA saves the same activations as LoRA ({a_q / a_l:.3f}×)"

# %% [markdown]
# ## bf16, not fp16: why QLoRA computes in bfloat16
#
# (The study notes call bf16 "32-bit" and say 32-bit is what GPUs run fastest: *slide errata*, notebook 7 §9 and
# §17. On QLoRA's quality against LoRA — the overview deck's "degrades performance" — see notebook 7 §15.)
#
# Both are 16-bit floats. fp16 spends 5 bits on the exponent and 10 on the mantissa; bf16 spends 8 on the
# exponent — as many as fp32 — and 7 on the mantissa. So bf16 has fp32's range (up to about 3.4·10³⁸) with
# less precision (unit roundoff 2⁻⁸ against fp16's 2⁻¹¹), and fp16 has more precision in a narrow range: its
# largest number is 65,504, and its smallest positive number is the subnormal 2⁻²⁴ ≈ 5.96·10⁻⁸. Rounding to
# nearest sends a value to 0 only at or below half of that, 2⁻²⁵ ≈ 2.98·10⁻⁸; values between 2.98·10⁻⁸ and
# 5.96·10⁻⁸ round up to 5.96·10⁻⁸.

# %%
print(f"{'dtype':<9} {'bits':>4} {'largest':>12} {'smallest normal':>16} {'eps (1 to next)':>16}")
for dt in (torch.float32, torch.float16, torch.bfloat16):
    fi = torch.finfo(dt)
    print(f"{str(dt).removeprefix('torch.'):<9} {fi.bits:>4} {fi.max:>12.4g} {fi.tiny:>16.4g} {fi.eps:>16.4g}")
# (the format constants themselves, finfo's bits, max and eps, are checked in tests/test_lecture_facts.py)
near_zero = torch.tensor([2.0e-8, 2 ** -25, 3.0e-8, 4.5e-8, 2 ** -24, 7.0e-8], dtype=torch.float64)
print("near fp16's smallest subnormal:", [f"{v:.3g} -> {w:.3g}" for v, w in zip(near_zero.tolist(),
                                                                               near_zero.half().double().tolist())])
assert near_zero.half().double().tolist()[:5] == [0.0, 0.0, 2 ** -24, 2 ** -24, 2 ** -24], \
    "claim broke: 0 at or below 2^-25 ≈ 2.98e-8, 2^-24 ≈ 5.96e-8 between it and 5.96e-8"

big = torch.tensor([65504.0, 65519.0, 65520.0, 70000.0, 1e6])
tiny = torch.tensor([1e-4, 1e-6, 1e-8, 1e-20])
print("large values as fp16:", big.half().tolist())
print("large values as bf16:", big.bfloat16().float().tolist())
print("small values as fp16:", tiny.half().float().tolist())
print("small values as bf16:", tiny.bfloat16().float().tolist())
print("1 + 2^-8 as fp16 / bf16:", torch.tensor(1 + 2 ** -8).half().item(), "/", torch.tensor(1 + 2 ** -8).bfloat16().item())
assert big.half()[:2].tolist() == [65504.0, 65504.0] and torch.isinf(big.half()[2:]).all(), \
    "claim broke: fp16 overflows to inf from 65,520 up (65,504 is its largest number)"
assert torch.isfinite(big.bfloat16()).all(), "claim broke: bf16 holds them"
assert tiny.half()[2:].eq(0).all() and tiny.bfloat16().ne(0).all(), "claim broke: fp16 flushes 1e-8 to 0, bf16 does not"
assert torch.tensor(1 + 2 ** -8).bfloat16().item() == 1.0 != torch.tensor(1 + 2 ** -8).half().item(), \
    "claim broke: bf16 cannot tell 1 + 2^-8 from 1, fp16 can"

# %% [markdown]
# In training, the range matters more than the last bits. Two different failures:
#
# - a large **activation** overflows in fp16 (a matmul over 4,096 inputs of size 20 reaches 81,920) and the inf
#   spreads through every later layer;
# - small **gradients** underflow to 0 and their updates are lost.
#
# bf16 has neither problem, so QLoRA (Dettmers et al. 2023) computes in bf16: the lecture's "BF16 in QLoRA, FP16
# in LoRA". The precision it gives up is small next to the 4-bit weights' own error (notebook 2). First the
# overflow:

# %%
xs = torch.full((1, 4096), 20.0)
ws = torch.ones(8, 4096)
y_f16, y_b16 = xs.half() @ ws.half().T, xs.bfloat16() @ ws.bfloat16().T
print("fp16:", y_f16[0, :3].tolist(), "  bf16:", y_b16[0, :3].tolist())
assert torch.isinf(y_f16).all() and torch.isfinite(y_b16).all() and y_b16[0, 0].item() == 81920, \
    "claim broke: 81,920 overflows in fp16 and not in bf16"

# %% [markdown]
# fp16 training answers the second failure only. **Loss scaling** multiplies the loss by a factor S (say 2¹⁶)
# before backward, so every gradient is S times larger and stays above fp16's underflow; the gradients are divided
# by S again in fp32, just before the update. It cannot help the first failure: the forward pass, and its
# overflow, happened before there was a loss to scale. And a too-large S makes gradients overflow instead:
# *dynamic* loss scaling (PyTorch's `GradScaler`) then skips that step, leaves the weights as they were, and halves
# S. Three small gradients, stored in fp16 as they are and scaled by 2¹⁶:

# %%
grads = torch.tensor([1e-8, 2.5e-8, 5e-7], dtype=torch.float64)
plain = grads.half().double()
S = 2.0 ** 16
scaled = (grads * S).half().double() / S
print("fp16 as is  :", [f"{v:.3g}" for v in plain.tolist()])
print("scaled by S :", [f"{v:.3g}" for v in scaled.tolist()])
assert plain[0] == 0 and plain[1] == 0, "claim broke: gradients of 1e-8 and 2.5e-8 underflow to 0 in fp16"
assert ((scaled - grads).abs() / grads).max() < 1e-3, "claim broke: scaled by 2^16 they survive (to fp16 precision)"

# dynamic loss scaling: a step whose scaled gradients overflow is skipped, and S is halved
w_ls = nn.Parameter(torch.ones(3))
opt_ls = torch.optim.SGD([w_ls], lr=0.1)
scaler = torch.amp.GradScaler("cpu", init_scale=S)
for factor in (1e35, 1.0):               # the first loss's gradients, times S, exceed fp32's range
    opt_ls.zero_grad()
    scaler.scale((w_ls * factor).sum()).backward()
    before = w_ls.detach().clone()
    scaler.step(opt_ls)
    scaler.update()
    print(f"gradient {factor:g}·S: weights changed {not torch.equal(before, w_ls.detach())}, S now {scaler.get_scale():g}")
    if factor > 1:
        assert torch.equal(before, w_ls.detach()) and scaler.get_scale() == S / 2, \
            "claim broke: an overflowing step is skipped and S halved"
    else:
        assert not torch.equal(before, w_ls.detach()), "claim broke: the next step with finite gradients is taken"

# %% [markdown]
# ### The QLoRA layer in bf16
#
# The cells above computed in fp32, so that every comparison was exact to rounding. The layer as QLoRA runs it
# computes in bf16: dequantize W to bf16, adapters in bf16, bf16 matmuls. On this CPU the same layer with
# `compute_dtype=torch.bfloat16` gives outputs and adapter gradients in bf16, within bf16 rounding (under 2 %)
# of the fp32 layer's — the quantization error of the weight itself (above) is larger:

# %%
layer_bf16 = QLoRALinear.from_linear(dense, r=8, alpha=16, compute_dtype=torch.bfloat16)
with torch.no_grad():
    layer_bf16.lora_A.copy_(layer.lora_A)
    layer_bf16.lora_B.copy_(layer.lora_B)
xb = torch.randn(6, 512)
y32 = layer(xb)
yb = layer_bf16(xb.bfloat16())
yb.float().sum().backward()
rel_bf16 = ((yb.float() - y32).norm() / y32.norm()).item()
print(f"output dtype {yb.dtype}, adapter gradient dtype {layer_bf16.lora_A.grad.dtype}; "
      f"relative difference to the fp32 layer {rel_bf16:.3%}")
assert rel_bf16 < 0.02 and rel_bf16 < q_err, "claim broke: bf16 rounding is under 2 % and below the 4-bit error"

# %% [markdown]
# ## The fused kernel
#
# Dequantize-then-matmul reads the 4-bit weight, writes a 16-bit copy, and reads that copy back: about
# 0.52 + 2 + 2 bytes of memory traffic per weight. `minilora.kernels.nf4_matmul` instead loads packed codes and
# block constants tile by tile, turns them into numbers in registers, and multiplies right away; the 16-bit
# weight never exists in memory. For small batches (decoding) the matmul is limited by memory traffic, so the
# bytes per weight bound the speed-up. From the byte count of a real QuantState:

# %%
W_big = torch.randn(4096, 4096) * 0.02
st_big = quantize_nf4(W_big)
nf4_bytes = st_big.nbytes / W_big.numel()
print(f"NF4 + double quant: {nf4_bytes:.3f} bytes per weight read")
print(f"bf16              : 2.000 bytes per weight read")
print(f"dequantize, write bf16, read it back: {nf4_bytes + 2 + 2:.3f} bytes per weight")
print(f"best possible speed-up of a memory-bound GEMV over bf16: {2 / nf4_bytes:.2f}×")
assert abs(nf4_bytes - 0.516) < 0.001, f"claim broke: about 0.52 bytes per weight ({nf4_bytes:.4f})"
assert 3.8 < 2 / nf4_bytes < 3.9, "claim broke: at most ~3.9× over bf16"

# %% [markdown]
# That is a bound, not a measurement. The kernels' own measurement on an H100 (bf16, recorded in
# `kernels/__init__.py`, not computed here: it needs a GPU) is 0.92–1.03× the speed of a bf16 matmul at
# M = 1 and 16 — about as fast as bf16 and faster than dequantize-then-matmul, but far from 3.9×; for
# training-size M (≥ 512) the fused kernel is slower than dequantize-then-matmul.

# %% [markdown]
# The heart of the kernel is the tile loader, which does the double dequantization in registers
# (first the 8-bit block constant, then the 4-bit code):

# %%
import ast
import importlib.util

tile_file = importlib.util.find_spec("minilora.kernels.nf4_tile").origin  # read as text: shown without Triton too
tile_source = open(tile_file, encoding="utf-8").read()
print(next(ast.get_source_segment(tile_source, f) for f in ast.parse(tile_source).body
           if isinstance(f, ast.FunctionDef) and f.name == "nf4_tile"))  # the source of the @triton.jit function

# %% [markdown]
# ### Which kernel runs for which shape
#
# The kernel is chosen by the number of rows M, deterministically (`kernels/configs.py`, no autotuning). There
# is no separate GEMV kernel: for M ≤ 64 (decoding, small batches) the forward uses narrow tiles (BLOCK_M = 16,
# 32 or 64) and splits the K reduction across programs to fill the GPU; above 64 rows it uses 128 × 128 tiles
# without a split. (A GEMV without tensor cores measured slower than the split-K tile kernel even at M = 1.)
# The plans a GPU with 132 SMs would get, for a bf16 4096 × 4096 weight:

# %%
print(f"{'M':>5} {'kernel':>7} {'BLOCK_M × BLOCK_N':>18} {'split-K':>8} {'warps':>6}")
plans = {}
for M in (1, 4, 16, 64, 65, 512):
    p = configs.plan_matmul(M, 4096, 4096, blocksize=64, dtype=torch.bfloat16, double_quant=True, has_bias=False,
                            has_lora=False, num_sms=132, interpreted=False)
    plans[M] = p
    print(f"{M:>5} {p.kernel:>7} {p.constexprs['BLOCK_M']:>8} × {p.constexprs['BLOCK_N']:<7} {p.split:>8} {p.num_warps:>6}")
assert all(p.kernel == "matmul" for p in plans.values()), "claim broke: one tile kernel for every M, no GEMV"
assert all(plans[M].constexprs["BLOCK_M"] <= 64 and plans[M].split > 1 for M in (1, 4, 16, 64)), \
    "claim broke: M <= 64 uses narrow tiles and split-K"
assert all((plans[M].constexprs["BLOCK_M"], plans[M].constexprs["BLOCK_N"], plans[M].split) == (128, 128, 1)
           for M in (65, 512)), "claim broke: M > 64 uses 128 × 128 tiles without a split"

# %% [markdown]
# Running the kernels on a small shape under the interpreter (slow, but the same program a GPU would run), for
# M = 2 and M = 8, both on the split-K path. Every result is compared with the PyTorch reference (the
# dequantize kernel bit for bit, the matmuls to fp32 rounding, 1e-4), including the fused LoRA epilogue and the
# backward kernel for dX.

# %%
if K is None:
    print("Without Triton this cell would run the dequantize kernel (bit-identical to the reference), the matmul\n"
          "kernel at M = 2 and 8, the fused LoRA epilogue and the dX kernel under Triton's interpreter, each\n"
          "within 1e-4 of the PyTorch reference (tests/test_kernels_nf4.py checks the same where Triton runs).")
else:
    torch.manual_seed(0)
    W_s = torch.randn(96, 200) * 0.02   # N = 96 outputs, K = 200 inputs: not a multiple of the block size
    st_s = quantize_nf4(W_s)
    W_deq = dequantize_nf4(st_s)
    deq_equal = torch.equal(K.nf4_dequantize_state(st_s), W_deq)
    print("dequantize kernel bit-identical to the reference:", deq_equal)
    assert deq_equal, "claim broke: the dequantize kernel is bit-identical to the reference"
    for M in (2, 8):
        x_s = torch.randn(M, 200)
        y_k = K.nf4_matmul_state(x_s, st_s)
        gap = (y_k - x_s @ W_deq.T).abs().max().item()
        print(f"M = {M}: max |kernel − X·deq(W)ᵀ| = {gap:.2e}")
        assert gap < 1e-4, f"claim broke: the matmul kernel matches the reference at M = {M}"
    A_s, B_s = torch.randn(4, 200) * 0.1, torch.randn(96, 4) * 0.1
    x_s = torch.randn(8, 200)
    y_k = K.nf4_matmul_state(x_s, st_s, lora_xa=x_s @ A_s.T, lora_B=B_s, lora_scaling=2.0)
    y_r = x_s @ W_deq.T + 2.0 * (x_s @ A_s.T) @ B_s.T
    gap_lora = (y_k - y_r).abs().max().item()
    print(f"with the LoRA term fused: max |kernel − reference| = {gap_lora:.2e}")
    dy_s = torch.randn(8, 96)
    gap_dx = (K.nf4_matmul_dx_state(dy_s, st_s) - dy_s @ W_deq).abs().max().item()
    print(f"backward dX = dY·W: max |kernel − reference| = {gap_dx:.2e}")
    assert gap_lora < 1e-4 and gap_dx < 1e-4, "claim broke: the fused LoRA epilogue and the dX kernel match the reference"
    print("compiled kernels usable on this machine:", K.kernels_available())

# %% [markdown]
# ## Exercises
#
# Fill in each `answer_…` (they start as `None`) and run the check cell: it says "fill in …" while an answer is
# `None` and stops with an assertion when a filled-in answer is wrong.
#
# 1. How many bytes does the 4096 × 4096 weight above take in NF4 with double quantization (packed codes, one
#    byte per block of 64, one fp32 per 256 blocks, and a 4-byte offset)?
# 2. The largest finite fp16 number?
# 3. True or False: 1e-8 stored as bf16 is still non-zero.
# 4. How many parameters train in `QLoRALinear.from_linear(nn.Linear(512, 1024), r=8)`?
# 5. For M = 20 rows in bf16, which BLOCK_M does the planner pick?
# 6. *Code it:* write the QLoRA layer's forward pass, Y = X·doubleDequant(W)ᵀ + b + (α/r)·X·Aᵀ·Bᵀ, in
#    `my_qlora_forward` below, using `dequantize_nf4(state)` for the double dequantization. The check compares
#    it with minilora's `QLoRALinear` on random inputs once your function returns something.

# %%
answer_1 = None  # bytes of a 4096 × 4096 NF4 weight with double quantization
answer_2 = None  # largest finite fp16 number
answer_3 = None  # True or False
answer_4 = None  # trainable parameters
answer_5 = None  # BLOCK_M for M = 20


def my_qlora_forward(x, state, bias, lora_A, lora_B, scaling):
    """Exercise 6: return Y for the input rows x (replace the `return None`)."""
    return None


# %%
def check(name, answer, expected, tol=0.0):
    """'fill in' while the answer is None; an AssertionError (without the solution) when it is wrong."""
    if answer is None:
        print(f"fill in {name}")
        return
    if isinstance(expected, bool):
        assert answer is expected, f"{name} = {answer} is not right yet; try again"
    else:
        assert abs(float(answer) - float(expected)) <= tol, f"{name} = {answer} is not right yet; try again"
    print(f"{name}: right")


check("answer_1", answer_1, st_big.nbytes)
check("answer_2", answer_2, torch.finfo(torch.float16).max)
check("answer_3", answer_3, bool(torch.tensor(1e-8).bfloat16().item() != 0))
check("answer_4", answer_4, count_parameters(QLoRALinear.from_linear(nn.Linear(512, 1024), r=8)).trainable)
check("answer_5", answer_5, configs.plan_matmul(20, 4096, 4096, blocksize=64, dtype=torch.bfloat16, double_quant=True,
                                                has_bias=False, has_lora=False, num_sms=132,
                                                interpreted=False).constexprs["BLOCK_M"])

_ql = QLoRALinear.from_linear(nn.Linear(96, 40), r=4, alpha=8, compute_dtype=torch.float32)
with torch.no_grad():
    _ql.lora_B.normal_(std=0.1)
_x6 = torch.randn(5, 96)
_y6 = my_qlora_forward(_x6, _ql.base_layer.quant_state(), _ql.base_layer.bias, _ql.lora_A.detach(),
                       _ql.lora_B.detach(), _ql.scaling)
if _y6 is None:
    print("fill in my_qlora_forward")
else:
    assert torch.allclose(_y6, _ql(_x6), atol=1e-4), "my_qlora_forward is not QLoRALinear's forward yet; try again"
    print("my_qlora_forward: right")
