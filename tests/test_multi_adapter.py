import copy
import json

import pytest
import torch

from adapter_checks import perturb, rel_err
from minilora import (GPT, NF4Linear, active_adapter, add_lora, add_qlora, adapter_names, delete_adapter,
                      disable_adapters, load_adapter, lora_layers, merge_lora, merge_qlora, save_adapter, set_adapter)
from minilora.quant import quantize_nf

peft = pytest.importorskip("peft", reason="peft (dev extra) is the reference for named adapters")


def two_adapters(model):
    """'default' (r=4 on c_attn, c_fc) and 'shout' (r=2, alpha=8 on c_attn and attn.c_proj), both perturbed."""
    add_lora(model, ["c_attn", "c_fc"], r=4, alpha=8)
    add_lora(model, ["c_attn", "attn.c_proj"], r=2, alpha=8, adapter_name="shout")
    perturb(model)
    return model.eval()


def test_two_named_adapters_equal_peft_both_ways(hf_gpt2_dir, tmp_path):
    path, hf = hf_gpt2_dir
    ours = two_adapters(GPT.from_pretrained(path))
    assert adapter_names(ours) == ["default", "shout"] and active_adapter(ours) == "default"
    save_adapter(ours, tmp_path / "both")  # PEFT's layout: default at the top, the others in subfolders
    assert (tmp_path / "both" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "both" / "shout" / "adapter_config.json").read_text())["r"] == 2
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "both").eval()
    theirs.load_adapter(tmp_path / "both" / "shout", adapter_name="shout")
    idx = torch.randint(0, 101, (3, 12))
    logits = {}
    for name in ("default", "shout"):
        set_adapter(ours, name)
        theirs.set_adapter(name)
        with torch.no_grad():
            logits[name] = ours(idx)
            assert rel_err(logits[name], theirs(input_ids=idx).logits) < 1e-5
    assert rel_err(logits["default"], logits["shout"]) > 1e-3
    theirs.save_pretrained(tmp_path / "peft")  # and PEFT's two-adapter folder back into minilora
    back = load_adapter(GPT.from_pretrained(path).eval(), tmp_path / "peft")
    load_adapter(back, tmp_path / "peft" / "shout", adapter_name="shout")
    for name in ("default", "shout"):
        set_adapter(back, name)
        with torch.no_grad():
            assert rel_err(back(idx), logits[name]) < 1e-5


def test_mixed_batch_equals_peft_and_each_example_alone(hf_gpt2_dir):
    path, hf = hf_gpt2_dir
    ours = two_adapters(GPT.from_pretrained(path))
    idx = torch.randint(0, 101, (5, 12))
    names = ["shout", "default", "__base__", "shout", "default"]
    with torch.no_grad():
        mixed = ours(idx, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with disable_adapters(ours):
                    alone = ours(idx[i:i + 1])
            else:
                set_adapter(ours, name)
                alone = ours(idx[i:i + 1])
            assert rel_err(mixed[i:i + 1], alone) < 1e-5, name
    assert all(l.row_adapters is None for l in lora_layers(ours).values())  # the names do not outlive the call
    theirs = copy.deepcopy(hf)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                         fan_in_fan_out=True, init_lora_weights=False))
    theirs.add_adapter("shout", peft.LoraConfig(r=2, lora_alpha=8, init_lora_weights=False, fan_in_fan_out=True,
                                                target_modules=r".*\.attn\.c_(attn|proj)"))
    ours_sd = {}
    for n, layer in lora_layers(ours).items():
        ours_sd[n, layer.adapter_name] = (layer.lora_A, layer.lora_B)
        for pname, p in getattr(layer, "parked_adapters", {}).items():
            ours_sd[n, pname] = (p.A, p.B)
    with torch.no_grad():
        for (n, name), (a, b) in ours_sd.items():
            layer = theirs.base_model.model.get_submodule(n)
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
        theirs.eval()
        assert rel_err(mixed, theirs(input_ids=idx, adapter_names=names).logits) < 1e-5
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        ours(idx, adapter_names=["nope"] * 5)
    with pytest.raises(ValueError, match="3 names for a batch of 5"):
        ours(idx, adapter_names=["shout"] * 3)


