"""Codebooks: NF4 from normal quantiles, FP4 E2M1, int4, the signed dynamic 8-bit map."""
import pytest
import torch

from minilora.quant import dynamic_code, fp4_code, get_code, int4_code, max_gap, nf4_code

# QLoRA paper (Dettmers et al. 2023), Appendix E: the NF4 data type's 16 values.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def test_nf4_equals_the_paper_table_in_float32():
    assert torch.equal(nf4_code(), torch.tensor(PAPER_NF4, dtype=torch.float32))


def test_nf4_structure_exact_zero_ends_and_asymmetry():
    c = nf4_code()
    assert c.dtype == torch.float32 and c.numel() == 16
    assert (c[1:] > c[:-1]).all()
    assert c[0] == -1 and c[-1] == 1 and c[7] == 0
    assert (c < 0).sum() == 7 and (c > 0).sum() == 8


def test_nf4_values_are_normal_quantiles():
    # Each positive code is Φ⁻¹(p)/Φ⁻¹(1-δ) for p evenly spaced in (1/2, 1-δ]: invert and check the spacing.
    c = nf4_code().double()
    top = torch.special.ndtri(torch.tensor(0.9677083, dtype=torch.float64))
    p = torch.special.ndtr(c[8:] * top)          # probabilities of the 8 positive codes
    steps = p[1:] - p[:-1]
    assert torch.allclose(steps, steps.mean().expand_as(steps), atol=1e-6)
    assert torch.allclose(p[-1], torch.tensor(0.9677083, dtype=torch.float64), atol=1e-7)


def test_nf4_equals_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    assert torch.equal(nf4_code(), F.get_4bit_type("nf4", device="cpu"))


def test_dynamic_map_equals_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    assert torch.equal(dynamic_code(), F.create_dynamic_map(signed=True))


def test_dynamic_map_structure():
    d = dynamic_code()
    assert d.numel() == 256 and (d[1:] > d[:-1]).all()
    assert d[-1] == 1 and (d == 0).sum() == 1 and (d > 0).sum() == 128 and (d < 0).sum() == 127
    # the top decade has 64 bin centres 0.9/64 apart; the smallest magnitude is 10^-6 · 0.55
    assert abs(max_gap(d) - 0.9 / 64) < 1e-7
    assert torch.isclose(d[d > 0].min(), torch.tensor(0.55e-6))
    assert torch.isclose(d[0], torch.tensor(-(0.1 + 63.5 * 0.9 / 64)))


def test_fp4_e2m1_and_int4_values():
    assert torch.equal(fp4_code() * 6, torch.tensor([-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0, 0.5, 1, 1.5, 2, 3, 4, 6]))
    assert torch.equal(int4_code() * 7, torch.tensor([-7., -6, -5, -4, -3, -2, -1, 0, 0, 1, 2, 3, 4, 5, 6, 7]))
    for c in (fp4_code(), int4_code()):  # sign-magnitude: -0 comes before +0
        zeros = (c == 0).nonzero().view(-1)
        assert torch.signbit(c[zeros[0]]) and not torch.signbit(c[zeros[1]])
    assert abs(max_gap(fp4_code()) - 1 / 3) < 1e-7 and abs(max_gap(int4_code()) - 1 / 7) < 1e-7


def test_get_code_and_copies():
    assert torch.equal(get_code("nf4"), nf4_code())
    nf4_code()[0] = 5.0  # a caller's copy: the cached table is untouched
    assert nf4_code()[0] == -1
    with pytest.raises(ValueError, match="code name"):
        get_code("nf3")
