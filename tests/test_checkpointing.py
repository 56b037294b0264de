import math

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint

from minilora import (GPT, GPTConfig, SavedTensorMeter, add_lora, checkpoint_sequential, measure_saved_activations,
                      segment_bounds)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def gpt(n_layer: int, ckpt: bool, segments=None, dropout=0.1, n_embd=32, block_size=32) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=block_size, vocab_size=61, n_layer=n_layer, n_head=2, n_embd=n_embd,
                    dropout=dropout, gradient_checkpointing=ckpt, checkpoint_segments=segments)
    return GPT(cfg).train()


def batch(T=32, B=2):
    return torch.randint(0, 61, (B, T), generator=torch.Generator().manual_seed(1))


def fwd_bwd(model, idx, seed=7):
    torch.manual_seed(seed)  # same dropout masks for every model built the same way
    _, loss = model(idx, idx)
    loss.backward()
    return loss.detach()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----- segments -----

def test_segment_bounds_default_is_ceil_sqrt_n():
    assert segment_bounds(16) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert segment_bounds(10) == [(0, 3), (3, 6), (6, 8), (8, 10)]  # ⌈√10⌉ = 4 segments, sizes 3 3 2 2
    assert len(segment_bounds(36)) == 6 and len(segment_bounds(37)) == 7
    for n in range(1, 50):
        b = segment_bounds(n)
        assert len(b) == math.ceil(math.sqrt(n)) and b[0][0] == 0 and b[-1][1] == n
        assert all(e0 == s1 for (_, e0), (s1, _) in zip(b, b[1:]))
        assert max(e - s for s, e in b) - min(e - s for s, e in b) <= 1
    assert segment_bounds(5, 5) == [(i, i + 1) for i in range(5)] and segment_bounds(5, 1) == [(0, 5)]


@pytest.mark.parametrize("bad", [0, 17, -1, 2.0, True, "4"])
def test_bad_segment_count_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="segments"):
        segment_bounds(16, bad)
    with pytest.raises(ValueError, match="checkpoint_segments"):
        GPTConfig(n_layer=16, n_head=2, n_embd=32, checkpoint_segments=bad)


# ----- gradients -----

@pytest.mark.parametrize("segments", [None, 1, 2, 4])
def test_gradients_equal_without_checkpointing_with_dropout(segments):
    idx = batch()
    plain, ckpt = gpt(4, False), gpt(4, True, segments)
    loss0, loss1 = fwd_bwd(plain, idx), fwd_bwd(ckpt, idx)
    after0 = torch.rand(3)  # the global random stream continues as without checkpointing
    fwd_bwd(gpt(4, True, segments), idx)
    after1 = torch.rand(3)
    assert torch.equal(loss0, loss1) and torch.equal(after0, after1)
    g0, g1 = grads(plain), grads(ckpt)
    assert g0.keys() == g1.keys() and len(g0) == len(list(plain.parameters()))
    for name in g0:
        assert rel(g1[name], g0[name]) <= 1e-6, name


def test_without_rng_replay_the_masks_differ_and_gradients_go_wrong():
    """Negative control: a replay that draws fresh dropout masks gives different (wrong) gradients."""
    idx = batch()
    plain = gpt(2, False)
    fwd_bwd(plain, idx)
    model = gpt(2, True)
    torch.manual_seed(7)
    x = model.transformer.drop(model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.size(1))))
    x = checkpoint_sequential(model.transformer.h, x, segments=2, preserve_rng_state=False)
    logits = model.lm_head(model.transformer.ln_f(x))
    nn.functional.cross_entropy(logits.view(-1, 61), idx.view(-1)).backward()
    g0, wrong = grads(plain), grads(model)
    assert rel(wrong["transformer.wpe.weight"], g0["transformer.wpe.weight"]) > 1e-3


def test_gradients_reach_lora_adapters_when_segment_input_is_frozen():
    idx = batch()
    models = []
    for ckpt in (False, True):
        m = gpt(4, ckpt)
        add_lora(m, ["c_attn", "c_fc"], r=4, alpha=8, dropout=0.1)
        torch.manual_seed(3)
        for name, p in m.named_parameters():  # B = 0 at init would make every dA zero: randomise B
            if name.endswith("lora_B"):
                nn.init.normal_(p, std=0.05)
        models.append(m)
    plain, ckpt = models
    assert not plain.transformer.wte.weight.requires_grad  # the embedding output (segment input) is frozen
    fwd_bwd(plain, idx)
    fwd_bwd(ckpt, idx)
    g0, g1 = grads(plain), grads(ckpt)
    assert g0.keys() == g1.keys()
    assert all(n.endswith(("lora_A", "lora_B")) for n in g1) and len(g1) == 4 * 2 * 2
    for name in g0:
        assert g1[name].abs().sum() > 0, name
        assert rel(g1[name], g0[name]) <= 1e-6, name


