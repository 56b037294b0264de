"""minilora.Llama against transformers' LlamaForCausalLM (and Qwen2 / Mistral), its files and PEFT's adapters."""
import copy
import json
import subprocess
import sys

import pytest
import torch

from minilora import add_lora, load_adapter, save_adapter
from minilora.llama import Llama, LlamaConfig

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is the Llama reference")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
# (transformers config class, fields): MHA and GQA, tied and untied, attention biases, two rope_theta values,
# Llama-3 rope scaling, a head_dim that is not hidden_size / heads, Qwen2 and Mistral
CASES = {
    "mha-untied": ("LlamaConfig", dict(num_key_value_heads=4, rope_theta=10000.0)),
    "gqa-tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0)),
    "gqa-llama3": ("LlamaConfig", dict(num_key_value_heads=1, rope_theta=500000.0, rope_scaling=LLAMA3)),
    "bias-headdim": ("LlamaConfig", dict(num_key_value_heads=2, attention_bias=True, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None, head_dim=8)),
}


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_model(case, seed=0):
    """A random tiny transformers model (every weight random, norms and biases included)."""
    cls, fields = CASES[case]
    torch.manual_seed(seed)
    fields = {k: dict(v) if isinstance(v, dict) else v for k, v in fields.items()}  # transformers edits dicts
    config = getattr(transformers, cls)(**TINY, **fields)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if "norm" not in name else 0.1) + (1.0 if "norm" in name else 0.0))
    return model


def tokens(T=24):
    return torch.randint(0, TINY["vocab_size"], (2, T), generator=torch.Generator().manual_seed(1))


def assert_logits(ours, theirs, idx=None, tol=1e-5):
    idx = tokens() if idx is None else idx
    with torch.no_grad():
        a, b = ours(idx), theirs(idx).logits
    assert a.shape == b.shape and rel(a, b) <= tol


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers_and_both_round_trips(case, tmp_path):
    theirs = hf_model(case)
    theirs.save_pretrained(tmp_path / "hf")
    ours = Llama.from_pretrained(tmp_path / "hf").eval()
    assert_logits(ours, theirs)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.save_pretrained(tmp_path / "ours")  # minilora -> transformers: saving changes nothing in the model
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(again).__name__ == ("Qwen2ForCausalLM" if case == "qwen2" else "LlamaForCausalLM")  # Mistral
    assert_logits(ours, again)
    again.save_pretrained(tmp_path / "back")  # transformers -> minilora again
    assert_logits(Llama.from_pretrained(tmp_path / "back").eval(), theirs)


def test_llama3_scaling_changes_the_rotation_where_it_should():
    """Llama-3's scaling divides long wavelengths by factor and interpolates middle ones: with head_dim 8 and
    original 16 the fastest pair (wavelength 2π) is interpolated, the other three divided by 8."""
    plain = LlamaConfig(**TINY, rope_theta=500000.0)
    scaled = LlamaConfig(**TINY, rope_theta=500000.0, rope_scaling=LLAMA3)
    from minilora.llama import rope_frequencies
    a, b = rope_frequencies(plain), rope_frequencies(scaled)
    assert a[0] / 8 < b[0] < a[0] and torch.allclose(b[1:], a[1:] / 8.0)


def test_minilora_model_saved_and_loaded_by_transformers_sharded(tmp_path):
    torch.manual_seed(3)
    ours = Llama(LlamaConfig(**TINY, num_key_value_heads=2)).eval()
    ours.save_pretrained(tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "model.safetensors").exists()
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert_logits(ours, theirs)
    back = Llama.from_pretrained(tmp_path)  # the index, read by minilora
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())
    ours.save_pretrained(tmp_path)  # one file now: the shards and the index go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_keep_their_dtype(dtype, tmp_path):
    theirs = hf_model("gqa-tied").to(dtype)
    theirs.save_pretrained(tmp_path, max_shard_size="20KB")  # transformers' own shards and index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = Llama.from_pretrained(tmp_path)
    assert all(p.dtype == dtype for p in ours.parameters())
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    assert Llama.from_pretrained(tmp_path, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_peft_adapter_on_all_seven_targets_moves_both_ways(tmp_path):
    peft = pytest.importorskip("peft", reason="peft (dev extra) is the reference for adapters")
    base = hf_model("gqa-tied")
    base.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)  # random B
    theirs = peft.get_peft_model(base, config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(Llama.from_pretrained(tmp_path / "base"), tmp_path / "peft").eval()
    assert_logits(ours, theirs)
    with torch.no_grad():
        plain = Llama.from_pretrained(tmp_path / "base").eval()(tokens())
        assert rel(ours(tokens()), plain) > 1e-2  # the adapter does change the logits

    mine = add_lora(Llama.from_pretrained(tmp_path / "base"), TARGETS, r=2, alpha=6).eval()
    with torch.no_grad():
        for name, p in mine.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_adapter(mine, tmp_path / "mine")
    cfg = json.loads((tmp_path / "mine" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(TARGETS)
    base2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert_logits(mine, peft.PeftModel.from_pretrained(base2, tmp_path / "mine").eval())


def test_qlora_and_merge_on_llama(tmp_path):
    from minilora import add_qlora, count_parameters, dequantize_nf4, merge_qlora, quantize_nf4
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**TINY | dict(num_key_value_heads=2, hidden_size=64, intermediate_size=128)))
    rounded = copy.deepcopy(model)  # the same model with every target weight rounded to NF4 and back
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if any(f"{t}.weight" in name for t in TARGETS):
                p.copy_(dequantize_nf4(quantize_nf4(p)))
        dense = rounded(tokens())
    add_qlora(model, TARGETS, r=4, alpha=8, compute_dtype=torch.float32)
    count = count_parameters(model)
    L, C, F, kv = 2, 64, 128, 2 * 16
    assert count.trainable == L * 4 * (C + C + C + kv + C + kv + C + C + C + F + C + F + F + C)
    idx = tokens()
    logits, loss = model(idx, idx)
    assert rel(logits.detach(), dense) < 1e-5  # B = 0 at the start: the NF4-rounded base
    loss.backward()
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert grads and all("lora_" in n for n in grads) and len(grads) == 2 * 7 * L
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        model.eval()
        before = model(idx)
        merge_qlora(model)
        assert rel(model(idx), before) < 1e-5
    model.save_pretrained(tmp_path)  # dense again: a plain checkpoint
    assert_logits(Llama.from_pretrained(tmp_path).eval(), model_as_hf(tmp_path), idx)


def model_as_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def test_save_refuses_lora_layers(tmp_path):
    model = add_lora(Llama(LlamaConfig(**TINY)), ["q_proj"], r=2)
    with pytest.raises(ValueError, match=r"q_proj\.lora_A. is no tensor of a Llama checkpoint.*merge_lora"):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("field, value, message", [
    ("model_type", "gpt_neox", r"model_type 'gpt_neox'; minilora's Llama loads llama, mistral, qwen2"),
    ("hidden_act", "gelu", r"sets hidden_act='gelu'"),
    ("mlp_bias", True, r"sets mlp_bias=True"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, r"rope type 'yarn' is not implemented"),
    ("quantization_config", {"quant_method": "bitsandbytes"}, r"sets 'quantization_config'"),
    ("architectures", ["LlamaForSequenceClassification"], r"architectures \['LlamaForSequenceClassification'\]"),
])
def test_unsupported_config_fields_are_refused_by_name(field, value, message, tmp_path):
    Llama(LlamaConfig(**TINY)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {field: value}))
    with pytest.raises(ValueError, match=message):
        Llama.from_pretrained(tmp_path)


