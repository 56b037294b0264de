import json

import pytest
import torch
import torch.nn as nn

from minilora import GPT, add_lora, load_adapter, lora_layers, save_adapter

peft = pytest.importorskip("peft", reason="peft (dev extra) is the reference for the adapter format")

TARGETS = ["c_attn", "c_fc", "attn.c_proj"]


def randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=g))


def test_minilora_adapter_loads_into_peft_with_identical_logits(hf_gpt2_dir, tmp_path):
    path, hf = hf_gpt2_dir
    ours = GPT.from_pretrained(path).eval()
    idx = torch.randint(0, 101, (2, 15))
    with torch.no_grad():
        base = ours(idx)
    add_lora(ours, TARGETS, r=4, alpha=8)
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert isinstance(config["target_modules"], str)  # mlp.c_proj is not wrapped: one regex of full names
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    wrapped = {n for n, m in theirs.named_modules() if hasattr(m, "lora_A") and n.endswith(("c_attn", "c_fc", "c_proj"))}
    assert len(wrapped) == 3 * 3 and not any(n.endswith("mlp.c_proj") for n in wrapped)
    with torch.no_grad():
        a, b = ours(idx), theirs(input_ids=idx).logits
    assert (a - b).abs().max().item() < 1e-4
    assert (a - base).abs().max().item() > 1e-2  # the adapter really changed the logits


def test_peft_adapter_loads_into_minilora_with_identical_logits(hf_gpt2_dir, tmp_path):
    path, hf = hf_gpt2_dir
    ours = GPT.from_pretrained(path).eval()
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"], lora_dropout=0.0,
                             fan_in_fan_out=True, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf, config).eval()
    torch.manual_seed(3)
    for name, p in theirs.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    theirs.save_pretrained(tmp_path / "peft")
    load_adapter(ours, tmp_path / "peft")
    assert len(lora_layers(ours)) == 2 * 3
    idx = torch.randint(0, 101, (2, 15))
    with torch.no_grad():
        a, b = ours(idx), theirs(input_ids=idx).logits
    assert (a - b).abs().max().item() < 1e-4


def test_round_trip_and_errors_name_the_key(tiny_gpt, tmp_path):
    add_lora(tiny_gpt, ["c_attn"], r=2)
    randomize_adapters(tiny_gpt, seed=1)
    save_adapter(tiny_gpt, tmp_path / "a")
    fresh = GPT(tiny_gpt.config)
    load_adapter(fresh, tmp_path / "a")
    for name, layer in lora_layers(tiny_gpt).items():
        assert torch.equal(layer.lora_B, lora_layers(fresh)[name].lora_B)

    wrong_rank = GPT(tiny_gpt.config)
    add_lora(wrong_rank, ["c_attn"], r=3)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn has r=3 but .*adapter_config\.json says r=2"):
        load_adapter(wrong_rank, tmp_path / "a")
    more_layers = GPT(tiny_gpt.config)
    add_lora(more_layers, ["c_attn", "c_fc"], r=2)
    with pytest.raises(KeyError, match=r"mlp\.c_fc\.lora_A\.weight"):
        load_adapter(more_layers, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(GPT(tiny_gpt.config), tmp_path / "missing")