def test_mixed_batch_with_dora_and_plain_adapters_on_an_nf4_base(tiny_gpt):
    """PEFT refuses adapter_names when DoRA is on; here the definition is the reference: each example alone."""
    add_qlora(tiny_gpt, ["c_attn", "c_fc"], r=2, compute_dtype=torch.float32, use_dora=True)
    add_lora(tiny_gpt, ["c_attn"], r=4, adapter_name="other", use_dora=True)
    add_lora(tiny_gpt, ["c_fc", "mlp.c_proj"], r=2, adapter_name="plain")  # plain LoRA beside DoRA on c_fc
    assert adapter_names(tiny_gpt) == ["default", "other", "plain"] and active_adapter(tiny_gpt) == "default"
    perturb(tiny_gpt, seed=4)
    tiny_gpt.eval()
    idx = torch.randint(0, 97, (5, 8))
    names = ["other", "default", "plain", "other", "__base__"]
    with torch.no_grad():
        mixed = tiny_gpt(idx, adapter_names=names)
        for i, name in enumerate(names[:4]):
            set_adapter(tiny_gpt, name)
            assert rel_err(mixed[i:i + 1], tiny_gpt(idx[i:i + 1])) < 1e-5
        with disable_adapters(tiny_gpt):
            assert rel_err(mixed[4:], tiny_gpt(idx[4:])) < 1e-5


def test_set_disable_delete_and_training_only_the_active_adapter(tiny_gpt):
    idx = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        base = tiny_gpt(idx)
    two_adapters(tiny_gpt)
    set_adapter(tiny_gpt, "shout")
    trainable = {n for n, p in tiny_gpt.named_parameters() if p.requires_grad}
    assert trainable and all(".attn.c_" in n and n.endswith(("lora_A", "lora_B")) for n in trainable)
    with torch.no_grad():
        shout = tiny_gpt(idx)
        with disable_adapters(tiny_gpt):
            assert torch.allclose(tiny_gpt(idx), base, atol=1e-6)
        assert torch.equal(tiny_gpt(idx), shout)  # as it was after the block
    with pytest.raises(ValueError, match="no adapter named 'yoda'"):
        set_adapter(tiny_gpt, "yoda")
    delete_adapter(tiny_gpt, "shout")
    assert adapter_names(tiny_gpt) == ["default"] and active_adapter(tiny_gpt) == "default"
    assert not any(n.endswith("attn.c_proj") for n in lora_layers(tiny_gpt))  # only shout was there: unwrapped
    delete_adapter(tiny_gpt, "default")
    assert not lora_layers(tiny_gpt)
    with torch.no_grad():
        assert torch.allclose(tiny_gpt(idx), base, atol=1e-6)


def test_merging_one_named_adapter_keeps_the_other(hf_gpt2_dir, tmp_path):
    path, hf = hf_gpt2_dir
    ours = two_adapters(GPT.from_pretrained(path))
    save_adapter(ours, tmp_path / "both")
    merge_lora(ours, adapter_name="default")  # W0 + ΔW_default; shout stays, on top of the new base
    assert adapter_names(ours) == ["shout"]
    set_adapter(ours, "shout")
    # PEFT: fold default into GPT-2, then put shout on the result
    folded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "both").merge_and_unload()
    theirs = peft.PeftModel.from_pretrained(folded, tmp_path / "both" / "shout").eval()
    idx = torch.randint(0, 101, (2, 10))
    with torch.no_grad():
        assert rel_err(ours(idx), theirs(input_ids=idx).logits) < 1e-5


