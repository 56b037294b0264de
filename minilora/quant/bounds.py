"""Worst-case round-trip errors, element by element. The property tests check these hold.

Notation: a = absmax of the element's block, G = largest gap between neighbouring codes,
u = 2^-24 (float32 unit roundoff).

4-bit blockwise (blockwise.py). With exact arithmetic s = x/a lies within G/2 of the chosen code c,
so |x - c·a| <= a·G/2. In float32, s = fl(x · fl(1/a)) is off by at most ~2u, the midpoints by u,
and fl(c·a) by u·a, hence

    |x - w| <= a · (G/2 + 5u)                                         (1)

A block whose a is below 1e-38 is scaled by 1e38 instead of 1/a (as bitsandbytes does); there only
|x - w| <= |x| + |w| <= 2a holds (such blocks are zero for every practical purpose).

Double quantization (double.py) replaces a by a' with, for a block in nested group g (scale c2_g),

    |a' - a| <= δ = c2_g · (G8/2 + 1/65535) + 16u · (c2_g + |offset| + |a'|)  (2)

G8 = 0.9/64 is the dynamic map's largest gap, 1/65535 is half the step of the grid its codes are
chosen on; the second term collects float32 rounding generously. As |code| <= 1, the weight error grows
by at most δ:   |x - w| <= a · (G/2 + 5u) + δ · (1 + u).                         (3)

Casting w to float16/bfloat16 adds half an ulp of that dtype: |w| · 2^-11 or 2^-8 (+ the smallest
subnormal). Int8 absmax: |x - x'| <= a/254 + 5u·a (2a if a is below float32's normal range).  (4)
"""
from __future__ import annotations

import torch

from .codebooks import dynamic_code, max_gap
from .format import TINY
from .nf4 import dequantize_absmax
from .quant_state import QuantState

U = 2.0 ** -24                 # float32 unit roundoff
SMALLEST = 2.0 ** -149         # smallest float32 subnormal: absolute slack for subnormal products
_CAST = {torch.float32: (0.0, 0.0), torch.float16: (2.0 ** -11, 2.0 ** -25), torch.bfloat16: (2.0 ** -8, 2.0 ** -134)}


def block_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Float32 absmax of each block of the flattened x as the format stores it: the true maximum of |x|, except
    that a ragged last block stores max(absmax, TINY) (as bitsandbytes does)."""
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % blocksize
    a = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize).abs().amax(1)
    if pad:
        a[-1:] = a[-1:].clamp(min=TINY)
    return a


def absmax_error_bound(state: QuantState) -> torch.Tensor:
    """δ of equation (2) per block (zeros without double quantization)."""
    a_deq = dequantize_absmax(state)
    if not state.double_quant:
        return torch.zeros_like(a_deq)
    c2 = state.nested_absmax.repeat_interleave(state.nested_blocksize)[:a_deq.numel()]
    g8 = max_gap(dynamic_code())
    delta = c2 * (g8 / 2 + 1 / 65535) + 16 * U * (c2 + float(state.offset) + a_deq.abs()) + SMALLEST
    return torch.where(c2 < TINY, 2 * c2 + delta, delta)


def error_bound_4bit(x: torch.Tensor, state: QuantState, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-element bound on |x - dequantize(state)| (equations 1 and 3), in x's shape; dtype: the output dtype.
    A 2-bit (NF2) state obeys the same bound, with G the largest gap of its own code (1, between -1 and 0)."""
    a = block_absmax(x, state.blocksize)
    delta = absmax_error_bound(state)
    per_block = torch.where(a < TINY, 2 * a, a * (max_gap(state.code) / 2 + 5 * U)) + delta * (1 + U) + SMALLEST
    rel, absolute = _CAST[dtype]
    per_block = per_block + (a + delta) * rel + absolute
    return per_block.repeat_interleave(state.blocksize)[:x.numel()].view(x.shape)


def error_bound_int8(absmax: torch.Tensor, blocksize: int | None, n: int) -> torch.Tensor:
    """Per-element bound (4) for int8 absmax quantization of n elements, flattened."""
    per_block = absmax / 254 + 5 * U * absmax + SMALLEST
    per_block = torch.where(absmax < torch.finfo(torch.float32).tiny, 2 * absmax + SMALLEST, per_block)
    return per_block.repeat_interleave(n if blocksize is None else blocksize)[:n]
