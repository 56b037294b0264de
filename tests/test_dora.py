import copy
import json

import pytest
import torch
import torch.nn as nn

from adapter_checks import perturb, rel_err
from minilora import GPT, add_lora, add_qlora, load_adapter, load_qlora_adapter, lora_layers, save_adapter
from minilora import DoRALinear, QDoRALinear

peft = pytest.importorskip("peft", reason="peft (dev extra) is the reference for DoRA")

TARGETS = ["c_attn", "c_fc", "attn.c_proj"]


def peft_dora(hf, targets, alpha, seed, out):
    """PEFT's DoRA (r = 3) on transformers' GPT-2, B and m moved off their start, saved into out."""
    config = peft.LoraConfig(r=3, lora_alpha=alpha, target_modules=targets, use_dora=True, fan_in_fan_out=True,
                             task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(0.1 * torch.randn_like(p))
    theirs.save_pretrained(out)
    return theirs


def test_dora_layer_is_its_equation():
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    layer = DoRALinear(base, r=3, alpha=6)
    x = torch.randn(5, 24)
    assert torch.allclose(layer(x), base(x), atol=1e-6)  # m = ‖W0‖ and B = 0: the layer starts as the base
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude_vector.normal_()
    v = base.weight + layer.scaling * layer.lora_B @ layer.lora_A
    w = layer.lora_magnitude_vector[:, None] * v / v.norm(dim=1, keepdim=True)
    assert rel_err(layer(x), x @ w.t() + base.bias) < 1e-6
    layer(x).sum().backward()  # the norm is a constant for backward; m, A and B all get gradients
    assert all(p.grad is not None for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector))
    assert base.weight.grad is None


def test_minilora_dora_adapter_loads_into_peft_with_equal_logits(hf_gpt2_dir, tmp_path):
    path, hf = hf_gpt2_dir
    ours = GPT.from_pretrained(path).eval()
    idx = torch.randint(0, 101, (2, 15))
    with torch.no_grad():
        base = ours(idx)
    add_lora(ours, TARGETS, r=4, alpha=8, use_dora=True)
    assert all(isinstance(l, DoRALinear) for l in lora_layers(ours).values())
    assert any(n.endswith("lora_magnitude_vector") for n, p in ours.named_parameters() if p.requires_grad)
    perturb(ours)
    save_adapter(ours, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval()
    with torch.no_grad():
        a, b = ours(idx), theirs(input_ids=idx).logits
    assert rel_err(a, b) < 1e-5
    assert rel_err(a, base) > 1e-3  # the adapter really changed the logits


def test_peft_dora_adapter_loads_into_minilora_with_equal_logits(hf_gpt2_dir, tmp_path):
    path, hf = hf_gpt2_dir
    theirs = peft_dora(hf, ["c_attn", "c_fc"], alpha=6, seed=3, out=tmp_path / "peft").eval()
    ours = load_adapter(GPT.from_pretrained(path).eval(), tmp_path / "peft")
    assert len(lora_layers(ours)) == 2 * 3 and all(isinstance(l, DoRALinear) for l in lora_layers(ours).values())
    idx = torch.randint(0, 101, (2, 15))
    with torch.no_grad():
        assert rel_err(ours(idx), theirs(input_ids=idx).logits) < 1e-5


def test_dora_merge_and_unmerge(tiny_gpt):
    add_lora(tiny_gpt, ["c_attn", "c_fc"], r=2, use_dora=True)
    perturb(tiny_gpt, seed=1)
    tiny_gpt.eval()
    idx = torch.randint(0, 97, (2, 9))
    w0 = {n: l.base_layer.weight.clone() for n, l in lora_layers(tiny_gpt).items()}
    with torch.no_grad():
        before = tiny_gpt(idx)
        for layer in lora_layers(tiny_gpt).values():
            layer.merge()
        merged = tiny_gpt(idx)
        for layer in lora_layers(tiny_gpt).values():
            layer.unmerge()
        after = tiny_gpt(idx)
    assert rel_err(merged, before) < 1e-5 and rel_err(after, before) < 1e-5
    for n, layer in lora_layers(tiny_gpt).items():
        assert torch.allclose(layer.base_layer.weight, w0[n], atol=1e-5)


def bnb_copy(hf, names):
    """The transformers GPT-2 with each named Conv1D replaced by a bitsandbytes NF4 Linear4bit holding its
    weight (as out × in), double quantization, fp32 compute."""
    bnb = pytest.importorskip("bitsandbytes")
    model = copy.deepcopy(hf)
    for name in names:
        conv = model.get_submodule(name)
        w = conv.weight.data.t().contiguous()  # Conv1D stores in × out
        q = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=True, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=True)
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
        q.bias = nn.Parameter(conv.bias.data.clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to("cpu"))
    return model


