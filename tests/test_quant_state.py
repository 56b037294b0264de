"""QuantState: exact byte size, bits per parameter, the field contract, absmax dequantization."""
import dataclasses

import pytest
import torch

from minilora.quant import QuantState, dequantize_absmax, dequantize_nf4, dynamic_code, nf4_code, quantize_nf4


@pytest.fixture(scope="module")
def big_weight():
    torch.manual_seed(0)
    return torch.randn(4096, 4096) * 0.02


def test_bits_per_param_with_double_quant_is_4_127(big_weight):
    state = quantize_nf4(big_weight, blocksize=64, double_quant=True)
    n = big_weight.numel()
    assert state.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4  # codes, absmax, c2, offset
    assert state.bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=2e-6)
    assert round(state.bits_per_param, 3) == 4.127


def test_bits_per_param_without_double_quant_is_4_5(big_weight):
    state = quantize_nf4(big_weight, blocksize=64, double_quant=False)
    assert state.nbytes == big_weight.numel() // 2 + 4 * big_weight.numel() // 64
    assert state.bits_per_param == 4.5


def test_field_contract():
    torch.manual_seed(1)
    x = torch.randn(300, 70)  # 21000 values: 329 blocks of 64 (the last ragged), 2 nested groups
    s = quantize_nf4(x)
    assert dataclasses.is_dataclass(s) and isinstance(s, QuantState)
    assert s.packed.dtype == torch.uint8 and s.packed.shape == (10500,)
    assert s.absmax.dtype == torch.uint8 and s.absmax.shape == (329,)
    assert s.offset.dtype == torch.float32 and s.offset.dim() == 0
    assert s.nested_absmax.dtype == torch.float32 and s.nested_absmax.shape == (2,)
    assert torch.equal(s.nested_code, dynamic_code()) and torch.equal(s.code, nf4_code())
    assert (s.blocksize, s.nested_blocksize, s.shape, s.dtype, s.double_quant) == (64, 256, x.shape, x.dtype, True)
    # the documented formulas, written out
    a = s.nested_code[s.absmax.long()] * s.nested_absmax.repeat_interleave(256)[:329] + s.offset
    assert torch.equal(dequantize_absmax(s), a)
    nibbles = torch.stack([s.packed >> 4, s.packed & 15], 1).view(-1).long()
    w = s.code[nibbles] * a.repeat_interleave(64)[:x.numel()]
    assert torch.equal(dequantize_nf4(s), w.view(x.shape))


def test_dequantize_absmax_is_close_to_the_true_absmax():
    torch.manual_seed(2)
    x = torch.randn(64 * 1000)
    plain, double = quantize_nf4(x, double_quant=False), quantize_nf4(x, double_quant=True)
    assert torch.equal(dequantize_absmax(plain), x.view(-1, 64).abs().amax(1))
    rel = (dequantize_absmax(double) - plain.absmax).abs() / plain.absmax
    assert rel.max() < 0.01 and torch.isclose(double.offset, plain.absmax.mean())


def test_dataclasses_replace_keeps_a_usable_state():
    s = quantize_nf4(torch.randn(64, 64))
    moved = dataclasses.replace(s, packed=s.packed.clone())
    assert torch.equal(dequantize_nf4(moved), dequantize_nf4(s))
    with pytest.raises(TypeError, match="QuantState"):
        dequantize_nf4({"packed": s.packed})


@pytest.mark.parametrize("shape", [(64, 96), (3, 1000)])   # whole blocks; a ragged last block
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_to_another_dtype_rounds_once_from_float32(shape, dtype):
    torch.manual_seed(5)
    state = quantize_nf4(torch.randn(*shape) * 3)
    w32 = dequantize_nf4(state)
    w = dequantize_nf4(state, dtype)
    assert w.dtype == dtype and w.shape == shape
    assert torch.equal(w, w32.to(dtype))
    assert dequantize_nf4(state, None).dtype == torch.float32
    with pytest.raises(TypeError, match="dtype must be"):
        dequantize_nf4(state, torch.int8)
