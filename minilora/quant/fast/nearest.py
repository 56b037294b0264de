"""Nearest code in a sorted codebook, fast: a uniform bin grid plus one comparison.

The rule (the one bitsandbytes' CPU path uses for 4-bit codes): with midpoints m_i = (c_i + c_{i+1}) / 2
computed in float32, the index of s is the number of midpoints strictly below it,

    index(s) = #{ i : m_i < s }          (= torch.bucketize(s, m); a tie s == m_i goes to the lower code)

A binary search per element is slow on a CPU, so the line is cut into 2K+1 bins by t = trunc(s·K)
(exact: K is a power of two), with K large enough that no bin holds two midpoints. Per bin we store
`base` (midpoints below the bin, plus those in it not yet passed) and the one midpoint `mid` inside it
(+inf when there is none). Then

    index(s) = base[t] + (s > mid[t])

which is two table look-ups and a compare, all vectorised.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ..codebooks import check_code, midpoints


class NearestTable(NamedTuple):
    K: int               # bins per unit: t = trunc(s·K) in [-K, K]
    base: torch.Tensor   # (2K+1,) uint8, indexed by t + K
    mid: torch.Tensor    # (2K+1,) float32, the midpoint inside bin t (+inf if none)
    zero_index: int      # index(0.0): the code that padding and all-zero blocks get


def _bin(t: int, K: int) -> tuple[float, float, bool, bool]:
    """The s-interval that trunc(s·K) maps to t: (lo, hi, lo included, hi included)."""
    if t > 0:
        return t / K, (t + 1) / K, True, False
    if t < 0:
        return (t - 1) / K, t / K, False, True
    return -1 / K, 1 / K, False, False


def _inside(m: float, lo: float, hi: float, lo_in: bool, hi_in: bool) -> bool:
    return (lo < m or (lo_in and m == lo)) and (m < hi or (hi_in and m == hi))


@functools.lru_cache(maxsize=64)
def _build(code_values: tuple[float, ...]) -> NearestTable:
    mids = midpoints(torch.tensor(code_values, dtype=torch.float32))
    mids64 = mids.double().tolist()  # exact: float32 values, compared exactly in float64
    for K in (2**k for k in range(4, 17)):
        base, mid = [], []
        for t in range(-K, K + 1):
            lo, hi, lo_in, hi_in = _bin(t, K)
            inside = [i for i, m in enumerate(mids64) if _inside(m, lo, hi, lo_in, hi_in)]
            if len(inside) > 1:
                break  # two boundaries in one bin: the grid is too coarse
            if inside:
                base.append(inside[0])
                mid.append(mids[inside[0]].item())
            else:
                base.append(sum(m < (lo + hi) / 2 for m in mids64))
                mid.append(float("inf"))
        else:
            table = NearestTable(K, torch.tensor(base, dtype=torch.uint8),
                                 torch.tensor(mid, dtype=torch.float32), 0)
            zero = int(nearest_index(torch.zeros(1), table)[0])
            return table._replace(zero_index=zero)
    raise ValueError("code: neighbouring codes are closer than 2^-15; no bin grid separates them")


def nearest_table(code: torch.Tensor, device: torch.device | str = "cpu") -> NearestTable:
    """The bin tables for a 4-bit codebook (cached per codebook), on device."""
    t = _build(tuple(check_code(code).tolist()))
    return t._replace(base=t.base.to(device), mid=t.mid.to(device))


def nearest_index(s: torch.Tensor, table: NearestTable) -> torch.Tensor:
    """index(s) = base[t] + (s > mid[t]), t = trunc(s·K) + K; s float32 in about [-1, 1] -> uint8."""
    t = (s * table.K).to(torch.int32).clamp_(-table.K, table.K) + table.K
    return table.base[t] + (s > table.mid[t])
