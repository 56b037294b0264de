"""Blockwise 4-bit: nearest-code rule, nibble order, ragged blocks, dtypes, bad input, empty tensors."""
import pytest
import torch

from minilora.quant import (dequantize_blockwise_4bit, dequantize_nf4, fp4_code, int4_code, nf4_code,
                            quantize_blockwise_4bit, quantize_nf4)
from minilora.quant.fast.nearest import midpoints, nearest_index, nearest_table

CODES = {"nf4": nf4_code(), "fp4": fp4_code(), "int4": int4_code()}


@pytest.mark.parametrize("name", list(CODES))
def test_bin_grid_equals_bucketize_on_midpoints(name):
    code = CODES[name]
    table, m = nearest_table(code), midpoints(code)
    edges = torch.arange(-table.K, table.K + 1) / table.K
    s = torch.cat([torch.linspace(-1.01, 1.01, 200_001), m, edges, torch.tensor([0.0, -0.0, 1.0, -1.0])])
    s = torch.cat([s, torch.nextafter(s, torch.tensor(2.0)), torch.nextafter(s, torch.tensor(-2.0))])
    assert torch.equal(nearest_index(s, table).long(), torch.bucketize(s, m))  # ties go to the lower code


def test_first_element_in_high_nibble_and_odd_padding():
    code = nf4_code()
    x = torch.tensor([-1.0, 1.0, 0.0])  # codes 0, 15, 7; the odd count is padded with the code of 0 (7)
    packed, absmax = quantize_blockwise_4bit(x, code, 64)
    assert packed.tolist() == [0x0F, 0x77] and absmax.tolist() == [1.0]
    assert torch.equal(dequantize_blockwise_4bit(packed, absmax, code, 64, x.shape), x)


def test_each_block_has_its_own_absmax_including_the_ragged_one():
    torch.manual_seed(0)
    x = torch.randn(3 * 64 + 5)
    x[70] = 50.0
    packed, absmax = quantize_blockwise_4bit(x, nf4_code(), 64)
    assert packed.shape == ((x.numel() + 1) // 2,) and packed.dtype == torch.uint8
    expected = torch.stack([x[i:i + 64].abs().max() for i in range(0, x.numel(), 64)])
    assert torch.equal(absmax, expected) and absmax[1] == 50.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 129), (130, 66)])
def test_shape_and_dtype_come_back(dtype, shape):
    torch.manual_seed(1)
    x = torch.randn(shape).to(dtype)
    for dq in (False, True):
        w = dequantize_nf4(quantize_nf4(x, blocksize=32, double_quant=dq))
        assert w.shape == x.shape and w.dtype == dtype
        assert (w.float() - x.float()).abs().max() < 0.25 * x.float().abs().max()


def test_chunked_path_equals_a_direct_computation():
    torch.manual_seed(2)  # more elements than one chunk, and a ragged tail
    x = torch.randn(300_001) * torch.rand(300_001) * 4
    code = nf4_code()
    packed, absmax = quantize_blockwise_4bit(x, code, 128)
    pad = (-x.numel()) % 128
    blocks = torch.nn.functional.pad(x, (0, pad)).view(-1, 128)
    a = blocks.abs().amax(1)
    q = torch.bucketize((blocks / a[:, None]).reshape(-1)[:x.numel()], midpoints(code))
    q = torch.cat([q, q.new_full((x.numel() % 2,), 7)])
    assert torch.equal(absmax, a) and torch.equal(packed.long(), q[0::2] * 16 + q[1::2])
    w = code[q[:x.numel()]] * a.repeat_interleave(128)[:x.numel()]
    assert torch.equal(dequantize_blockwise_4bit(packed, absmax, code, 128, x.shape), w)


def test_bad_input_gives_clear_errors():
    code = nf4_code()
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_nf4(torch.full((200,), float("-inf")))
    for bad in (48, 16, 8192, 0, -64):
        with pytest.raises(ValueError, match="power of two from 32 to 4096"):
            quantize_nf4(torch.ones(64), blocksize=bad)
    with pytest.raises(TypeError, match="blocksize must be an int"):
        quantize_nf4(torch.ones(64), blocksize=64.0)
    for dtype in (torch.int32, torch.uint8, torch.float64):
        with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
            quantize_nf4(torch.ones(64, dtype=dtype))
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_nf4([1.0, 2.0])
    with pytest.raises(ValueError, match="16"):
        quantize_blockwise_4bit(torch.ones(4), torch.linspace(-1, 1, 8))
    with pytest.raises(ValueError, match="sorted"):
        quantize_blockwise_4bit(torch.ones(4), code.flip(0))
    with pytest.raises(ValueError, match="bytes for shape"):
        dequantize_blockwise_4bit(torch.zeros(3, dtype=torch.uint8), torch.ones(1), code, 64, (8,))


@pytest.mark.parametrize("double_quant", [False, True])
def test_empty_tensor_is_an_exact_empty_state(double_quant):
    state = quantize_nf4(torch.empty(0, 5, dtype=torch.bfloat16), double_quant=double_quant)
    assert state.packed.numel() == 0 and state.absmax.numel() == 0
    assert state.nbytes == 0 and state.bits_per_param == 0.0
    if double_quant:
        assert float(state.offset) == 0.0 and state.nested_absmax.numel() == 0
    w = dequantize_nf4(state)
    assert w.shape == (0, 5) and w.dtype == torch.bfloat16


def test_several_chunks_inference_mode_and_errors_in_a_late_chunk():
    x = torch.randn(600_001)  # more than two chunks, and a ragged last block
    with torch.inference_mode():
        state = quantize_nf4(x)
        assert dequantize_nf4(state).is_inference()
    assert torch.equal(dequantize_nf4(state), dequantize_nf4(quantize_nf4(x)))
    assert ((dequantize_nf4(state) - x).abs().max() <= x.abs().max() * 0.16).item()
    x[550_001] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_nf4(x)
