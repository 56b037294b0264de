"""Int8 absmax: the lecture's example, its error bound, and the teaching double quantization (5x5 -> 34 bytes)."""
import pytest
import torch

from minilora.quant import (dequantize_int8, double_dequantize_int8, double_quantize_int8, error_bound_int8,
                            quantize_int8)

SLIDE_X = [1.5, 2.3, 3.7, 4.1, 5.6, 6.8, 7.9, 8.4, 9.2, 10.2]
WEIGHTS_5x5 = [[-0.7, -0.3, 0.0, -0.4, 0.3], [-1.0, 0.2, 0.7, 1.7, -0.9], [-0.1, -1.5, -0.1, 0.8, 0.5],
               [1.2, -1.7, -0.9, -0.3, 0.7], [0.4, 0.1, -1.4, 2.2, -1.1]]


def test_slide_example_with_round_to_nearest():
    # c = 127/10.2 = 12.4509...; round(12.4509 · 1.5) = round(18.68) = 19 and round(12.4509 · 5.6) = 70,
    # where the slide prints 18 and 69. The other eight values agree with the slide.
    q, absmax = quantize_int8(torch.tensor(SLIDE_X))
    assert absmax.tolist() == [pytest.approx(10.2)]
    assert q.tolist() == [19, 29, 46, 51, 70, 85, 98, 105, 115, 127]
    assert q.dtype == torch.int8
    x_back = dequantize_int8(q, absmax)
    assert (x_back - torch.tensor(SLIDE_X)).abs().max() <= 10.2 / 254


def test_blockwise_int8_bound_and_outlier_isolation():
    torch.manual_seed(0)
    x = torch.randn(1000)
    x[3] = 80.0  # an outlier: only its block gets a coarse scale
    for blocksize in (None, 64, 7):
        q, absmax = quantize_int8(x, blocksize)
        err = (dequantize_int8(q, absmax, blocksize) - x).abs()
        assert (err <= error_bound_int8(absmax, blocksize, x.numel())).all()
    q, absmax = quantize_int8(x, 64)
    blockwise = (dequantize_int8(q, absmax, 64) - x).abs()
    q, absmax = quantize_int8(x, None)
    whole = (dequantize_int8(q, absmax) - x).abs()
    assert blockwise[64:].max() <= 5 / 254          # blocks without the outlier keep fine buckets
    assert whole.mean() > 5 * blockwise.mean()      # one scale for all: every bucket is 80/127 wide


def test_lecture_double_quantization_34_bytes():
    w = torch.tensor(WEIGHTS_5x5)
    assert w.numel() * w.element_size() == 100
    state = double_quantize_int8(w, blocksize=5)
    assert state.q.shape == (5, 5) and state.c1.shape == (5,) and state.c2.shape == ()
    assert state.nbytes == 25 + 5 + 4 == 34
    # blocks are the rows; c1 = row absmax, c2 = 2.2; |w - w''| <= a_b/254 + c2/254 (+ rounding)
    w2 = double_dequantize_int8(state)
    a = w.abs().amax(1, keepdim=True)
    assert ((w - w2).abs() <= a / 254 + 2.2 / 254 + 1e-6).all()
    assert state.c2.item() == pytest.approx(2.2) and state.c1.tolist() == [40, 98, 87, 98, 127]


def test_int8_zero_block_and_bad_input():
    q, absmax = quantize_int8(torch.zeros(10), 5)
    assert q.abs().sum() == 0 and absmax.tolist() == [0.0, 0.0]
    assert torch.equal(dequantize_int8(q, absmax, 5), torch.zeros(10))
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_int8(torch.tensor([1.0, float("inf")]))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        quantize_int8(torch.arange(4))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_int8(torch.ones(4), 0)
