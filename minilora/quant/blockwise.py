"""Blockwise 4-bit quantization: one absmax per block, nearest code, two codes per byte.

For block b of `blocksize` consecutive elements (the flattened tensor; a ragged last block gets its own):

    absmax_b = max_j |x_j|                      (float32)
    s_j      = x_j · (1 / absmax_b)             (scaled into [-1, 1]; absmax clamped to TINY first)
    q_j      = #{ i : m_i < s_j }               (the nearest code: m_i = (c_i + c_{i+1}) / 2 are the
                                                 midpoints; a tie goes to the lower code)
    byte_k   = q_{2k} · 16 + q_{2k+1}           (first element in the HIGH nibble; an odd count is
                                                 padded with the code of 0)
    w_j      = code[q_j] · absmax_b             (dequantize, in float32, then cast to the dtype)

This is bitsandbytes' 4-bit layout, byte for byte (its ragged last block divides, x / absmax, and stores
max(absmax, TINY) as its absmax; so does this one). Outlier elements only stretch their own block's scale.

The public functions hand the work to the CPU speed path (quant/fast/, same bytes, proven equal by
tests/test_quant_fast.py) unless it is switched off; quantize_blocks / dequantize_blocks are the reference.
"""
from __future__ import annotations

import math

import torch

from .codebooks import check_code, check_code_once, midpoints
from .dispatch import fast_path
from .format import FLOAT_DTYPES, TINY, check_blocksize, check_float_tensor


def check_finite(absmax: torch.Tensor) -> None:
    """NaN and Inf propagate into the block maximum, so checking absmax checks every element."""
    if not torch.isfinite(absmax).all():
        raise ValueError("x contains NaN or Inf; quantization needs finite values")


def quantize_blocks(flat: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: (packed uint8 ((n+1)//2,), absmax fp32 (blocks,)) of a flat tensor, as the docstring above."""
    q, absmax = block_codes(flat, code, blocksize)
    if flat.numel() % 2:
        q = torch.cat([q, torch.bucketize(torch.zeros(1, device=q.device), midpoints(code).to(q.device))])
    return (q[0::2] * 16 + q[1::2]).to(torch.uint8), absmax


def block_codes(flat: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int64 (n,), absmax fp32 (blocks,)): the index of the nearest code to each x_j / absmax_b, unpacked
    (any codebook size: the 2-bit format packs the same indices four to a byte, quant/nf2.py)."""
    x = flat.float()
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].view(-1, blocksize)                              # (full blocks, blocksize)
    absmax = blocks.abs().amax(1)
    s = (blocks * (1.0 / absmax.clamp(min=TINY))[:, None]).view(-1)
    if full < n:                     # the ragged last block divides, and stores its absmax clamped to TINY
        tail_absmax = x[full:].abs().amax(0, keepdim=True).clamp(min=TINY)
        absmax = torch.cat([absmax, tail_absmax])
        s = torch.cat([s, x[full:] / tail_absmax])
    check_finite(absmax)
    return torch.bucketize(s, midpoints(code).to(x.device)), absmax    # number of midpoints below s


def quantize_blockwise_4bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = 64
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """q = nearest(code, x_b / absmax_b) per block b; returns (packed uint8 ((n+1)//2,), absmax fp32 (blocks,)).

    x: float32/float16/bfloat16 tensor of any shape (flattened row-major); NaN or Inf raise ValueError.
    An empty x gives two empty tensors. Blocks of zeros get absmax 0 and the code of 0.
    """
    check_float_tensor(x)
    check_blocksize(blocksize)
    code = check_code(code)
    flat = x.detach().reshape(-1)
    fast = fast_path()
    if fast is not None:
        return fast.quantize_blockwise_4bit(flat, code, blocksize)
    return quantize_blocks(flat, code, blocksize)


def dequantize_blocks(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                      n: int) -> torch.Tensor:
    """The reference: w_j = code[q_j] · absmax_{j // blocksize}, float32 (n,); q_j from the nibbles, high first."""
    q = torch.stack([packed >> 4, packed & 15], dim=1).view(-1)[:n].long()
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return code.to(packed.device)[q] * scale


def dequantize_blockwise_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                              shape: torch.Size | tuple[int, ...], dtype: torch.dtype = torch.float32
                              ) -> torch.Tensor:
    """w_j = code[q_j] · absmax_{j // blocksize} in float32, cast to dtype and reshaped to shape."""
    check_blocksize(blocksize)
    n = math.prod(shape)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed must be uint8 with {(n + 1) // 2} bytes for shape {tuple(shape)}, got "
                         + (f"{packed.numel()} of {packed.dtype}" if isinstance(packed, torch.Tensor)
                            else type(packed).__name__))
    if not isinstance(absmax, torch.Tensor) or absmax.numel() != math.ceil(n / blocksize):
        raise ValueError(f"absmax must hold {math.ceil(n / blocksize)} values, got "
                         + (str(absmax.numel()) if isinstance(absmax, torch.Tensor) else type(absmax).__name__))
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    code = check_code_once(code)
    packed, absmax = packed.reshape(-1), absmax.reshape(-1).float()
    fast = fast_path()
    if fast is not None:
        return fast.dequantize_blockwise_4bit(packed, absmax, code, blocksize, n, dtype).view(shape)
    return dequantize_blocks(packed, absmax, code, blocksize, n).to(dtype).view(shape)
