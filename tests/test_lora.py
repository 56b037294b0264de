import math

import pytest
import torch
import torch.nn as nn

from minilora import GPT, LoRALinear, add_lora, count_parameters, lora_layers, merge_lora


def make_layer(r=4, alpha=8.0, **kw):
    torch.manual_seed(0)
    return LoRALinear(nn.Linear(20, 12), r=r, alpha=alpha, **kw)


def test_starts_as_the_base_layer_and_computes_w0_plus_scaled_ba():
    layer = make_layer()
    x = torch.randn(5, 20)
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0 at init
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (12, 4)
    assert layer.lora_A.abs().sum() > 0
    nn.init.normal_(layer.lora_B)
    w = layer.base_layer.weight + (8.0 / 4) * layer.lora_B @ layer.lora_A
    assert torch.allclose(layer(x), x @ w.t() + layer.base_layer.bias, atol=1e-5)


def test_rslora_and_gaussian_init():
    assert make_layer(r=4, alpha=8.0, use_rslora=True).scaling == pytest.approx(8.0 / math.sqrt(4))
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(512, 512), r=8, init="gaussian")
    assert layer.lora_A.std().item() == pytest.approx(1 / 8, rel=0.05)
    kaiming = LoRALinear(nn.Linear(512, 512), r=8)
    bound = 1 / math.sqrt(512)  # kaiming_uniform(a=sqrt(5)) on fan_in = 512
    assert kaiming.lora_A.abs().max() <= bound and kaiming.lora_A.abs().max() > 0.9 * bound


def test_only_adapters_get_gradients():
    layer = make_layer()
    nn.init.normal_(layer.lora_B)
    layer(torch.randn(3, 20)).sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


@pytest.mark.parametrize("hooked", [False, True], ids=["plain-base", "hooked-base"])
def test_forward_and_gradients_equal_the_definition(hooked):
    """y = x W0ᵀ + b + s·(x Aᵀ) Bᵀ on a (2, 3, in) input, with W0 and b trained too: the output and the gradients
    of x, W0, b, A and B equal those of the formula written out (a plain base takes the in-place path, a hooked
    one the copy)."""
    layer = make_layer()
    nn.init.normal_(layer.lora_B)
    layer.base_layer.requires_grad_(True)
    if hooked:
        layer.base_layer.register_forward_hook(lambda module, args, out: None)
    x = torch.randn(2, 3, 20, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    ours = [t.grad.clone() for t in (x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B)]
    leaves = [t.detach().clone().requires_grad_() for t in (x, layer.base_layer.weight, layer.base_layer.bias,
                                                             layer.lora_A, layer.lora_B)]
    x0, w0, b0, a0, b_lora = leaves
    ref = x0 @ w0.t() + b0 + layer.scaling * (x0 @ a0.t()) @ b_lora.t()
    ref.backward(g)
    torch.testing.assert_close(y, ref)
    for got, leaf in zip(ours, leaves):
        torch.testing.assert_close(got, leaf.grad)


def test_merge_unmerge_agree_and_double_merge_is_an_error():
    layer = make_layer()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(7, 20)
    before = layer(x)
    w0 = layer.base_layer.weight.clone()
    layer.merge()
    after = layer(x)
    assert ((after - before).norm() / before.norm()).item() < 1e-5
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, w0, atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_dropout_applies_to_the_lora_path_only():
    layer = make_layer(dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 20)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, b)
    layer.lora_B.data.zero_()
    assert torch.equal(layer(x), layer.base_layer(x))  # the base path is never dropped


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "rank"), (dict(r=-1), "rank"), (dict(r=13), "exceeds"), (dict(alpha=0), "alpha"),
    (dict(dropout=1.0), "dropout"), (dict(init="xavier"), "init"),
])
def test_bad_arguments(kwargs, match):
    args = dict(r=4, alpha=8.0) | kwargs
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(20, 12), **args)


def test_add_lora_targets_by_name_suffix_and_regex(tiny_gpt):
    add_lora(tiny_gpt, ["c_attn", r"transformer\.h\.1\.mlp\.c_fc"], r=2, alpha=4)
    names = sorted(lora_layers(tiny_gpt))
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    trainable = [n for n, p in tiny_gpt.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    expected = 2 * (2 * (32 + 96)) + 2 * (32 + 128)
    assert count_parameters(tiny_gpt).trainable == expected


def test_add_lora_errors(tiny_gpt):
    with pytest.raises(ValueError, match="matches no module"):
        add_lora(tiny_gpt, ["q_proj"])
    with pytest.raises(TypeError, match="LayerNorm"):
        add_lora(tiny_gpt, ["ln_1"])
    add_lora(tiny_gpt, ["c_attn"], r=2)
    with pytest.raises(ValueError, match="already has"):
        add_lora(tiny_gpt, ["c_attn"], r=2)


def test_merge_lora_gives_a_plain_model_with_the_same_outputs(tiny_gpt):
    add_lora(tiny_gpt, ["c_attn", "c_proj", "c_fc"], r=4, alpha=8)
    for layer in lora_layers(tiny_gpt).values():
        nn.init.normal_(layer.lora_B, std=0.05)
    tiny_gpt.eval()
    idx = torch.randint(0, 97, (2, 12))
    before = tiny_gpt(idx)
    merged = merge_lora(tiny_gpt)
    assert not lora_layers(merged)
    assert all(type(m) is not LoRALinear for m in merged.modules())
    after = merged(idx)
    assert ((after - before).norm() / before.norm()).item() < 1e-5
    assert isinstance(merged, GPT)


@pytest.mark.parametrize("kwargs", [
    dict(r=True), dict(r=2.0), dict(r="4"), dict(alpha=float("nan")), dict(alpha=float("inf")), dict(alpha=True),
    dict(dropout=float("nan")), dict(dropout=-0.1), dict(use_rslora="yes"),
])
def test_non_finite_and_wrongly_typed_settings_are_refused(kwargs):
    args = dict(r=4, alpha=8.0) | kwargs
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name if name != "r" else "rank"):
        LoRALinear(nn.Linear(20, 12), **args)


def test_a_failed_add_lora_leaves_the_model_as_it_was(tiny_gpt):
    frozen = tiny_gpt.transformer.h[0].attn.c_attn.weight.requires_grad_(False)
    modules = dict(tiny_gpt.named_modules())
    flags = {n: p.requires_grad for n, p in tiny_gpt.named_parameters()}
    for targets, kw, error in [(["c_attn", "ln_1"], {}, TypeError), (["c_attn", "c_fc"], dict(alpha=float("nan")), ValueError),
                               (["c_attn"], dict(r=True), ValueError), (["c_fc", "c_attn"], dict(r=40), ValueError)]:
        with pytest.raises(error):
            add_lora(tiny_gpt, targets, **kw)
        assert dict(tiny_gpt.named_modules()) == modules and not lora_layers(tiny_gpt)
        assert {n: p.requires_grad for n, p in tiny_gpt.named_parameters()} == flags
    assert not frozen.requires_grad
