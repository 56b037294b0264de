"""The entry points of 4-bit quantization: quantize_nf4 / dequantize_nf4 (any codebook: quantize_4bit / dequantize_4bit).

    quantize:    packed, absmax = blockwise 4-bit(x, code)       then, with double_quant,
                 absmax, offset, nested_absmax = double quantization(absmax)
    dequantize:  w = code[q] · absmax',  absmax' = dequantize_absmax(state)

The result is a QuantState (quant_state.py); a state built or changed by hand is checked before use.
"""
from __future__ import annotations

import torch

from .blockwise import dequantize_blockwise_4bit, quantize_blockwise_4bit
from .codebooks import nf4_code
from .double import dequantize_absmax_8bit, quantize_absmax
from .format import check_blocksize
from .quant_state import QuantState, check_state


def quantize_4bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> QuantState:
    """Blockwise 4-bit quantization of x with any sorted 16-value codebook, optionally with double quantization."""
    check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
    packed, absmax = quantize_blockwise_4bit(x, code, blocksize)
    state = QuantState(packed, absmax, code.float().to(x.device), blocksize, torch.Size(x.shape), x.dtype)
    if double_quant:
        state.absmax, state.offset, state.nested_absmax, state.nested_code = quantize_absmax(absmax)
        state.double_quant = True
    return state


def quantize_nf4(x: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> QuantState:
    """W_nf4 = nearest(NF4, W_b / absmax_b) per block of `blocksize`, absmax double-quantized (QLoRA).

    x: float32, float16 or bfloat16, any shape, every value finite; blocksize: power of two from 32 to 4096.
    The codes, absmax, offset and nested absmax equal those bitsandbytes' quantize_4bit(quant_type="nf4",
    compress_statistics=double_quant) produces, byte for byte, wherever bitsandbytes' result is finite.
    """
    return quantize_4bit(x, nf4_code(x.device if isinstance(x, torch.Tensor) else None), blocksize, double_quant)


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """Per-block absmax in float32, with double quantization undone: c1' = dequant(c2, c1_8bit) + offset."""
    return _absmax(check_state(state))


def _absmax(state: QuantState) -> torch.Tensor:
    if not state.double_quant:
        return state.absmax.float()
    return dequantize_absmax_8bit(state.absmax, state.offset.float().reshape(()), state.nested_absmax.float(),
                                  state.nested_code, state.nested_blocksize)


def dequantize_4bit(state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """doubleDequant(c1, c2, W_4bit) = code[W_4bit] · dequant(c2, c1): the tensor in its original shape, in its
    original dtype or in `dtype` (computed in float32 and rounded once, as a cast of the float32 result would be)."""
    if check_state(state).bits != 4:
        raise ValueError(f"dequantize_4bit: the state holds {state.bits}-bit codes; dequantize it with dequantize_nf2")
    return dequantize_blockwise_4bit(state.packed, _absmax(state), state.code, state.blocksize,
                                     state.shape, state.dtype if dtype is None else dtype)


def dequantize_nf4(state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of quantize_nf4 (up to the quantization error): w = NF4[q] · absmax', shape and dtype restored
    (or the given dtype)."""
    return dequantize_4bit(state, dtype)
