"""Affine (zero-point) round-to-nearest: the grid, the packing, the group and zero-point storage, the errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from minilora.quant.affine import AffineState, dequantize_affine, pack, quantize_affine, unpack


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), numel=st.integers(1, 200), seed=st.integers(0, 2**31 - 1))
def test_packing_round_trips(bits, numel, seed):
    q = torch.randint(0, 2 ** bits, (numel,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack(q, bits)
    per_byte = 8 // bits if bits <= 4 else 1
    assert packed.dtype == torch.uint8 and packed.numel() == -(-numel // per_byte)
    assert torch.equal(unpack(packed, bits, numel), q)


def test_packing_puts_the_first_element_in_the_high_field():
    assert pack(torch.tensor([1, 2]), 4).tolist() == [0x12]
    assert pack(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b01101100]
    assert pack(torch.tensor([5, 7, 1]), 3).tolist() == [0x57, 0x10]  # 3 bits stored in nibbles


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 6), groups=st.integers(1, 4), groupsize=st.sampled_from([1, 2, 8, 32]),
       seed=st.integers(0, 2**31 - 1), shift=st.floats(-3, 3))
def test_error_is_at_most_half_a_step_and_zero_stays_zero(bits, rows, groups, groupsize, seed, shift):
    x = torch.randn(rows, groups * groupsize, generator=torch.Generator().manual_seed(seed)) + shift
    x[0, 0] = 0.0
    s = quantize_affine(x, bits, groupsize)
    x_hat = dequantize_affine(s)
    step = s.scale.repeat_interleave(groupsize, dim=-1)
    assert ((x - x_hat).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert x_hat[0, 0] == 0.0                      # 0 lies on the grid: Z is an integer code
    q = unpack(s.codes, bits, x.numel()).reshape(x.shape).float()
    assert q.max() <= 2 ** bits - 1


def test_group_and_zero_point_storage():
    x = torch.tensor([[-1.0, 0.0, 0.6, 2.0, 10.0, 11.0, 12.0, 13.0]])
    s = quantize_affine(x, bits=4, groupsize=4)
    assert s.scale.shape == (1, 2) and s.zero.shape == (1, 2) and s.zero.dtype == torch.uint8
    # group 0 spans [-1, 2]: S = 3/15, Z = round(1 / 0.2) = 5; group 1 spans [0, 13] (0 is kept on the grid)
    assert s.scale[0].tolist() == pytest.approx([3 / 15, 13 / 15])
    assert s.zero[0].tolist() == [5, 0]
    q = unpack(s.codes, 4, 8).tolist()
    assert q[:4] == [0, 5, 8, 15]                  # round(x / S + Z)
    assert q[4:] == [round(v / (13 / 15)) for v in (10.0, 11.0, 12.0, 13.0)]


def test_bits_per_parameter_measured_from_the_stored_tensors():
    x = torch.randn(64, 256)
    s4 = quantize_affine(x, 4, 128)
    assert s4.codes.numel() == 64 * 256 // 2
    assert s4.nbytes == 64 * 256 // 2 + 64 * 2 * 4 + 64 * 2
    assert s4.bits_per_param == pytest.approx(4 + 40 / 128)
    assert quantize_affine(x, 8, 64).bits_per_param == pytest.approx(8 + 40 / 64)
    assert quantize_affine(x, 2, None).bits_per_param == pytest.approx(2 + 40 / 256)


def test_shape_dtype_and_more_bits_less_error():
    x = torch.randn(3, 4, 64, dtype=torch.bfloat16)
    s = quantize_affine(x, 4, 16)
    assert isinstance(s, AffineState) and dequantize_affine(s).shape == x.shape and dequantize_affine(s).dtype == x.dtype
    assert dequantize_affine(s, torch.float32).dtype == torch.float32
    w = torch.randn(32, 128)
    errors = [(w - dequantize_affine(quantize_affine(w, b, 32))).norm().item() for b in range(2, 9)]
    assert errors == sorted(errors, reverse=True)
    assert torch.equal(dequantize_affine(quantize_affine(torch.zeros(2, 8), 4, 4)), torch.zeros(2, 8))


def test_bad_arguments_get_clear_errors():
    x = torch.randn(4, 12)
    for bits in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match="bits must be an int from 2 to 8"):
            quantize_affine(x, bits, 4)
    with pytest.raises(ValueError, match="groupsize=5 does not divide the last dimension \\(12\\)"):
        quantize_affine(x, 4, 5)
    with pytest.raises(ValueError, match="groupsize"):
        quantize_affine(x, 4, 0)
    with pytest.raises(TypeError, match="must be float32, float16, bfloat16 or float64"):
        quantize_affine(torch.ones(4, 12, dtype=torch.int32), 4, 4)
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_affine([1.0, 2.0], 4, 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_affine(torch.tensor([[1.0, float("nan")]]), 4, 2)
    with pytest.raises(TypeError, match="AffineState"):
        dequantize_affine(torch.zeros(3))
