"""minilora.kernels: Triton kernels for NF4 weights (dequantize, fused dequant-matmul, dX).

The QLoRA forward pass, Y = X · doubleDequant(c1, c2, W_nf4)ᵀ + scaling · X·Aᵀ·Bᵀ, read the
weight as packed 4-bit codes: 0.5 byte per weight plus the double-quantized block constants,
instead of 2 bytes for a bf16 copy (plus another 2 + 2 to write and re-read one).

Layout of an NF4 weight W (N out_features × K in_features), the fields of a QuantState:
    packed         uint8 ((N·K + 1) // 2,)  flat row-major W, first element in the high nibble
    code           fp32 (16,)               the NF4 table
    absmax         uint8 (num_blocks,)      double quant: indices into nested_code
                   or fp32 (num_blocks,)    no double quant: the block scales themselves
    nested_code    fp32 (256,)              (double quant only)
    nested_absmax  fp32 (ceil(num_blocks / 256),)
    offset         fp32 scalar
    blocksize      power of two, 32..4096 (64 by default); block of element j = j // blocksize
    absmax_fp32[i] = nested_code[absmax[i]] · nested_absmax[i // 256] + offset
    W[j]           = code[nibble_j] · absmax_fp32[j // blocksize]

API (all take keyword arguments blocksize=64, nested_absmax=None, nested_code=None, offset=None):
    nf4_dequantize(packed, absmax, code, *, shape, dtype)            -> W (shape), bit-identical
                                                                        to the PyTorch reference
    nf4_matmul(x, packed, absmax, code, *, N, K, bias=None,
               lora_xa=None, lora_B=None, lora_scaling=1.0)          -> Y = X·Wᵀ (+ bias)
                                                                        (+ scaling·XA·Bᵀ), (..., N)
    nf4_matmul_dx(dy, packed, absmax, code, *, N, K)                 -> dX = dY·W, (..., K)
    nf4_dequantize_state(state, dtype=None), nf4_matmul_state(x, state, **epilogue),
    nf4_matmul_dx_state(dy, state)                                   the same, for any object
                                                                        with the fields above
    kernels_available(device)                                        can the compiled kernels
                                                                        run there?

Tensors on a CUDA device run compiled kernels (bf16/fp16 operands multiply on the tensor cores
with fp32 accumulation; fp32 operands as three TF32 products, "tf32x3", or one when torch
allows TF32). CPU tensors run the same kernels under the Triton interpreter (slow; for tests
and lectures; needs a Triton whose interpreter works with the installed NumPy, see
_runtime.interpreter_works). Tile sizes are chosen by M, deterministically (configs.py): a
split-K tile path for M <= 64 (decoding) and 128 × 128 tiles above (training). Any K works:
odd K, and K not a multiple of the blocksize, take a slower per-element path.

Measured on an H100 (benchmarks/kernel_speed.py, bf16, CUDA-graph replays, cold L2; speed
relative to a bf16 torch.matmul): for M = 1 and 16 the fused forward runs at 0.92-1.03x
(dX 0.69-0.92x), i.e. about as fast as bf16 and 1.6-2.2x faster than dequantize-then-matmul,
but far from the 3.9x that 0.52 bytes per weight would allow. For M >= 512 it runs at
0.23-0.43x, 1.5-2.5x SLOWER than dequantize-then-matmul (each W tile is dequantized again
for every 128-row block of X). So for training-size M, nf4_dequantize + torch.matmul is the
faster choice today.

QLoRALinear uses them on CUDA (minilora/nf4_linear.py): for M <= FUSED_MAX_M (64) rows its
autograd function calls nf4_matmul in forward (with lora_xa = X·lora_Aᵀ and lora_B, so the adapter
is fused into the same launch) and nf4_matmul_dx in backward; above that it dequantizes with
nf4_dequantize and multiplies with torch.matmul. The adapter gradients stay in PyTorch.
"""
if __name__ != "minilora.kernels":      # the repository root is on sys.path and something ran `import kernels`
    raise ImportError("the folder kernels/ is the package minilora.kernels, but it was imported as a top-level "
                      "`kernels` (another published package of that name, which transformers probes for). "
                      "The repository root is on sys.path: run from another directory, or set "
                      "PYTHONSAFEPATH=1 (as the Makefile does) so `python -m ...` does not add it")

import torch as _torch

from .ops import (nf4_dequantize, nf4_dequantize_state, nf4_matmul, nf4_matmul_dx,
                  nf4_matmul_dx_state, nf4_matmul_state)


def kernels_available(device=None) -> bool:
    """True when Triton is installed and `device` (default: cuda) is a CUDA device to compile for."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    device = _torch.device("cuda") if device is None else _torch.device(device)
    return device.type == "cuda" and _torch.cuda.is_available()


__all__ = ["nf4_dequantize", "nf4_matmul", "nf4_matmul_dx", "nf4_dequantize_state",
           "nf4_matmul_state", "nf4_matmul_dx_state", "kernels_available"]
