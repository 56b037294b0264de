"""GPT.from_pretrained implements every GPT-2 config field that changes the math, or refuses it by name."""
import json

import pytest
import torch

from minilora import GPT
from minilora.gpt import ACTIVATIONS

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is the GPT-2 reference")


def hf_model(tmp_path, **fields):
    """A random tiny transformers GPT-2 with the given config fields, saved to tmp_path."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=53, n_positions=24, n_embd=32, n_layer=3, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, **fields)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random biases, norms and (when untied) head, so a mix-up would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.startswith("transformer.h.") and name.endswith("weight") and ".ln_" not in name:
                p.mul_(8.0)  # wider pre-activations: the activations differ where it matters
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def assert_same_logits(ours, theirs):
    idx = torch.randint(0, 53, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(idx), theirs(idx).logits
    assert ((a - b).norm() / b.norm()).item() <= 1e-4


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_every_activation_matches_transformers(act, tmp_path):
    theirs = hf_model(tmp_path, activation_function=act)
    ours = GPT.from_pretrained(tmp_path).eval()
    assert ours.config.activation_function == act
    assert_same_logits(ours, theirs)


@pytest.mark.parametrize("fields", [
    dict(tie_word_embeddings=False), dict(scale_attn_weights=False), dict(scale_attn_by_inverse_layer_idx=True),
    dict(tie_word_embeddings=False, scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True,
         activation_function="relu", reorder_and_upcast_attn=True),
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_untied_head_and_attention_scaling_match_transformers_and_round_trip(fields, tmp_path):
    theirs = hf_model(tmp_path / "hf", **fields)
    ours = GPT.from_pretrained(tmp_path / "hf").eval()
    assert_same_logits(ours, theirs)
    untied = fields.get("tie_word_embeddings") is False
    assert (ours.lm_head.weight is not ours.transformer.wte.weight) == untied
    ours.save_pretrained(tmp_path / "again")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "again").eval()
    assert_same_logits(ours, again)
    assert_same_logits(GPT.from_pretrained(tmp_path / "again").eval(), theirs)


def write_config(tmp_path, config):
    from safetensors.torch import save_file
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    return tmp_path


GPT2 = dict(model_type="gpt2", vocab_size=53, n_positions=24, n_embd=32, n_layer=2, n_head=4)


@pytest.mark.parametrize("config, match", [
    (dict(model_type="llama", vocab_size=32000, hidden_size=4096, num_hidden_layers=32), "model_type 'llama'"),
    (dict(model_type="gpt_neox", vocab_size=50432, hidden_size=512, num_hidden_layers=6), "model_type 'gpt_neox'"),
    (GPT2 | dict(n_inner=64), "n_inner=64"),
    (GPT2 | dict(add_cross_attention=True), "add_cross_attention"),
    (GPT2 | dict(activation_function="prelu"), "activation_function 'prelu'"),
    (GPT2 | dict(activation_function="banana"), "activation_function 'banana'"),
    (GPT2 | dict(pruned_heads={"0": [1]}), "pruned_heads"),
    ({k: v for k, v in GPT2.items() if k != "n_layer"}, "lacks 'n_layer'"),
    ([1], "JSON object"),
])
def test_unsupported_configs_are_refused_by_name(config, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        GPT.from_pretrained(write_config(tmp_path, config))


def test_an_untied_checkpoint_without_its_head_is_refused(tmp_path):
    hf_model(tmp_path, tie_word_embeddings=False)
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="lm_head.weight"):
        GPT.from_pretrained(tmp_path)
