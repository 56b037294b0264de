"""Hostile input to GPTQ and LLM.int8(): finite in gives finite out or one clear refusal, and a refusal changes nothing."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from minilora.llm_int8 import Int8Linear
from minilora.quant.gptq import gptq_quantize, quantize_model_gptq


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.unused = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(16, 8)
        self.fc = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        return self.lm_head(torch.relu(self.fc(self.wte(idx))))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was changed by a refused call"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_of_a_finite_weight_near_its_dtypes_limit_is_finite(dtype, act_order):
    """Error feedback pushes weights past the dtype's max; the grid must still be representable.
    (Measured, seed 0: max error / max |w| 0.141-0.167 at 4 bits, 0.004-0.007 at 8 bits; bounds 2x looser.)"""
    torch.manual_seed(0)
    w = ((torch.rand(6, 16) * 2 - 1) * torch.finfo(dtype).max * 0.99).to(dtype)
    for bits, bound in [(4, 0.35), (8, 0.015)]:
        w_hat = gptq_quantize(w, torch.randn(40, 16), bits=bits, groupsize=8, act_order=act_order).dequantize().float()
        assert torch.isfinite(w_hat).all()
        assert (w_hat - w.float()).abs().max() <= bound * w.float().abs().max()
    w = torch.full((4, 8), 3e38, dtype=dtype if dtype != torch.float16 else torch.float32)
    w[:, ::2] = -3e38
    assert torch.isfinite(gptq_quantize(w, torch.randn(32, 8), bits=4, groupsize=None).dequantize()).all()


def test_gptq_refuses_a_float64_weight_whose_scales_would_not_fit_float32():
    with pytest.raises(ValueError, match="stores its scales in float32"):
        gptq_quantize(torch.full((2, 4), 1e300, dtype=torch.float64), torch.randn(8, 4), groupsize=None)


def test_gptq_of_a_huge_weight_is_the_scaled_gptq_of_a_small_one():
    """GPTQ is scale-equivariant: w · 2^120 (beyond float32's safe range) gives 2^120 times the float64 result."""
    torch.manual_seed(0)
    w, x = torch.randn(6, 16), torch.randn(40, 16)
    big = gptq_quantize(w * 2.0 ** 120, x, bits=4, groupsize=8).dequantize()
    small = gptq_quantize(w.double(), x, bits=4, groupsize=8).dequantize().float()
    torch.testing.assert_close(big / 2.0 ** 120, small, rtol=1e-6, atol=0)


def test_gptq_refuses_a_weight_with_no_columns_or_rows_by_name():
    for shape in [(4, 0), (0, 4)]:
        with pytest.raises(ValueError, match="weight must have at least one row and one column"):
            gptq_quantize(torch.zeros(shape), torch.zeros(3, shape[1]), groupsize=None)


def test_gptq_of_a_tied_lm_head_refuses_and_leaves_the_embedding_unchanged():
    torch.manual_seed(0)
    model = TiedLM()
    before = snapshot(model)
    batches = [torch.randint(0, 16, (2, 5))]
    with pytest.raises(ValueError, match=r"'lm_head'.*shares its weight with 'wte'"):
        quantize_model_gptq(model, batches, ["fc", "lm_head"], groupsize=None)
    assert_unchanged(model, before)
    # untied as the message says: lm_head is quantized, the embedding is not touched
    model.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())
    quantize_model_gptq(model, batches, ["fc", "lm_head"], groupsize=None)
    assert torch.equal(model.wte.weight, before["wte.weight"])
    assert not torch.equal(model.lm_head.weight, before["wte.weight"])


def test_gptq_target_the_forward_never_reaches_is_refused_before_any_change():
    torch.manual_seed(0)
    model = TwoLayers()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'unused'.*never reache"):
        quantize_model_gptq(model, [torch.randn(16, 8)], ["fc1", "fc2", "unused"], groupsize=None)
    assert_unchanged(model, before)


def test_gptq_failure_in_a_later_layer_restores_the_earlier_ones():
    torch.manual_seed(0)
    model = TwoLayers()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")   # found only when fc2's turn comes, after fc1 was quantized
    before = snapshot(model)
    with pytest.raises(ValueError, match="fc2"):
        quantize_model_gptq(model, [torch.randn(16, 8)], ["fc1", "fc2"], groupsize=None)
    for k, v in model.state_dict().items():     # fc1 back to its original weight; fc2 as it was, NaN included
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)


def test_gptq_of_a_model_names_the_layer_whose_calibration_inputs_are_empty_or_not_finite():
    torch.manual_seed(0)
    model = TwoLayers()
    before = snapshot(model)
    with pytest.raises(ValueError, match="'fc1'.*no input rows"):
        quantize_model_gptq(model, [torch.randn(0, 8)], ["fc1", "fc2"], groupsize=None)
    assert_unchanged(model, before)
    with torch.no_grad():
        model.fc1.weight.fill_(3e38)          # finite, but fc1 outputs overflow to inf: fc2 gets no finite input
    before = snapshot(model)
    with pytest.raises(ValueError, match="'fc2'.*not finite"):
        quantize_model_gptq(model, [torch.randn(16, 8)], ["fc1", "fc2"], groupsize=None)
    assert_unchanged(model, before)


def test_int8_linear_refuses_integer_input_by_name():
    layer = Int8Linear.from_linear(nn.Linear(4, 3))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        layer(torch.ones(2, 4, dtype=torch.long))


def test_int8_linear_refuses_a_0_dim_input():
    layer = Int8Linear.from_linear(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="at least one dimension"):
        layer(torch.tensor(1.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_int8_linear_refuses_non_finite_weights_at_construction(bad):
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight[1, 2] = bad
    with pytest.raises(ValueError, match="linear.weight holds NaN or Inf"):
        Int8Linear.from_linear(linear)
    codes, absmax = torch.zeros(3, 4, dtype=torch.int8), torch.tensor([1.0, bad, 1.0])
    with pytest.raises(ValueError, match="weight_absmax must be finite and >= 0"):
        Int8Linear(codes, absmax, None)


def test_int8_linear_fp16_overflow_is_an_error_naming_the_compute_dtype():
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    x[0, 1] = 1e5                       # beyond float16's largest value, 65504
    with pytest.raises(OverflowError, match="float16"):
        Int8Linear.from_linear(linear)(x)
    y = Int8Linear.from_linear(linear, compute_dtype=torch.float32)(x)   # the remedy the message names
    assert torch.isfinite(y).all()
    assert torch.allclose(y, linear(x), rtol=0.02, atol=0.02 * 1e5)
    x[0, 1] = 3e4                       # fits float16, but the 16-bit outlier product may not
    layer = Int8Linear.from_linear(nn.Linear(4, 3))
    with torch.no_grad():
        layer.weight_absmax.fill_(4.0)
        layer.weight_codes.fill_(127)
    with pytest.raises(OverflowError, match="float16"):
        layer(x)
    x16 = torch.full((1, 4), 3e4, dtype=torch.float16)   # float32 compute, but the float16 result overflows
    with pytest.raises(OverflowError, match="the input's dtype torch.float16"):
        Int8Linear(layer.weight_codes, layer.weight_absmax, None, compute_dtype=torch.float32)(x16)
    layer(torch.randn(2, 4))            # ordinary input still works, and NaN input is passed through, not refused
    assert torch.isnan(layer(torch.full((1, 4), float("nan")))).all()