def test_mistral_sliding_window_refused(tmp_path):
    hf_model("mistral").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"sliding_window": 16}))
    with pytest.raises(ValueError, match="sliding_window=16"):
        Llama.from_pretrained(tmp_path)


HUB = """
import sys
from minilora.llama import Llama
try:
    print(Llama.from_pretrained(sys.argv[1]).config.hidden_size)
except FileNotFoundError as e:
    print("error:", e)
"""


def test_model_id_resolves_through_the_hub_cache_offline(tmp_path):
    """A cache laid out as huggingface_hub lays it out: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--minilora-test--tiny-llama"
    Llama(LlamaConfig(**TINY)).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONSAFEPATH": "1", "PATH": ""}
    run = lambda name: subprocess.run([sys.executable, "-c", HUB, name], env=env, capture_output=True, text=True,
                                      cwd=tmp_path, timeout=600)
    out = run("minilora-test/tiny-llama")
    assert out.stdout.strip() == "32", out.stderr
    out = run("minilora-test/not-cached")
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: from_pretrained: minilora-test/not-cached is neither")


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = Llama(LlamaConfig(**TINY | dict(num_hidden_layers=4, num_key_value_heads=2))).train()
    add_lora(plain, TARGETS, r=2)
    ckpt = copy.deepcopy(plain)
    ckpt.config.gradient_checkpointing = True
    idx = tokens()
    grads = []
    for model in (plain, ckpt):
        model(idx, idx)[1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 4
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7) for n in grads[0])


def test_gptq_and_int8_on_llama_linears():
    """GPTQ visits a Llama's seven linears per layer in forward order; LLM.int8() layers stand in for them."""
    from minilora import Int8Linear
    from minilora.quant.gptq import quantize_model_gptq
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**TINY | dict(num_key_value_heads=2))).eval()
    idx = tokens()
    with torch.no_grad():
        dense = model(idx)
    gptq = copy.deepcopy(model)
    states = quantize_model_gptq(gptq, [idx], TARGETS, bits=8, groupsize=None)
    assert list(states) == [f"model.layers.{i}.{part}.{t}" for i in range(2)
                            for part, names in (("self_attn", TARGETS[:4]), ("mlp", TARGETS[4:])) for t in names]
    int8 = copy.deepcopy(model)
    for name in list(states):
        parent, _, child = name.rpartition(".")
        setattr(int8.get_submodule(parent), child,
                Int8Linear.from_linear(int8.get_submodule(name), compute_dtype=torch.float32))
    with torch.no_grad():
        assert rel(gptq(idx), dense) < 0.02 and rel(int8(idx), dense) < 0.02  # 8-bit rounding of every linear


def test_minilora_from_pretrained_picks_the_model_by_model_type(tmp_path):
    import minilora
    from minilora import GPT, GPTConfig
    GPT(GPTConfig(block_size=16, vocab_size=61, n_layer=1, n_head=2, n_embd=16)).save_pretrained(tmp_path / "gpt")
    Llama(LlamaConfig(**TINY)).save_pretrained(tmp_path / "llama")
    assert type(minilora.from_pretrained(tmp_path / "gpt")) is GPT
    assert type(minilora.from_pretrained(tmp_path / "llama")) is Llama
    cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
    (tmp_path / "llama" / "config.json").write_text(json.dumps(cfg | {"model_type": "gemma"}))
    with pytest.raises(ValueError, match="model_type 'gemma'; minilora loads gpt2, llama, mistral, qwen2"):
        minilora.from_pretrained(tmp_path / "llama")