def test_inactive_in_eval_and_without_grad():
    idx = batch()
    model = gpt(4, True)
    calls = []
    model.transformer.h[0].register_forward_hook(lambda *a: calls.append(1))
    model.eval()
    with torch.no_grad():
        ref = model(idx)
    model.train()
    with torch.no_grad():  # dropout active but no graph: blocks run once, nothing checkpointed
        model(idx)
    assert len(calls) == 2
    model.eval()
    _, loss = model(idx, idx)
    loss.backward()
    assert len(calls) == 3  # eval mode: no recompute in backward
    model.train()
    fwd_bwd(model, idx)
    assert len(calls) == 5  # training: forward + recompute in backward
    assert ref.shape == (2, 32, 61)


def test_checkpoint_sequential_on_plain_modules_with_some_frozen():
    torch.manual_seed(0)
    layers = [nn.Linear(8, 8) for _ in range(6)]
    mods = [m for lin in layers for m in (lin, nn.Tanh(), nn.Dropout(0.2))]
    for lin in layers[:4]:
        lin.requires_grad_(False)
    x = torch.randn(5, 8)  # input does not require grad
    outs = []
    for ckpt in (False, True):
        for lin in layers:
            lin.zero_grad()
        torch.manual_seed(1)
        y = checkpoint_sequential(mods, x, segments=3) if ckpt else nn.Sequential(*mods)(x)
        (y ** 2).sum().backward()
        outs.append([lin.weight.grad.clone() for lin in layers[4:]])
        assert all(lin.weight.grad is None for lin in layers[:4])
    for a, b in zip(*outs):
        assert rel(b, a) <= 1e-6
    with pytest.raises(TypeError, match="modules"):
        checkpoint_sequential(nn.Linear(2, 2), x)


# ----- the meter -----

def test_meter_counts_storages_once_excludes_parameters_and_releases():
    x = torch.randn(64, 32, requires_grad=True)
    lin = nn.Linear(32, 16)
    with SavedTensorMeter() as m:
        y = (x * x).sum()  # mul saves x twice: one storage
        assert m.current == 64 * 32 * 4
        z = lin(x)  # saves x (already counted) and weight (a parameter: left out)
        e = z.exp()  # saves its result, 64·16 floats
        assert m.current == 64 * 32 * 4 + 64 * 16 * 4
        (y + e.sum()).backward()
        del y, z, e
    assert m.current == 0 and m.peak == 64 * 32 * 4 + 64 * 16 * 4
    r = measure_saved_activations(lambda: (x.exp() * 2).sum().backward())
    assert r.peak == 64 * 32 * 4 == r.total


def test_sqrt_n_law_measured_on_a_16_block_gpt():
    n, idx = 16, batch(T=32, B=2)
    plain, mine = gpt(n, False), gpt(n, True)
    theirs = gpt(n, False)
    bounds = segment_bounds(n)

    def torch_blocks(x):
        for s, e in bounds:
            x = torch_checkpoint.checkpoint(nn.Sequential(*theirs.transformer.h[s:e]), x, use_reentrant=True)
        return x

    theirs.run_blocks = torch_blocks
    peak = {name: measure_saved_activations(lambda m=m: fwd_bwd(m, idx), exclude=m).peak
            for name, m in (("none", plain), ("minilora", mine), ("torch", theirs))}
    assert peak["minilora"] <= 2 * math.sqrt(n) / n * peak["none"] * 1.15, peak
    assert abs(peak["minilora"] - peak["torch"]) <= 0.10 * peak["torch"], peak


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA random state is replayed only on CUDA")
def test_cuda_dropout_replay_gives_equal_gradients():
    idx = batch().cuda()
    plain, ckpt = gpt(4, False).cuda(), gpt(4, True).cuda()
    fwd_bwd(plain, idx)
    fwd_bwd(ckpt, idx)
    g0, g1 = grads(plain), grads(ckpt)
    for name in g0:  # CUDA's embedding backward adds with atomics: equal up to summation order
        assert rel(g1[name], g0[name]) <= 1e-5, name
