"""QuantState: everything a 4-bit weight is stored as, and the two entry points quantize_nf4 / dequantize_nf4.

    w_j   = code[nibble_j] · absmax'_{j // blocksize}                         (dequantize the weight)
    absmax' = absmax                                                          (double_quant=False, fp32)
    absmax'_i = nested_code[absmax_i] · nested_absmax[i // 256] + offset      (double_quant=True, uint8)

Size: 4 bits per weight + 32/blocksize bits for an fp32 absmax, or with double quantization
8/blocksize + 32/(blocksize·256) bits; for blocksize 64 that is 4.5 and 4.127 bits per parameter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .blockwise import check_blocksize, dequantize_blockwise_4bit, quantize_blockwise_4bit
from .codebooks import nf4_code
from .double import NESTED_BLOCKSIZE, dequantize_absmax_8bit, quantize_absmax


@dataclass
class QuantState:
    """A blockwise 4-bit tensor. Field names are a contract shared with the kernels; see the module docstring."""
    packed: torch.Tensor                      # uint8 ((numel + 1) // 2,), first element in the high nibble
    absmax: torch.Tensor                      # fp32 (blocks,), or uint8 codes into nested_code when double_quant
    code: torch.Tensor                        # fp32 (16,): the 4-bit codebook (NF4 for quantize_nf4)
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype                        # dtype of the original tensor; dequantize returns it
    double_quant: bool = False
    offset: torch.Tensor | None = None        # fp32 0-dim: mean of the block absmax values (double_quant)
    nested_absmax: torch.Tensor | None = None  # fp32 (ceil(blocks / 256),) (double_quant)
    nested_code: torch.Tensor | None = None   # fp32 (256,): signed dynamic 8-bit map (double_quant)
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Exact bytes of per-tensor data: packed codes + absmax (+ offset + nested absmax).

        The codebooks (code: 64 bytes, nested_code: 1 KiB) are shared constants and not counted.
        An empty tensor stores nothing: 0 bytes.
        """
        if self.numel == 0:
            return 0
        size = self.packed.numel() + self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            size += 4 + self.nested_absmax.numel() * 4
        return size

    @property
    def bits_per_param(self) -> float:
        """8 · nbytes / numel (0.0 for an empty tensor)."""
        return 8 * self.nbytes / self.numel if self.numel else 0.0


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

    x: float32, float16 or bfloat16, any shape; blocksize: power of two from 32 to 4096. The codes,
    absmax, offset and nested absmax equal those bitsandbytes' quantize_4bit(quant_type="nf4",
    compress_statistics=double_quant) produces, byte for byte.
    """
    return quantize_4bit(x, nf4_code(x.device if isinstance(x, torch.Tensor) else None), blocksize, double_quant)


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """Per-block absmax in float32, with double quantization undone: c1' = dequant(c2, c1_8bit) + offset."""
    if not state.double_quant:
        return state.absmax.float()
    return dequantize_absmax_8bit(state.absmax, state.offset, state.nested_absmax, state.nested_code,
                                  state.nested_blocksize)


def dequantize_4bit(state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """doubleDequant(c1, c2, W_4bit) = code[W_4bit] · dequant(c2, c1): the tensor in its original shape, in its
    original dtype or in `dtype` (computed in float32 and rounded once, as a cast of the float32 result would be)."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    return dequantize_blockwise_4bit(state.packed, dequantize_absmax(state), state.code, state.blocksize,
                                     state.shape, state.dtype if dtype is None else dtype)


def dequantize_nf4(state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of quantize_nf4 (up to the quantization error): w = NF4[q] · absmax', shape and dtype restored
    (or the given dtype)."""
    return dequantize_4bit(state, dtype)
