"""LLM.int8(): the int8 part is exact integer arithmetic, outlier columns go through 16-bit, and the layer agrees
with bitsandbytes' Linear8bitLt (which runs on the CPU) where that is installed."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from minilora.llm_int8 import Int8Linear, int8_matmul_outliers, outlier_columns, vectorwise_quantize


def inputs_with_outliers(n: int, d: int, cols: list[int], gen: torch.Generator, size: float = 20.0) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen)
    x[:, cols] *= size          # systematic outlier features, as in the paper
    return x


def test_int8_part_is_exact_integer_arithmetic():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 300, generator=gen), torch.randn(5, 300, generator=gen)
    cw, sw = vectorwise_quantize(w)
    cx, sx = vectorwise_quantize(x)
    exact = (cx.long() @ cw.long().T)                                  # int64: no rounding at all
    expected = exact.double() * (sx.double()[:, None] * sw.double()[None, :]) / 127**2
    got = int8_matmul_outliers(x, cw, sw, threshold=0.0, compute_dtype=torch.float32)
    assert torch.allclose(got.double(), expected, rtol=1e-6, atol=1e-6)
    assert cw.dtype == torch.int8 and cw.abs().max() == 127 and sw.shape == (5,)


def test_outlier_columns_are_computed_in_16_bit_and_rescue_the_rows():
    gen = torch.Generator().manual_seed(1)
    x = inputs_with_outliers(32, 64, [3, 40], gen)
    linear = nn.Linear(64, 16, bias=False)
    assert outlier_columns(x, 6.0).tolist() == [3, 40]
    layer = Int8Linear.from_linear(linear, threshold=6.0, compute_dtype=torch.float32)
    plain = Int8Linear.from_linear(linear, threshold=0.0, compute_dtype=torch.float32)
    reference = x @ layer.dequantized_weight().T       # the weight error alone, no activation rounding
    err_mixed = (layer(x) - reference).norm()
    err_plain = (plain(x) - reference).norm()
    assert err_mixed < 0.25 * err_plain, (err_mixed, err_plain)
    # the outlier part alone: zero the regular columns and the result is the 16-bit product exactly
    only = torch.zeros_like(x)
    only[:, [3, 40]] = x[:, [3, 40]]
    assert torch.allclose(layer(only), only @ layer.dequantized_weight().T, atol=1e-5)


def test_layer_shapes_bias_dtype_and_storage():
    linear = nn.Linear(48, 24)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, 5, 48)
    y = layer(x)
    assert y.shape == (2, 5, 24) and y.dtype == torch.float32
    assert torch.allclose(y, linear(x), atol=0.05)
    assert layer.quantized_nbytes == 48 * 24 + 4 * 24               # 8 + 32/48 bits per parameter
    assert not any(p.requires_grad for p in layer.parameters())


def test_bad_arguments_get_clear_errors():
    layer = Int8Linear.from_linear(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="8 features"):
        layer(torch.randn(3, 6))
    with pytest.raises(ValueError, match="threshold"):
        Int8Linear.from_linear(nn.Linear(8, 4), threshold=-1.0)
    with pytest.raises(TypeError, match="nn.Linear"):
        Int8Linear.from_linear(nn.Conv1d(8, 4, 1))
    with pytest.raises(ValueError, match="compute_dtype"):
        Int8Linear.from_linear(nn.Linear(8, 4), compute_dtype=torch.int8)


def _bnb_layer(bnb, linear: nn.Linear):
    ref = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=True, has_fp16_weights=False,
                              threshold=6.0)
    ref.weight = bnb.nn.Int8Params(linear.weight.data.half().clone(), requires_grad=False, has_fp16_weights=False)
    ref.bias = nn.Parameter(linear.bias.data.half().clone(), requires_grad=False)
    # eval(): in training mode on the CPU bitsandbytes takes MatMul8bitFp (dequantize W, float matmul, no int8
    # activations); in eval mode it runs the LLM.int8() matmul, MatMul8bitLt
    return ref.eval()


@pytest.mark.parametrize("whole_columns", [True, False])
def test_matches_bitsandbytes_linear8bitlt_on_cpu(whole_columns):
    """Same int8 weight byte for byte; same activation codes and output up to fp16 rounding (bitsandbytes rounds
    its int8 part to fp16, then adds the outlier part in an fp16 addmm) where every element of an outlier column
    is an outlier. Otherwise bitsandbytes takes the row absmax before zeroing the small elements of outlier
    columns (a larger scale for those rows) and ours over the regular columns only: ours is then no less exact."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the reference for Linear8bitLt")
    gen = torch.Generator().manual_seed(2)
    linear = nn.Linear(128, 48).half().float()             # weights representable in fp16, as bnb casts them
    x = inputs_with_outliers(16, 128, [5, 77, 100], gen)
    if whole_columns:
        x[:, [5, 77, 100]] = torch.sign(x[:, [5, 77, 100]]) * (6.5 + x[:, [5, 77, 100]].abs())
    x = x.half()
    ref = _bnb_layer(bnb, linear)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(x).float()
    ours = Int8Linear.from_linear(linear, threshold=6.0, compute_dtype=torch.float16)
    cb = ref.weight.CB if ref.weight.CB is not None else ref.state.CB   # on the CPU it is made in forward
    scb = ref.weight.SCB if ref.weight.SCB is not None else ref.state.SCB
    assert torch.equal(ours.weight_codes, cb)                     # the same int8 weight, byte for byte
    assert torch.allclose(ours.weight_absmax, scb.float())
    got = ours(x).float()
    exact = x.float() @ linear.weight.T + linear.bias
    if whole_columns:
        codes, absmax, cols = bnb.functional.int8_vectorwise_quant(x.clone(), threshold=6.0)
        regular = x.clone()
        regular[:, outlier_columns(x, 6.0)] = 0
        assert torch.equal(outlier_columns(x, 6.0), cols) and cols.tolist() == [5, 77, 100]
        assert torch.equal(vectorwise_quantize(regular)[0], codes)
        assert torch.equal(vectorwise_quantize(regular)[1], absmax)
        assert (got - expected).abs().max() < 4e-3 * exact.abs().max(), (got - expected).abs().max()
    else:
        # against the int8 weight itself, so that only the rounding of the activations is compared
        w_int8 = x.float() @ ours.dequantized_weight().T + linear.bias
        assert (got - w_int8).norm() <= (expected - w_int8).norm()
