"""Merging an adapter must give the unmerged model's logits, also with an adapter on the tied lm_head."""
import pytest
import torch
import torch.nn as nn

from minilora import GPT, GPTConfig, add_lora, lora_layers, merge_lora
from minilora.qlora import add_qlora, merge_qlora

TARGET_SETS = [["c_attn"], ["c_attn", "c_proj", "c_fc"], ["c_fc", "lm_head"], ["c_attn", "c_proj", "c_fc", "lm_head"]]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def adapted(kind, targets):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=61, n_layer=2, n_head=2, n_embd=32)).eval()
    if kind == "lora":
        add_lora(model, targets, r=4, alpha=8)
    else:
        add_qlora(model, targets, r=4, alpha=8, compute_dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B.copy_(0.2 * torch.randn(layer.lora_B.shape, generator=g))
    return model


@pytest.mark.parametrize("kind", ["lora", "qlora"])
@pytest.mark.parametrize("targets", TARGET_SETS, ids="+".join)
def test_merged_model_gives_the_unmerged_logits_and_reloads_them(kind, targets, tmp_path):
    model = adapted(kind, targets)
    idx = torch.randint(0, 61, (3, 16), generator=torch.Generator().manual_seed(2))
    wte = model.transformer.wte.weight.detach().clone()
    with torch.no_grad():
        before = model(idx)
    merged = merge_lora(model) if kind == "lora" else merge_qlora(model)[0]
    assert not lora_layers(merged)
    assert torch.equal(merged.transformer.wte.weight, wte)  # the embedding never absorbs ΔW
    with torch.no_grad():
        assert rel(merged(idx), before) <= 1e-4
    head_adapted = "lm_head" in targets
    assert (merged.lm_head.weight is merged.transformer.wte.weight) == (not head_adapted)
    assert merged.config.tie_word_embeddings == (not head_adapted)
    merged.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert rel(GPT.from_pretrained(tmp_path / "merged")(idx), before) <= 1e-4
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    assert hf.config.tie_word_embeddings == (not head_adapted)
    with torch.no_grad():
        assert rel(hf(idx).logits, before) <= 1e-4


def test_requantized_merge_leaves_the_embedding_alone():
    model = adapted("qlora", ["c_attn", "lm_head"])
    wte = model.transformer.wte.weight.detach().clone()
    merged, report = merge_qlora(model, requantize=True)
    assert torch.equal(merged.transformer.wte.weight, wte)
    assert merged.lm_head.weight is not merged.transformer.wte.weight
    assert set(report) == {f"transformer.h.{i}.attn.c_attn" for i in range(2)}


def test_merge_lora_unties_a_transformers_gpt2_head_too(hf_gpt2_dir):
    _, hf = hf_gpt2_dir
    assert hf.lm_head.weight is hf.transformer.wte.weight
    wte = hf.transformer.wte.weight.detach().clone()
    add_lora(hf, ["lm_head"], r=2, alpha=4)  # (GPT-2's other projections are Conv1D, not nn.Linear)
    for layer in lora_layers(hf).values():
        nn.init.normal_(layer.lora_B, std=0.2)
    idx = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        before = hf(idx).logits
        merge_lora(hf)
        after = hf(idx).logits
    assert torch.equal(hf.transformer.wte.weight, wte) and not hf.config.tie_word_embeddings
    assert rel(after, before) <= 1e-4


def test_save_pretrained_refuses_adapter_and_nf4_layers_with_the_way_out(tmp_path):
    with pytest.raises(ValueError, match=r"LoRA layer.*merge_lora\(model\) first"):
        adapted("lora", ["c_attn"]).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=r"QLoRA layer.*merge_qlora\(model\) first"):
        adapted("qlora", ["c_fc"]).save_pretrained(tmp_path / "b")
    requantized, _ = merge_qlora(adapted("qlora", ["c_fc"]), requantize=True)
    with pytest.raises(ValueError, match=r"NF4 layer.*merge_qlora\(model\) first"):
        requantized.save_pretrained(tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
