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
               lora_xa=None, lora_B=None, lora_scaling=1.0,
               kernel="auto")                                        -> Y = X·Wᵀ (+ bias)
                                                                        (+ scaling·XA·Bᵀ), (..., N)
    nf4_matmul_dx(dy, packed, absmax, code, *, N, K, kernel="auto")  -> dX = dY·W, (..., K)
    nf4_dequantize_state(state, dtype=None), nf4_matmul_state(x, state, **epilogue),
    nf4_matmul_dx_state(dy, state, kernel="auto")                    the same, for any object
                                                                        with the fields above
    kernels_available(device)                                        can the compiled kernels
                                                                        run there?

Two kernels compute each matmul (kernel="auto" picks, "decode" / "tiles" force one):
    decode  nf4_gemv.py      M <= 16 rows and K % 8 == 0: streams W as 32-bit words of eight
                             codes, split-K over every SM, multiply-adds on the CUDA cores for
                             M <= 2 (fp32: always), one 16-row mma tile above
    tiles   nf4_matmul.py,   any shape: tl.dot on byte tiles dequantized in registers; split-K
            nf4_matmul_dx.py tiles for M <= 64, 128-wide tiles above; the readable reference
Tensors on a CUDA device run compiled kernels; CPU tensors run the same kernels under the Triton
interpreter (slow; for tests and lectures; see _runtime.interpreter_works). Tile sizes are a
pure function of the shape (configs.py); roofline.py says how fast each choice can be, aot.py
compiles them for a GPU that is not there.

QLoRALinear (minilora/nf4_linear.py) calls nf4_matmul / nf4_matmul_dx on CUDA for up to 64 rows
(decode kernels up to 16 of them) and dequantize-then-matmul above.

Note: a memory-bound NF4 matmul moves 0.516 byte per weight against 2 for bf16, so 3.88x is
the ceiling; the decode kernels are shaped by that bound (wide word loads, scales once per
group, enough programs to keep every SM loading), the tile kernels by the tensor cores.
For training-size M both are compute-bound and dequantize-then-matmul is as good.
"""
if __name__ != "minilora.kernels":      # the repository root is on sys.path and something ran `import kernels`
    raise ImportError("the folder kernels/ is the package minilora.kernels, but it was imported as a top-level "
                      "`kernels` (another published package of that name, which transformers probes for). "
                      "The repository root is on sys.path: run from another directory, or set "
                      "PYTHONSAFEPATH=1 (as the Makefile does) so `python -m ...` does not add it")

import torch as _torch

from .ops import nf4_dequantize, nf4_matmul, nf4_matmul_dx
from .state_ops import nf4_dequantize_state, nf4_matmul_dx_state, nf4_matmul_state


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
