"""NF2, the 2-bit NormalFloat: NF4's recipe with four levels, packed four codes to a byte.

    quantize:    q_j = nearest(NF2, x_j / absmax_b)       NF2 = [-1, 0, 0.338, 1]   (codebooks.nf2_code)
                 byte_k = q_{4k}·64 + q_{4k+1}·16 + q_{4k+2}·4 + q_{4k+3}   (first element in the top two bits;
                 a count that is not a multiple of 4 is padded with the code of 0)
                 absmax double-quantized exactly as NF4's (8-bit codes in blocks of 256, an fp32 offset)
    dequantize:  w_j = NF2[q_j] · absmax'_b

Same blocks, same absmax, same double quantization as quantize_nf4 (they share blockwise.block_codes and
double.quantize_absmax); only the codebook and the packing differ. 2 + 8/64 + 32/(64·256) = 2.127 bits per
weight. LoftQ (Li et al., 2023) runs its 2-bit experiments on this format. Dequantization is plain PyTorch:
the Triton kernels read NF4 only, so a 2-bit layer runs its matmul in PyTorch.

quantize_nf / dequantize_nf pick NF4 or NF2 by `bits`: the one switch NF4Linear, add_qlora and LoftQ share.
"""
from __future__ import annotations

import math

import torch

from .blockwise import block_codes
from .codebooks import midpoints, nf2_code
from .double import quantize_absmax
from .format import FLOAT_DTYPES, check_blocksize, check_float_tensor
from .nf4 import dequantize_absmax, dequantize_nf4, quantize_nf4
from .quant_state import QuantState, check_state

BITS = (4, 2)  # the NormalFloat widths minilora stores


def pack_2bit(q: torch.Tensor) -> torch.Tensor:
    """Codes 0..3 (n,) -> uint8 (⌈n/4⌉,), four per byte, the first in the top two bits (q must be padded to 4k)."""
    q = q.view(-1, 4)
    return (q[:, 0] * 64 + q[:, 1] * 16 + q[:, 2] * 4 + q[:, 3]).to(torch.uint8)


def unpack_2bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (⌈n/4⌉,) -> codes 0..3 int64 (n,), the inverse of pack_2bit."""
    shifts = torch.tensor([6, 4, 2, 0], device=packed.device, dtype=torch.uint8)
    return ((packed[:, None] >> shifts) & 3).view(-1)[:n].long()


def quantize_nf2(x: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> QuantState:
    """W_nf2 = nearest(NF2, W_b / absmax_b) per block of `blocksize`, absmax double-quantized as in NF4.

    x: float32, float16 or bfloat16, any shape, every value finite; blocksize: power of two from 32 to 4096.
    Returns a QuantState with bits=2: packed holds ⌈numel/4⌉ bytes, code the 4 NF2 values.
    """
    check_float_tensor(x)
    check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
    code = nf2_code(x.device)
    q, absmax = block_codes(x.detach().reshape(-1), code, blocksize)
    zero = torch.bucketize(torch.zeros(1, device=x.device), midpoints(code))  # the code of 0 pads the tail
    q = torch.cat([q, zero.expand((-q.numel()) % 4)])
    state = QuantState(pack_2bit(q), absmax, code, blocksize, torch.Size(x.shape), x.dtype, bits=2)
    if double_quant:
        state.absmax, state.offset, state.nested_absmax, state.nested_code = quantize_absmax(absmax)
        state.double_quant = True
    return state


def dequantize_nf2(state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """w = NF2[q] · absmax' (absmax' with double quantization undone), in float32, then cast to the state's
    dtype (or `dtype`) and reshaped to its shape."""
    if check_state(state).bits != 2:
        raise ValueError(f"dequantize_nf2: the state holds {state.bits}-bit codes; dequantize it with dequantize_nf4")
    dtype = state.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    n = math.prod(state.shape)
    q = unpack_2bit(state.packed, n)
    scale = dequantize_absmax(state).repeat_interleave(state.blocksize)[:n]
    return (state.code.float()[q] * scale).to(dtype).view(state.shape)


def check_bits(bits, name: str = "bits") -> int:
    """bits must be 4 (NF4) or 2 (NF2)."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{name} must be 4 (NF4) or 2 (NF2), got {bits!r}")
    return bits


def quantize_nf(x: torch.Tensor, bits: int = 4, blocksize: int = 64, double_quant: bool = True) -> QuantState:
    """quantize_nf4 (bits=4) or quantize_nf2 (bits=2)."""
    quantize = quantize_nf4 if check_bits(bits) == 4 else quantize_nf2
    return quantize(x, blocksize=blocksize, double_quant=double_quant)


def dequantize_nf(state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """dequantize_nf4 or dequantize_nf2, as the state's bits say."""
    return (dequantize_nf2 if getattr(state, "bits", 4) == 2 else dequantize_nf4)(state, dtype)
