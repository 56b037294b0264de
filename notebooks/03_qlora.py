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
# autograd keeps and which it recomputes, and the Triton kernel that fuses dequantization into the matmul.
# The kernel runs here on the CPU under Triton's interpreter, which must be switched on before Triton is
# imported — hence the first cell.

# %%
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

# %%
import inspect

import torch
import torch.nn as nn

from minilora import GPT, GPTConfig, add_lora, count_parameters, measure_saved_activations
from minilora.qlora import NF4Linear, QLoRALinear, quantize_model
from minilora.quant import dequantize_nf4, quantize_nf4
import minilora.kernels as K

torch.manual_seed(0)

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
print(count_parameters(layer))

# %% [markdown]
# ## Forward and backward
#
# The forward is the formula above. In backward only A and B receive gradients (the NF4 weight is a buffer,
# not a parameter), and the input gradient needs W again: dX = dY · W. Checked against the same computation
# written out with a dense copy of the dequantized weight:

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
for title, fn in (("dequantize, then x @ W.T", lambda: naive(x)), ("minilora QLoRALinear", lambda: layer(x))):
    rows = saved_for_backward(fn)
    new = sum(b for *_, b, old in rows if not old)
    print(f"{title}: {new:,} new bytes saved")
    for shape, dtype, nbytes, old in rows:
        print(f"    {str(shape):<14} {dtype:<8} {nbytes:>9,} bytes{'  (already stored: the layer itself)' if old else ''}")

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

# %% [markdown]
# The heart of the kernel is the tile loader, which does the double dequantization in registers
# (first the 8-bit block constant, then the 4-bit code):

# %%
from minilora.kernels import nf4_tile as tile_module

print(inspect.getsource(tile_module.nf4_tile.fn))  # the Python source behind the @triton.jit function

# %% [markdown]
# Running the kernels on a small shape under the interpreter (slow, but the same program a GPU would run). The
# kernel is chosen by the number of rows M: a GEMV for M ≤ 4, tiles above. Every result is compared with the
# PyTorch reference, including the fused LoRA epilogue and the backward kernel for dX.

# %%
torch.manual_seed(0)
W_s = torch.randn(96, 200) * 0.02   # N = 96 outputs, K = 200 inputs: not a multiple of the block size
st_s = quantize_nf4(W_s)
W_deq = dequantize_nf4(st_s)
print("dequantize kernel bit-identical to the reference:", torch.equal(K.nf4_dequantize_state(st_s), W_deq))
for M in (2, 8):
    x_s = torch.randn(M, 200)
    y_k = K.nf4_matmul_state(x_s, st_s)
    print(f"M = {M}: max |kernel − X·deq(W)ᵀ| = {(y_k - x_s @ W_deq.T).abs().max().item():.2e}")
A_s, B_s = torch.randn(4, 200) * 0.1, torch.randn(96, 4) * 0.1
x_s = torch.randn(8, 200)
y_k = K.nf4_matmul_state(x_s, st_s, lora_xa=x_s @ A_s.T, lora_B=B_s, lora_scaling=2.0)
y_r = x_s @ W_deq.T + 2.0 * (x_s @ A_s.T) @ B_s.T
print(f"with the LoRA term fused: max |kernel − reference| = {(y_k - y_r).abs().max().item():.2e}")
dy_s = torch.randn(8, 96)
print(f"backward dX = dY·W: max |kernel − reference| = {(K.nf4_matmul_dx_state(dy_s, st_s) - dy_s @ W_deq).abs().max().item():.2e}")
print("compiled kernels usable on this machine:", K.kernels_available())
