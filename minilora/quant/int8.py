"""Int8 absmax quantization, the lecture's first example of "splitting a range into buckets".

    c      = 127 / absmax(X)                 the quantization constant
    X_int8 = round(c · X)                    integers in [-127, 127]
    X'     = X_int8 / c                      dequantized; |X - X'| <= absmax / 254 (half a bucket)

Slide example: X = [1.5, 2.3, 3.7, 4.1, 5.6, 6.8, 7.9, 8.4, 9.2, 10.2], c = 127/10.2 = 12.4509...,
X_int8 = [19, 29, 46, 51, 70, 85, 98, 105, 115, 127]. Rounding to nearest gives 19 and 70 for 1.5 and
5.6 (12.4509 · 1.5 = 18.68, 12.4509 · 5.6 = 69.73); the slide prints 18 and 69, which truncation would give.

With a blocksize, every block of consecutive elements (flattened; the last may be shorter) gets its own
absmax, so one outlier only coarsens its own block.
"""
from __future__ import annotations

import math

import torch

from .format import TINY, check_float_tensor


def _blocks(x: torch.Tensor, blocksize: int | None) -> tuple[torch.Tensor, int]:
    flat = x.reshape(-1).float()
    size = flat.numel() if blocksize is None else blocksize
    if blocksize is not None and (isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1):
        raise ValueError(f"blocksize must be a positive int or None (one block), got {blocksize!r}")
    size = max(size, 1)
    groups = math.ceil(flat.numel() / size)
    return torch.nn.functional.pad(flat, (0, groups * size - flat.numel())).view(groups, size), size


def quantize_int8(x: torch.Tensor, blocksize: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """X_int8 = round(127 / absmax_b · X) per block b; returns (X_int8 int8 in x's shape, absmax float32 (blocks,)).

    blocksize None: one absmax for the whole tensor (the slide's version). round() is round-half-to-even.
    A block of zeros has absmax 0 and codes 0. NaN or Inf raise ValueError. dequantize_int8 needs the same
    blocksize back.
    """
    check_float_tensor(x)
    blocks, _ = _blocks(x, blocksize)                      # (groups, size)
    absmax = blocks.abs().amax(1)                          # (groups,)
    if not torch.isfinite(absmax).all():
        raise ValueError("x contains NaN or Inf; quantization needs finite values")
    c = 127 / absmax.clamp(min=TINY)                       # c = 127 / absmax
    scaled = blocks * c[:, None]
    overflow = ~torch.isfinite(c)                          # absmax < 127 / float32 max: c is inf, divide first
    if overflow.any():
        scaled[overflow] = blocks[overflow] / absmax[overflow, None].clamp(min=TINY) * 127
    q = torch.round(scaled).clamp_(-127, 127).to(torch.int8)
    return q.reshape(-1)[:x.numel()].reshape(x.shape), absmax


def dequantize_int8(q: torch.Tensor, absmax: torch.Tensor, blocksize: int | None = None) -> torch.Tensor:
    """X' = X_int8 · absmax_b / 127 (= X_int8 / c), float32 in q's shape.

    blocksize must be the one the codes were made with: absmax must hold one value per block of it.
    """
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
        raise TypeError(f"q must be an int8 tensor (from quantize_int8), got "
                        f"{q.dtype if isinstance(q, torch.Tensor) else type(q).__name__}")
    blocks, size = _blocks(q, blocksize)                   # (groups, size) float32
    if not isinstance(absmax, torch.Tensor) or absmax.numel() != blocks.shape[0]:
        got = absmax.numel() if isinstance(absmax, torch.Tensor) else type(absmax).__name__
        raise ValueError(f"absmax must hold one value per block of {size} ({blocks.shape[0]} for {q.numel()} "
                         f"codes, blocksize={blocksize!r}), got {got}: pass the blocksize the codes were made with")
    return (blocks * (absmax.float().reshape(-1)[:, None] / 127)).reshape(-1)[:q.numel()].reshape(q.shape)