def test_dora_on_nf4_base_equals_peft_on_bitsandbytes(tmp_path):
    # Two things about bitsandbytes 0.50 on a CPU decide this test's shape. Its dequantization is wrong for a
    # weight whose rows are not a whole number of 64-blocks (48 wide: up to 0.03 off where minilora's error is
    # 0.009), so the widths are multiples of 64. And a Linear4bit that has been put in eval mode gives outputs
    # about 1e-3 off its own dequantized weight from then on, so PEFT's model stays in train mode, dropout 0.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=101, n_positions=40, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))
    hf.save_pretrained(tmp_path / "base", safe_serialization=True)
    plain = GPT.from_pretrained(tmp_path / "base").eval()
    ours = copy.deepcopy(plain)
    add_qlora(ours, TARGETS, r=4, alpha=8, compute_dtype=torch.float32, use_dora=True)
    layers = lora_layers(ours)
    assert all(isinstance(l, QDoRALinear) for l in layers.values()) and len(layers) == 6
    perturb(ours, seed=2)
    save_adapter(ours, tmp_path / "q")
    theirs_base = bnb_copy(hf, list(layers))
    import bitsandbytes as bnb
    for name, layer in layers.items():  # the same 4-bit weight on both sides
        bnb_w = theirs_base.get_submodule(name).weight
        deq = bnb.functional.dequantize_4bit(bnb_w.data, bnb_w.quant_state)
        assert torch.equal(deq.float(), layer.base_layer.dequantized_weight(torch.float32))
    theirs = peft.PeftModel.from_pretrained(theirs_base, tmp_path / "q").train()
    idx = torch.randint(0, 101, (2, 15))
    with torch.no_grad():
        a, b = ours.eval()(idx), theirs(input_ids=idx).logits
    assert rel_err(a, b) < 1e-5
    again = load_qlora_adapter(copy.deepcopy(plain), tmp_path / "q")  # and back into minilora
    with torch.no_grad():
        assert rel_err(again(idx), a) < 1e-5


def test_dora_gradients_equal_peft(hf_gpt2_dir, tmp_path):
    """Training, not only the forward: one loss's gradients for A, B and m equal PEFT's DoRA on the same adapter."""
    path, hf = hf_gpt2_dir
    theirs = peft_dora(hf, ["c_attn", "c_fc", "attn.c_proj"], alpha=12, seed=4, out=tmp_path / "peft").train()
    ours = load_adapter(GPT.from_pretrained(path), tmp_path / "peft").train()
    for name, p in ours.named_parameters():
        p.requires_grad_("lora_" in name)
    idx = torch.randint(0, 101, (2, 15))

    def loss(logits):
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 101), idx[:, 1:].reshape(-1))

    loss(theirs(input_ids=idx).logits).backward()
    loss(ours(idx)).backward()
    peft_grads = {n.replace("base_model.model.", "").replace(".default", "").removesuffix(".weight"): p.grad
                  for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert len(ours_grads) == 3 * 3 * 3 and set(ours_grads) <= set(peft_grads)  # A, B, m × 3 targets × 3 blocks
    for name, g in ours_grads.items():
        assert g is not None and g.abs().sum() > 0, name
        assert rel_err(g, peft_grads[name].reshape(g.shape)) < 1e-5, name
