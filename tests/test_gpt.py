import pytest
import torch

from minilora import GPT, GPTConfig


def test_logits_and_greedy_generation_match_hf_gpt2(hf_gpt2_dir):
    path, hf = hf_gpt2_dir
    model = GPT.from_pretrained(path).eval()
    idx = torch.randint(0, 101, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    prompt = idx[:, :5]
    ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0,
                      attention_mask=torch.ones_like(prompt))
    assert torch.equal(model.generate(prompt, 12, greedy=True), ref)


def test_save_pretrained_round_trips_through_hf(hf_gpt2_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    path, hf = hf_gpt2_dir
    GPT.from_pretrained(path).save_pretrained(tmp_path / "again")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "again").eval()
    idx = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        assert torch.allclose(back(idx).logits, hf(idx).logits, atol=1e-5)


def test_loss_ignores_masked_targets(tiny_gpt):
    idx = torch.randint(0, 97, (2, 8))
    targets = idx.clone()
    logits, loss = tiny_gpt(idx, targets)
    targets[:, :4] = -100
    _, masked = tiny_gpt(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 97), idx[:, 4:].reshape(-1))
    assert logits.shape == (2, 8, 97)
    assert torch.allclose(masked, expected, atol=1e-6) and not torch.allclose(loss, masked)


def test_attention_is_causal(tiny_gpt):
    tiny_gpt.eval()
    a = torch.randint(0, 97, (1, 10))
    b = a.clone()
    b[0, 7:] = (b[0, 7:] + 1) % 97  # change only the future
    assert torch.allclose(tiny_gpt(a)[0, :7], tiny_gpt(b)[0, :7], atol=1e-6)
    assert not torch.allclose(tiny_gpt(a)[0, 7:], tiny_gpt(b)[0, 7:])


def test_generate_sampling_top_k_and_temperature(tiny_gpt):
    idx = torch.zeros(4, 1, dtype=torch.long)
    out = tiny_gpt.generate(idx, 6, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, tiny_gpt.generate(idx, 6, greedy=True))  # top-1 sampling is greedy
    hot = tiny_gpt.generate(idx, 20, temperature=5.0, generator=torch.Generator().manual_seed(0))
    assert hot.shape == (4, 21) and len(set(hot[:, 1:].flatten().tolist())) > 10
    with pytest.raises(ValueError, match="temperature"):
        tiny_gpt.generate(idx, 3, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        tiny_gpt.generate(idx, 3, top_k=0)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16, dropout=0.5))
    idx = torch.randint(0, 50, (2, 8))
    model.train()
    assert not torch.allclose(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_bad_config_and_input(tiny_gpt):
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="block_size"):
        tiny_gpt(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained("/nonexistent")


def test_generate_text_greedy_sampled_and_a_prompt_without_room(tiny_config):
    from minilora import ByteTokenizer
    from minilora.generate import generate_text, respond
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=24, vocab_size=257, n_layer=1, n_head=2, n_embd=16)).eval()
    tok = ByteTokenizer()
    ids = tok.encode("abc")
    expected = model.generate(torch.tensor([ids]), 5, greedy=True, eos_token_id=tok.eos_id)[0, 3:].tolist()
    if tok.eos_id in expected:
        expected = expected[:expected.index(tok.eos_id)]
    assert generate_text(model, tok, "abc", 5) == tok.decode(expected)
    a, b = (generate_text(model, tok, "abc", 8, temperature=5.0, seed=s) for s in (1, 1))
    assert a == b  # the seed decides the sample
    assert len(generate_text(model, tok, "x" * 20, 50)) <= 4  # the answer fits block_size (≤ 1 char per byte)
    with pytest.raises(ValueError, match="prompt is 30 tokens; the model's block_size 24"):
        generate_text(model, tok, "y" * 30, 5)
    with pytest.raises(ValueError, match="prompt is 24 tokens"):
        generate_text(model, tok, "y" * 24, 5)
    with pytest.raises(ValueError, match="temperature"):
        generate_text(model, tok, "abc", 5, temperature=-1.0)
    with pytest.raises(ValueError, match="block_size 24"):
        respond(model, tok, "z" * 40)


def test_save_pretrained_writes_what_the_model_does_and_leaves_the_model_unchanged(tmp_path):
    import dataclasses
    import json
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 1)  # untied, config still says tied
    before = dataclasses.asdict(model.config)
    model.save_pretrained(tmp_path)
    assert dataclasses.asdict(model.config) == before
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    back = GPT.from_pretrained(tmp_path)
    assert back.lm_head.weight is not back.transformer.wte.weight
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)
