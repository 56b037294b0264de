"""GPTQ against round-to-nearest (never worse on the calibration output) and against brute-force OBS (same weights)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from minilora.quant.affine import dequantize_affine, from_codes, grid_params, quantize_affine, to_codes
from minilora.quant.gptq import GPTQState, dequantize_gptq, gptq_quantize, hessian, quantize_model_gptq


def correlated_inputs(n: int, d: int, gen: torch.Generator, rank: int | None = None) -> torch.Tensor:
    """Rows x = z · M with a random mixing matrix M and a few strongly scaled features: correlated, uneven."""
    rank = rank or d
    z = torch.randn(n, rank, generator=gen, dtype=torch.float64)
    mix = torch.randn(rank, d, generator=gen, dtype=torch.float64)
    scale = torch.exp(torch.randn(d, generator=gen, dtype=torch.float64))
    return z @ mix * scale


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return torch.linalg.norm(x @ w.T.double() - x @ w_hat.T.double()).item()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), out_f=st.integers(8, 32), d=st.sampled_from([32, 64]),
       groupsize=st.sampled_from([8, 16, 32, None]), bits=st.sampled_from([3, 4, 8]), act_order=st.booleans())
def test_gptq_output_error_below_round_to_nearest_over_four_layers(seed, out_f, d, groupsize, bits, act_order):
    """Four random layers of one shape, at least 32 inputs and 8 outputs, 3 to 8 bits: GPTQ's summed output error
    is below plain rounding's. One layer alone is not enough: in 400 random layers the median ratio was 0.60 and
    the worst 0.99, but the search also found a layer where GPTQ loses (the next test)."""
    errors = []
    for k in range(4):
        gen = torch.Generator().manual_seed(seed + k)
        x = correlated_inputs(4 * d, d, gen)
        w = torch.randn(out_f, d, generator=gen)
        rtn = dequantize_affine(quantize_affine(w, bits, groupsize))
        gptq = dequantize_gptq(gptq_quantize(w, x.float(), bits, groupsize, damp=0.01, act_order=act_order))
        errors.append((output_error(x, w, gptq), output_error(x, w, rtn)))
    assert sum(g for g, _ in errors) < sum(r for _, r in errors), errors


def test_greedy_gptq_can_lose_to_round_to_nearest_on_a_small_layer():
    """An 8 x 32 layer at 3 bits, groups of 16 (found by the property search above): greedy GPTQ's output error
    is above plain rounding's by more than 10 %."""
    gen = torch.Generator().manual_seed(15)
    x = correlated_inputs(128, 32, gen)
    w = torch.randn(8, 32, generator=gen)
    rtn = output_error(x, w, dequantize_affine(quantize_affine(w, 3, 16)))
    gptq = output_error(x, w, dequantize_gptq(gptq_quantize(w, x.float(), 3, 16, damp=0.01)))
    assert gptq > 1.1 * rtn, (gptq, rtn)


def test_greedy_gptq_can_lose_to_round_to_nearest_on_a_tiny_layer():
    """GPTQ is greedy: each column is rounded once, given the updates so far. On a 6 x 4 layer at 8 bits (found
    by a random search; 2 of 600 tiny layers were like it at 8 bits) plain rounding happens to do better, even
    undamped. On 2-bit layers the grids found from updated weights lose more often."""
    gen = torch.Generator().manual_seed(485)
    x = correlated_inputs(16, 4, gen)
    w = torch.randn(6, 4, generator=gen).double()
    rtn = output_error(x, w, dequantize_affine(quantize_affine(w, 8, 4)))
    gptq = output_error(x, w, gptq_quantize(w, x, 8, 4, damp=0.0).dequantize())
    assert gptq > 1.05 * rtn


def test_gptq_clearly_beats_round_to_nearest_on_a_correlated_layer():
    gen = torch.Generator().manual_seed(0)
    x = correlated_inputs(2048, 256, gen, rank=64).float()
    w = torch.randn(64, 256, generator=gen) * 0.05
    rtn = output_error(x.double(), w, dequantize_affine(quantize_affine(w, 4, 128)))
    for act_order in (False, True):
        err = output_error(x.double(), w, dequantize_gptq(gptq_quantize(w, x, 4, 128, act_order=act_order)))
        assert err < 0.5 * rtn, (act_order, err, rtn)


