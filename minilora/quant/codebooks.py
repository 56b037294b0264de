"""Codebooks: the sorted values a k-bit code can stand for, each derived in code.

A blockwise format stores, per element, the index of the nearest code value to x / absmax(block).
Every table here is sorted ascending and lies in [-1, 1], so dequantization is code[index] · absmax.

    nf4_code()      16 values at quantiles of N(0, 1), with an exact zero        (QLoRA, Appendix E)
    nf2_code()      4 values built the same way: -1, 0, 0.338, 1                 (LoftQ's 2-bit NF2)
    fp4_code()      16 values of a 4-bit float, E2M1 (1 sign, 2 exponent, 1 mantissa bit)
    int4_code()     16 evenly spaced values k/7, k = -7..7 (zero appears as -0 and +0)
    dynamic_code()  256 values of the signed dynamic 8-bit map (Dettmers 2015), used to quantize
                    the block absmax values a second time (double quantization)

Tables are float32 and built in float32 arithmetic, step by step, because that is how the published
tables were produced: the same formulas evaluated in float64 land one float32 ulp away on some entries.
"""
from __future__ import annotations

import functools
import math
import weakref

import torch

# Outermost quantile level of NF4: 1 - δ with δ = ½(1/32 + 1/30) ≈ 0.0322917, i.e. halfway between the
# tail mass 1/(2·16) and 1/(2·15). It is published rounded to seven digits; the rounded value is what
# reproduces the published table, so it is the one used here.
NF4_OFFSET = 0.9677083


