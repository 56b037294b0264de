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


def model_state(model):
    """Everything a load could change: module types by name, parameter identity, values and requires_grad."""
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (id(p), p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def assert_same_state(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for n, (pid, value, rg) in a[1].items():
        assert b[1][n][0] == pid and torch.equal(b[1][n][1], value) and b[1][n][2] == rg, n


@pytest.mark.parametrize("setting, ours, match", [
    (dict(r=3), dict(r=2), r"has r=2 but .* says r=3"),
    (dict(alpha=6.0), dict(alpha=4.0), r"has lora_alpha=4\.0 but .* says lora_alpha=6\.0"),
    (dict(use_rslora=True), dict(use_rslora=False), r"has use_rslora=False but .* says use_rslora=True"),
])
def test_load_into_existing_lora_layers_refuses_other_settings(tiny_gpt, tmp_path, setting, ours, match):
    add_lora(tiny_gpt, ["c_attn"], **(dict(r=2, alpha=4.0) | setting))
    randomize_adapters(tiny_gpt)
    save_adapter(tiny_gpt, tmp_path / "a")
    other = add_lora(GPT(tiny_gpt.config), ["c_attn"], **(dict(r=2, alpha=4.0) | ours))
    before = model_state(other)
    with pytest.raises(ValueError, match=match):
        load_adapter(other, tmp_path / "a")
    assert_same_state(before, model_state(other))


def test_a_failed_load_leaves_a_bare_model_exactly_as_it_was(tiny_gpt, tmp_path):
    from safetensors.torch import load_file, save_file
    add_lora(tiny_gpt, ["c_attn", "c_fc"], r=2)
    save_adapter(tiny_gpt, tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    sd = load_file(str(f))
    del sd[f"base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"]
    save_file(sd, str(f))
    bare = GPT(tiny_gpt.config)
    bare.transformer.wte.weight.requires_grad_(False)  # a mix of flags, which must survive as it is
    before = model_state(bare)
    with pytest.raises(KeyError, match=r"h\.1\.mlp\.c_fc\.lora_B\.weight"):
        load_adapter(bare, tmp_path / "a")
    assert not lora_layers(bare)
    assert_same_state(before, model_state(bare))


@pytest.mark.parametrize("content, match", [
    ("[1]", r"adapter_config\.json must hold a JSON object, got list"),
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}', r"adapter_config\.json lacks 'target_modules'"),
    ('{"peft_type": "LORA", "r": 2, "target_modules": ["c_attn"]}', r"adapter_config\.json lacks 'lora_alpha'"),
    ('{"r": true, "lora_alpha": 4, "target_modules": ["c_attn"]}', r"positive ints"),
    ('{"r": 2, "lora_alpha": NaN, "target_modules": ["c_attn"]}', r"finite numbers"),
    ('{"r": 2, "lora_alpha": 4, "target_modules": ["c_attn"], "lora_bias": true}', r"lora_bias"),
    ('{"r": 2, "lora_alpha": 4, "target_modules": ["c_attn"], "init_lora_weights": "olora"}', r"init_lora_weights"),
    ("{not json", r"adapter_config\.json is not valid JSON"),
])
def test_bad_adapter_config_is_a_clear_error_naming_file_and_key(tiny_gpt, tmp_path, content, match):
    add_lora(tiny_gpt, ["c_attn"], r=2)
    save_adapter(tiny_gpt, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(content)
    bare = GPT(tiny_gpt.config)
    before = model_state(bare)
    with pytest.raises(ValueError, match=match):
        load_adapter(bare, tmp_path / "a")
    assert_same_state(before, model_state(bare))


def mixed_rank_model(path):
    ours = GPT.from_pretrained(path).eval()
    add_lora(ours, ["c_attn"], r=4, alpha=8)
    add_lora(ours, [r"transformer\.h\.[01]\.mlp\.c_fc"], r=2, alpha=3)
    add_lora(ours, [r"transformer\.h\.2\.mlp\.c_fc"], r=2, alpha=5)
    randomize_adapters(ours, seed=4)
    return ours


def test_mixed_ranks_round_trip_through_minilora_and_peft(hf_gpt2_dir, tmp_path):
    path, hf = hf_gpt2_dir
    ours = mixed_rank_model(path)
    save_adapter(ours, tmp_path / "mixed")
    config = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"]
    idx = torch.randint(0, 101, (2, 15))
    fresh = load_adapter(GPT.from_pretrained(path).eval(), tmp_path / "mixed")
    assert {n: (l.r, l.alpha) for n, l in lora_layers(fresh).items()} == \
        {n: (l.r, l.alpha) for n, l in lora_layers(ours).items()}
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "mixed").eval()
    with torch.no_grad():
        a, b, c = ours(idx), fresh(idx), theirs(input_ids=idx).logits
    assert torch.equal(a, b) and (a - c).abs().max().item() < 1e-4


def test_peft_rank_and_alpha_patterns_load_into_minilora(hf_gpt2_dir, tmp_path):
    path, hf = hf_gpt2_dir
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 2},
                             alpha_pattern={"h.1.attn.c_attn": 3}, fan_in_fan_out=True, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf, config).eval()
    torch.manual_seed(5)
    for name, p in theirs.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(GPT.from_pretrained(path).eval(), tmp_path / "peft")
    layers = lora_layers(ours)
    assert layers["transformer.h.0.mlp.c_fc"].r == 2 and layers["transformer.h.0.attn.c_attn"].r == 4
    assert layers["transformer.h.1.attn.c_attn"].alpha == 3 and layers["transformer.h.2.attn.c_attn"].alpha == 8
    idx = torch.randint(0, 101, (2, 15))
    with torch.no_grad():
        assert (ours(idx) - theirs(input_ids=idx).logits).abs().max().item() < 1e-4


def test_task_type_is_causal_lm_only_for_a_causal_lm(tiny_gpt, tmp_path):
    add_lora(tiny_gpt, ["c_attn"], r=2)
    save_adapter(tiny_gpt, tmp_path / "gpt")
    assert json.loads((tmp_path / "gpt" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    mlp = add_lora(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), ["0"], r=2)
    save_adapter(mlp, tmp_path / "mlp")
    assert json.loads((tmp_path / "mlp" / "adapter_config.json").read_text())["task_type"] is None
    back = load_adapter(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), tmp_path / "mlp")
    assert list(lora_layers(back)) == ["0"]
