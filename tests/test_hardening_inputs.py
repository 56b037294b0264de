"""Bad input to the library is a ValueError or TypeError naming the argument, raised before anything moves:
token ids outside the vocabulary, a learning rate whose first step overflows, sparse gradients, a device budget
or min_8bit_size of the wrong type, a base whose weights are already inf / NaN, a rank wider than its layer,
a batch smaller than the ranks, a vocabulary the text cannot fill, splits the data cannot give. A temperature
so small that logits / T overflow samples the argmax, as its limit does."""
import pytest
import torch

import minilora.runs.preflight
from minilora import AdamW8bit, GPT, GPTConfig, PagedAdamW, PagedAdamW8bit, TrainConfig
from minilora.data import BPETokenizer, Example, InstructionSet, split_examples
from minilora.llama import Llama, LlamaConfig
from minilora.train import make_optimizer, train

TEXT = "You must learn patience. Learn patience, you must. The function should return a new list. " * 20


def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=20, n_layer=1, n_head=2, n_embd=8))


def llama() -> Llama:
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=16))


@pytest.mark.parametrize("make", [gpt, llama], ids=["gpt", "llama"])
def test_token_ids_outside_the_vocabulary(make):
    model = make()
    for bad in ([[1, 20]], [[-1, 3]], [[25]]):
        with pytest.raises(ValueError, match=r"vocab_size is 20, so ids must be in \[0, 19\]"):
            model(torch.tensor(bad))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.tensor([[1.0, 2.0]]))
    assert model(torch.tensor([[0, 19]], dtype=torch.int32)).shape == (1, 2, 20)


@pytest.mark.parametrize("make", [gpt, llama], ids=["gpt", "llama"])
def test_a_vanishing_temperature_samples_the_argmax(make):
    """logits / 1e-300 overflows (1e-300 is 0 in float32): the logits are shifted first, so the sample is the
    argmax, the limit of softmax(logits / T) as T -> 0."""
    model, idx = make(), torch.tensor([[1, 2], [3, 4]])
    greedy = model.generate(idx, 6, greedy=True)
    for t in (1e-300, 1e-45, 5e-324):
        assert torch.equal(model.generate(idx, 6, temperature=t, generator=torch.Generator().manual_seed(0)), greedy)


def small_sparse_and_large_dense():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4, sparse=True)  # 40 elements: under min_8bit_size, fp32 state
    big = torch.nn.Parameter(torch.randn(64, 64))
    emb(torch.tensor([1, 2])).sum().backward()
    big.grad = torch.randn(64, 64)
    return [big, emb.weight]


@pytest.mark.parametrize("make", [AdamW8bit, PagedAdamW, PagedAdamW8bit])
def test_sparse_gradients_are_refused_before_any_parameter_moves(make):
    ps = small_sparse_and_large_dense()
    before = [p.detach().clone() for p in ps]
    opt = make(ps, lr=1e-2)
    with pytest.raises(TypeError, match=rf"{make.__name__} does not support sparse gradients: parameter 1 .*\(10, 4\)"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before))


def test_device_budget_and_min_8bit_size_of_the_wrong_type():
    p = [torch.nn.Parameter(torch.randn(8))]
    for make in (PagedAdamW, PagedAdamW8bit):
        with pytest.raises(TypeError, match="device_budget must be None, 0 or an int"):
            make(p).set_device_budget("1")
        with pytest.raises(TypeError, match="device_budget"):
            make(p, device_budget="1")
    for make in (AdamW8bit, PagedAdamW8bit):
        for bad in ("x", 1.5, None, -1):
            with pytest.raises(TypeError, match="min_8bit_size must be an int"):
                make(p, min_8bit_size=bad)


def test_a_learning_rate_whose_first_step_overflows():
    p = [torch.nn.Parameter(torch.randn(8))]
    for make in (AdamW8bit, PagedAdamW, PagedAdamW8bit):
        with pytest.raises(ValueError, match=r"lr=1e\+308 is too large"):
            make(p, lr=1e308)
    with pytest.raises(ValueError, match=r"TrainConfig.lr=1e\+308 is too large"):
        TrainConfig(lr=1e308)
    half = torch.nn.Linear(4, 4).half()  # torch.optim.AdamW steps in the parameters' dtype: fp16 ends at 65504
    with pytest.raises(ValueError, match=r"TrainConfig.lr=10000.0 is too large.*float16"):
        make_optimizer(half, TrainConfig(mode="full", lr=1e4))
    assert TrainConfig(lr=1e30).lr == 1e30  # representable: such a run diverges, and says so (test_train)


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(TEXT, 280)


def data(tok, n=6):
    return InstructionSet([Example("Yoda", "You must learn.", "Learn, you must.")] * n, tok, 64)


def test_train_refuses_inf_weights_a_wide_rank_and_a_small_batch_before_the_run_directory(tok, tmp_path, monkeypatch):
    def base(poison=False):
        torch.manual_seed(0)
        m = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16))
        if poison:
            with torch.no_grad():
                m.transformer.h[0].mlp.c_proj.weight[3, 5] = float("nan")
        return m
    out = tmp_path / "run"
    cfg = dict(steps=1, batch_size=2, progress=False, out_dir=str(out))
    with pytest.raises(ValueError, match=r"transformer.h.0.mlp.c_proj.weight has 1 non-finite value\(s\) of 1024"):
        train(base(poison=True), TrainConfig(mode="lora", **cfg), data(tok))
    with pytest.raises(ValueError, match=r"r \(LoRA rank\) = 32 exceeds .* = 16 of the target 'transformer.h.0.attn"):
        train(base(), TrainConfig(mode="lora", r=32, **cfg), data(tok))
    monkeypatch.setattr(minilora.runs.preflight, "world_size", lambda: 4)
    with pytest.raises(ValueError, match="batch_size=2 .* smaller than the 4 processes"):
        train(base(), TrainConfig(mode="lora", **cfg), data(tok))
    assert not out.exists()


def test_a_vocabulary_the_text_cannot_fill(tok):
    assert tok.vocab_size == 280  # reachable: exactly what was asked
    with pytest.raises(ValueError, match=r"vocab_size=100000000 cannot be reached: this text yields at most (\d+) "):
        BPETokenizer.train(TEXT, 100_000_000)
    most = int(str(pytest.raises(ValueError, BPETokenizer.train, TEXT, 10**6).value).split("at most ")[1].split()[0])
    assert BPETokenizer.train(TEXT, most).vocab_size == most
    with pytest.raises(ValueError, match=f"at most {most} tokens"):
        BPETokenizer.train(TEXT, most + 1)


def test_split_examples_by_count_names_the_file():
    exs = [Example("i", str(k), "o", source=f"d.jsonl:{k + 1}") for k in range(10)]
    train_, val = split_examples(exs, seed=0, n_train=4, n_val=3)
    assert len(train_) == 4 and len(val) == 3 and not {e.context for e in train_} & {e.context for e in val}
    assert split_examples(exs, seed=0, n_val=3)[1] == val  # n_train only shortens the training part
    assert len(split_examples(exs, seed=0, n_val=3)[0]) == 7
    assert split_examples(exs, 0.1, seed=0) == split_examples(exs, 0.1, seed=0, n_val=1)
    with pytest.raises(ValueError, match=r"d.jsonl holds 10 example\(s\); the split needs 12 \(9 for training \+ 3"):
        split_examples(exs, n_train=9, n_val=3)
    with pytest.raises(ValueError, match=r"d.jsonl holds 1 example\(s\)"):
        split_examples(exs[:1])