def brute_force_obs(w: torch.Tensor, H: torch.Tensor, bits: int, groupsize: int, order: torch.Tensor):
    """Quantize columns one at a time in `order`; after each, move the remaining columns F by the OBS formula
    δ_F = -(w_q - quant(w_q)) / [H_F⁻¹]_qq · [H_F⁻¹]_{F,q} with H_F⁻¹ inverted explicitly for the columns left.
    A group's grid (S, Z) is found when its first column (in `order`) comes up, from the weights at that time."""
    w = w.double().clone()
    out_f, d = w.shape
    q_all = torch.zeros_like(w)
    remaining = order.tolist()
    for k, col in enumerate(order.tolist()):
        if k % groupsize == 0:
            s, z = grid_params(w[:, order[k:k + groupsize]], bits)
            s = s.float().double()
        Hinv = torch.linalg.inv(H[remaining][:, remaining])   # rows/cols of the columns not yet quantized
        q = to_codes(w[:, col], s, z, bits)
        err = w[:, col] - from_codes(q, s, z)
        w[:, remaining] -= err[:, None] * Hinv[:, 0][None, :] / Hinv[0, 0]
        q_all[:, col] = from_codes(q, s, z)
        remaining.remove(col)
    return q_all


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("groupsize", [3, 4, 12])
def test_cholesky_path_equals_brute_force_obs(act_order, groupsize):
    gen = torch.Generator().manual_seed(groupsize + 10 * act_order)
    x = correlated_inputs(60, 12, gen)
    w = torch.randn(6, 12, generator=gen, dtype=torch.float64)
    damp = 0.01
    H = hessian(x)
    Hd = H + damp * torch.diag(H).mean() * torch.eye(12, dtype=torch.float64)
    order = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(12)
    expected = brute_force_obs(w, Hd, 3, groupsize, order)
    state = gptq_quantize(w, x, bits=3, groupsize=groupsize, damp=damp, act_order=act_order)
    got = state.dequantize(torch.float64)
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()
    assert (got != 0).any()
    # and the OBS updates mattered: plain rounding gives different weights
    assert not torch.allclose(got, dequantize_affine(quantize_affine(w, 3, groupsize)).double(), atol=1e-6)


def test_state_layout_and_bits_per_param():
    gen = torch.Generator().manual_seed(1)
    x, w = correlated_inputs(512, 256, gen).float(), torch.randn(32, 256, generator=gen)
    s = gptq_quantize(w, x, 4, 128)
    assert s.perm is None and s.affine.codes.numel() == 32 * 256 // 2 and s.affine.scale.shape == (32, 2)
    assert s.bits_per_param == pytest.approx(4 + 40 / 128)
    s = gptq_quantize(w, x, 4, 128, act_order=True)
    assert s.perm.dtype == torch.int32 and sorted(s.perm.tolist()) == list(range(256))
    assert s.bits_per_param == pytest.approx(4 + 40 / 128 + 32 * 256 / (32 * 256))
    # the stored columns are the permuted ones; dequantize restores the original order
    w_hat = s.dequantize()
    assert torch.equal(w_hat[:, s.perm.long()], dequantize_affine(s.affine))


def test_dead_inputs_get_zero_weight_and_no_nan():
    gen = torch.Generator().manual_seed(2)
    x = correlated_inputs(200, 16, gen).float()
    x[:, 3] = 0
    w = torch.randn(5, 16, generator=gen)
    w_hat = gptq_quantize(w, x, 4, 8).dequantize()
    assert torch.isfinite(w_hat).all() and (w_hat[:, 3] == 0).all()


def test_bad_arguments_get_clear_errors():
    w, x = torch.randn(4, 16), torch.randn(32, 16)
    with pytest.raises(ValueError, match="16 features"):
        gptq_quantize(w, torch.randn(32, 12), 4, 8)
    with pytest.raises(ValueError, match="bits"):
        gptq_quantize(w, x, 9, 8)
    with pytest.raises(ValueError, match="groupsize=5 does not divide"):
        gptq_quantize(w, x, 4, 5)
    with pytest.raises(ValueError, match="2-D"):
        gptq_quantize(torch.randn(16), x, 4, 8)
    with pytest.raises(TypeError, match="must be float32, float16, bfloat16 or float64"):
        gptq_quantize(w, x.long(), 4, 8)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(w, x, 4, 8, damp=-0.1)
    with pytest.raises(TypeError, match="GPTQState"):
        dequantize_gptq(quantize_affine(w, 4, 8))


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_quantize_model_gptq_takes_each_layers_inputs_from_the_quantized_model_before_it():
    torch.manual_seed(0)
    model = TwoLayers()
    reference = TwoLayers()
    reference.load_state_dict(model.state_dict())
    batches = [correlated_inputs(64, 16, torch.Generator().manual_seed(i)).float() for i in range(3)]
    states = quantize_model_gptq(model, batches, ["fc1", "fc2"], bits=4, groupsize=8)
    assert list(states) == ["fc1", "fc2"] and all(isinstance(s, GPTQState) for s in states.values())
    # fc1 by hand on the raw inputs; fc2 on the inputs the quantized fc1 produces
    x = torch.cat(batches)
    s1 = gptq_quantize(reference.fc1.weight, x, 4, 8)
    assert torch.allclose(model.fc1.weight, s1.dequantize(), atol=1e-6)
    h = torch.relu(x @ s1.dequantize().T + reference.fc1.bias)
    s2 = gptq_quantize(reference.fc2.weight, h, 4, 8)
    assert torch.allclose(model.fc2.weight, s2.dequantize(), atol=1e-5)
    with pytest.raises(ValueError, match="match no module"):
        quantize_model_gptq(model, batches, ["nope"])