@pytest.mark.parametrize("dora_first", [False, True])
def test_a_dora_and_a_plain_adapter_on_one_layer_equal_peft_both_ways(hf_gpt2_dir, tmp_path, dora_first):
    path, hf = hf_gpt2_dir
    ours = GPT.from_pretrained(path)
    first, second = ("dora", "plain") if dora_first else ("plain", "dora")
    add_lora(ours, ["c_attn", "c_fc"], r=4, alpha=8, adapter_name=first, use_dora=dora_first)
    add_lora(ours, ["c_attn", "attn.c_proj"], r=2, alpha=8, adapter_name=second, use_dora=not dora_first)
    perturb(ours)
    ours.eval()
    assert active_adapter(ours) == first
    save_adapter(ours, tmp_path / "both")
    configs = {n: json.loads((tmp_path / "both" / n / "adapter_config.json").read_text()) for n in ("dora", "plain")}
    assert configs["dora"]["use_dora"] is True and configs["plain"]["use_dora"] is False
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "both" / first, adapter_name=first).eval()
    theirs.load_adapter(tmp_path / "both" / second, adapter_name=second)
    idx = torch.randint(0, 101, (3, 12))
    logits = {}
    for name in ("plain", "dora", "plain"):  # back and forth: the magnitude goes and comes back with its adapter
        set_adapter(ours, name)
        theirs.set_adapter(name)
        with torch.no_grad():
            logits[name] = ours(idx)
            assert rel_err(logits[name], theirs(input_ids=idx).logits) < 1e-5, name
    for name in ("dora", "plain"):  # what trains: DoRA's magnitude only while the DoRA adapter is mounted
        set_adapter(ours, name)
        magnitudes = {n for n, p in ours.named_parameters() if p.requires_grad and "magnitude" in n}
        assert bool(magnitudes) == (name == "dora")
    theirs.save_pretrained(tmp_path / "peft")  # PEFT's folder back into minilora, each adapter in its subfolder
    back = GPT.from_pretrained(path).eval()
    for name in (first, second):
        load_adapter(back, tmp_path / "peft" / name, adapter_name=name)
    with torch.no_grad():
        mixed = back(idx, adapter_names=["dora", "plain", "__base__"])
        for i, name in enumerate(("dora", "plain")):
            set_adapter(back, name)
            assert rel_err(back(idx), logits[name]) < 1e-5
            assert rel_err(mixed[i:i + 1], logits[name][i:i + 1]) < 1e-5
    merge_lora(ours, adapter_name="dora")  # DoRA folded into W0; the plain adapter stays, on the new base
    folded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "both" / "dora").merge_and_unload()
    theirs = peft.PeftModel.from_pretrained(folded, tmp_path / "both" / "plain").eval()
    set_adapter(ours, "plain")
    with torch.no_grad():
        assert rel_err(ours(idx), theirs(input_ids=idx).logits) < 1e-5


@pytest.mark.parametrize("bits, use_dora", [(4, False), (4, True), (2, False)])
def test_merging_one_named_adapter_into_a_quantized_base_keeps_the_others(tiny_gpt, bits, use_dora):
    """W0' = Q(deq(W0) + ΔW_default) where 'default' sits; 'other' (plain, and on c_attn) keeps working on W0'."""
    model = add_qlora(copy.deepcopy(tiny_gpt), ["c_attn", "c_fc"], r=4, alpha=8, compute_dtype=torch.float32, bits=bits,
                      use_dora=use_dora)
    add_lora(model, ["c_attn"], r=2, alpha=4, adapter_name="other")
    perturb(model, seed=7)
    model.eval()
    idx = torch.randint(0, 97, (3, 8))
    layers = lora_layers(model)
    with torch.no_grad():
        before = model(idx)  # 'default' active
        want = {n: layer.merged_weight() for n, layer in layers.items()}  # deq(W0) + ΔW_default, fp32
        other = {n: layer.parked_adapters["other"] for n, layer in layers.items() if "attn" in n}
        model, report = merge_qlora(model, requantize=True, adapter_name="default")
    assert adapter_names(model) == ["other"] and active_adapter(model) == "other"
    assert set(report) == set(layers)
    for n, w in want.items():
        layer = model.get_submodule(n)
        base = layer.base_layer if n in other else layer  # c_fc carried 'default' only: an NF4 layer now
        assert isinstance(base, NF4Linear) and base.bits == bits
        assert torch.equal(base.packed, quantize_nf(w, bits).packed)  # the new base is Q(deq(W0) + ΔW), exactly
        assert report[n] == pytest.approx(rel_err(base.dequantized_weight(torch.float32), w), rel=1e-5)
        assert 0 < report[n] < (0.7 if bits == 2 else 0.15)
    # the definition: a dense model with deq(W0') everywhere and + s·B A of 'other' on c_attn
    dense = copy.deepcopy(tiny_gpt).eval()
    with torch.no_grad():
        for n in want:
            layer = model.get_submodule(n)
            w = (layer.base_layer if n in other else layer).dequantized_weight(torch.float32)
            if n in other:
                w = w + other[n].settings["scaling"] * (other[n].B @ other[n].A)
            dense.get_submodule(n).weight.copy_(w)
        assert rel_err(model(idx), dense(idx)) < 1e-5
        with disable_adapters(model):  # the merged base alone is 'default' up to the rounding of Q
            assert rel_err(model(idx), before) < (0.6 if bits == 2 else 0.1)
    with pytest.raises(ValueError, match="needs requantize=True"):
        merge_qlora(model, adapter_name="other")
    with pytest.raises(ValueError, match=r"quantized base; .*merge_qlora\(model, requantize=True, adapter_name='other'\)"):
        merge_lora(model, adapter_name="other")
    merge_qlora(model, requantize=True, adapter_name="other")
    assert not lora_layers(model) and isinstance(model.get_submodule("transformer.h.0.attn.c_attn"), NF4Linear)