def _on(table: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    return table.to(device) if device is not None else table.clone()


@functools.lru_cache(maxsize=None)
def _normal_float(bits: int) -> torch.Tensor:
    # Probabilities on a float32 grid from 1 - δ down to 1/2 (the 1/2 end, the median, is dropped):
    # 2^(k-1) levels for the positive half, 2^(k-1) - 1 for the negative half; zero is added exactly.
    half = 2 ** (bits - 1)
    p_pos = torch.linspace(NF4_OFFSET, 0.5, half + 1)[:-1]  # (8,) for NF4, (2,) for NF2
    p_neg = torch.linspace(NF4_OFFSET, 0.5, half)[:-1]      # (7,) for NF4, (1,) for NF2
    # Q(p) = Φ⁻¹(p), the N(0,1) quantile function (ndtri), evaluated in float64 and rounded to float32
    q_pos = torch.special.ndtri(p_pos.double()).float()
    q_neg = -torch.special.ndtri(p_neg.double()).float()
    values = torch.cat([q_neg, torch.zeros(1), q_pos]).sort().values  # (2^k,)
    return values / values.max()  # normalise: largest is +1, and -Q(1-δ)/Q(1-δ) = -1 exactly


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """NF4: q = Φ⁻¹(p) / Φ⁻¹(1 - δ) for p on two even grids in [1/2, 1 - δ], plus an exact 0.

    QLoRA's NormalFloat puts the 16 buckets at quantiles of N(0, 1) so that each holds about the
    same share of normally distributed weights. To make 0 exact, the table is asymmetric: 8
    positive quantiles (probabilities linspace(1 - δ, 1/2, 9) without the 1/2) and 7 negative ones
    (mirror of linspace(1 - δ, 1/2, 8) without the 1/2), plus 0, all divided by the largest.
    Returns a sorted float32 tensor of 16 values from -1 to 1.
    """
    return _on(_normal_float(4), device)


def nf2_code(device: torch.device | str | None = None) -> torch.Tensor:
    """NF2: NF4's construction with 2 bits, 2 positive quantiles (linspace(1 - δ, 1/2, 3) without the 1/2),
    1 negative one (-Φ⁻¹(1 - δ)) and an exact 0, divided by the largest: [-1, 0, 0.338, 1].

    LoftQ (Li et al., 2023) quantizes its 2-bit backbones to this NormalFloat ("NF2"), built the way QLoRA
    builds NF4. With four levels the asymmetry is stark: one negative level, two positive ones.
    Returns a sorted float32 tensor of 4 values from -1 to 1.
    """
    return _on(_normal_float(2), device)


@functools.lru_cache(maxsize=None)
def _fp4() -> torch.Tensor:
    values = []
    for sign in (1.0, -1.0):
        for exponent in range(4):      # 2 exponent bits, bias 1
            for mantissa in range(2):  # 1 mantissa bit
                if exponent == 0:      # subnormal: 0.m · 2^(1 - bias)
                    magnitude = (mantissa / 2) * 2.0 ** (1 - 1)
                else:                  # normal: 1.m · 2^(e - bias)
                    magnitude = (1 + mantissa / 2) * 2.0 ** (exponent - 1)
                values.append(sign * magnitude)
    values.sort(key=lambda v: (v, math.copysign(1.0, v)))  # ascending, -0 before +0
    table = torch.tensor(values, dtype=torch.float32)  # (16,) from -6 to 6
    return table / table.abs().max()


def fp4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """FP4 E2M1: v = (-1)^s · 1.m · 2^(e-1) (e > 0), or (-1)^s · 0.m (e = 0), divided by max = 6.

    Magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}/6, both signs, so zero appears twice (+0 and -0).
    This is the E2M1 layout of the OCP microscaling formats; bitsandbytes' "fp4" differs in its
    smallest non-zero magnitude (1/192 instead of 1/12).
    """
    return _on(_fp4(), device)


@functools.lru_cache(maxsize=None)
def _int4() -> torch.Tensor:
    negative = [k / 7 for k in range(-7, 0)]
    positive = [k / 7 for k in range(1, 8)]
    return torch.tensor(negative + [-0.0, 0.0] + positive, dtype=torch.float32)  # sign-magnitude: ±0


def int4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """Symmetric int4 (sign-magnitude): v = k/7, k = -7..7; zero occurs as -0 and +0 (16 codes)."""
    return _on(_int4(), device)


@functools.lru_cache(maxsize=None)
def _dynamic() -> torch.Tensor:
    parts = [torch.zeros(1), torch.ones(1)]  # the two extra codes: 0 and +1
    for e in range(7):  # 7 decades, 10^-6 .. 10^0
        # bit layout: sign, (6 - e) zeros, an indicator 1, then e fraction bits -> 2^e bins of [0.1, 1]
        edges = torch.linspace(0.1, 1.0, 2**e + 1)       # float32, (2^e + 1,)
        centers = (edges[:-1] + edges[1:]) / 2           # bin centres, (2^e,)
        magnitudes = centers * 10.0 ** (e - 6)           # scaled into the decade
        parts += [magnitudes, -magnitudes]
    return torch.cat(parts).sort().values  # (256,)


def dynamic_code(device: torch.device | str | None = None) -> torch.Tensor:
    """Signed dynamic 8-bit map: v = ±10^(e-6) · (0.1 + (j + ½) · 0.9 / 2^e), e = 0..6, j < 2^e.

    Dynamic tree quantization (Dettmers, "8-Bit Approximations for Parallelism in Deep Learning"):
    after the sign bit, the number of leading zeros picks a decade 10^(e-6), and the bits after the
    first 1 are a linear fraction with 2^e bins over [0.1, 1]; the code is the bin centre. Small
    magnitudes get few fraction bits, large ones many. 2·(1+2+…+64) = 254 values plus 0 and +1
    make 256. Largest gap: 0.9/64 = 0.0140625 (between neighbours in the top decade).
    """
    return _on(_dynamic(), device)


def midpoints(code: torch.Tensor) -> torch.Tensor:
    """m_i = (c_i + c_{i+1}) / 2 in float32: the decision boundaries between neighbouring codes."""
    code = code.float()
    return (code[:-1] + code[1:]) / 2


def check_code(code: torch.Tensor, name: str = "code", size: int = 16) -> torch.Tensor:
    """A k-bit codebook (size = 2^k, 16 by default): float tensor of sorted, finite values with strictly
    increasing midpoints."""
    if not isinstance(code, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of {size} sorted values, got {type(code).__name__}")
    if code.numel() != size or not code.is_floating_point():
        raise ValueError(f"{name} must hold {size} floating-point values, got {code.numel()} of {code.dtype}")
    code = code.detach().reshape(-1).float().cpu()
    if not torch.isfinite(code).all() or code.abs().max() > 1:
        raise ValueError(f"{name} must lie in [-1, 1]")
    if not (midpoints(code)[1:] > midpoints(code)[:-1]).all():
        raise ValueError(f"{name} must be sorted ascending (no value more than twice)")
    return code


# machinery: every dequantization checks its codebook, and all layers share one codebook tensor, so the result
# of check_code is remembered per tensor (by identity, with its version counter: an in-place change checks it
# again); an entry goes when its tensor does.
_checked: dict[int, tuple] = {}


def check_code_once(code: torch.Tensor, name: str = "code", size: int = 16) -> torch.Tensor:
    """check_code(code, name, size), computed once for the same unchanged tensor at the same size."""
    if not isinstance(code, torch.Tensor) or code.is_inference():  # inference tensors keep no version counter
        return check_code(code, name, size)
    key = id(code)
    seen = _checked.get(key)
    if seen is not None and seen[0]() is code and seen[1] == (code._version, size):
        return seen[2]
    checked = check_code(code, name, size).clone()  # a copy: a view would keep `code` alive
    _checked[key] = (weakref.ref(code, lambda _: _checked.pop(key, None)), (code._version, size), checked)
    return checked


CODEBOOKS = {"nf4": nf4_code, "fp4": fp4_code, "int4": int4_code}


def get_code(name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 4-bit codebook called name ("nf4", "fp4" or "int4")."""
    if name not in CODEBOOKS:
        raise ValueError(f"code name must be one of {sorted(CODEBOOKS)}, got {name!r}")
    return CODEBOOKS[name](device)


def max_gap(code: torch.Tensor) -> float:
    """Largest distance between neighbouring codes; nearest-code rounding errs by at most half of it."""
    c = code.double().sort().values
    return float((c[1:] - c[:-1]).max())
