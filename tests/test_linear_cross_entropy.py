"""LinearCrossEntropy against F.cross_entropy(F.linear(x, W), t): loss, logits, gradients, saved bytes, refusals."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minilora.ops.linear_cross_entropy import LinearCrossEntropy, fused_applies, head_and_loss
from minilora.llama import Llama, LlamaConfig
from minilora.memory import SavedTensorMeter


def plain(x, weight, t):
    logits = F.linear(x, weight)
    return logits, F.cross_entropy(logits.float(), t, ignore_index=-100)


def run(fn, x0, w0, t, train_w: bool, logits_term: float):
    """loss (+ logits_term · Σ logits² when nonzero, so the logits get a gradient of their own) and its grads."""
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_(train_w)
    logits, loss = fn(x, w, t)
    total = loss + logits_term * logits.pow(2).sum() if logits_term else loss
    total.backward()
    return logits.detach(), loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("N,C,V,ignored,train_w,logits_term,w_std", [
    (64, 32, 1000, 0.2, False, 0.0, 0.3),    # V not a multiple of the block width
    (1, 16, 7, 0.0, True, 0.0, 0.3),         # one row, fewer words than a block
    (96, 48, 5003, 0.5, True, 1e-3, 0.3),    # W trained and the logits used elsewhere too
    (40, 24, 300, 0.0, False, 1e-2, 0.3),
    (48, 16, 3000, 0.1, True, 0.0, 10.0),    # logits in the hundreds: most log-probabilities far below -100
])
def test_equals_linear_then_cross_entropy(N, C, V, ignored, train_w, logits_term, w_std):
    g = torch.Generator().manual_seed(N + V)
    x, w = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g) * w_std
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < ignored] = -100
    ours = run(LinearCrossEntropy.apply, x, w, t, train_w, logits_term)
    ref = run(plain, x, w, t, train_w, logits_term)
    assert torch.equal(ours[0], ref[0])  # each logit is the same dot product
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(ours[2:], ref[2:]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    exact = run(plain, x.double(), w.double(), t, train_w, logits_term)  # float64: which is nearer the truth
    for a, b, e in zip(ours[1:], ref[1:], exact[1:]):
        if a is not None:
            assert (a.double() - e).abs().max() <= 2 * (b.double() - e).abs().max() + 1e-6 * e.abs().max()  # a few float32 ulps


def test_every_target_ignored_gives_nan_and_zero_gradients_as_cross_entropy_does():
    x, w, t = torch.randn(5, 8), torch.randn(11, 8), torch.full((5,), -100)
    ours, ref = run(LinearCrossEntropy.apply, x, w, t, True, 0.0), run(plain, x, w, t, True, 0.0)
    assert torch.isnan(ours[1]) and torch.isnan(ref[1])
    for a, b in zip(ours[2:], ref[2:]):
        assert torch.equal(a, b) and not a.any()


def test_saves_the_bytes_cross_entropy_saves():
    """The logits it keeps take the bytes of the log-probabilities F.cross_entropy keeps (minilora.memory counts)."""
    x = torch.randn(32, 16, requires_grad=True)
    w, t = torch.randn(3001, 16), torch.randint(0, 3001, (32,))
    sizes = []
    for fn in (LinearCrossEntropy.apply, plain):
        with SavedTensorMeter(exclude=[w]) as meter:  # the weight is a parameter, not an activation
            _, loss = fn(x, w, t)
        sizes.append(meter.peak)
        loss.backward()
    assert sizes[0] == sizes[1] == 32 * 3001 * 4 + 32 * 8 + 4


def test_bad_targets_are_refused_by_name():
    head = nn.Linear(8, 10, bias=False)
    x = torch.randn(1, 3, 8)
    for bad in (10, -5):
        with pytest.raises(IndexError, match=f"target {bad} is out of bounds"):
            head_and_loss(head, x, torch.tensor([[1, bad, 2]]))
    with pytest.raises(ValueError, match="targets must be int64 of shape"):
        head_and_loss(head, x, torch.tensor([[1, 2]]))


def test_only_a_plain_float32_head_takes_the_fused_step():
    x = torch.randn(2, 3, 8)
    assert fused_applies(nn.Linear(8, 10, bias=False), x)
    assert not fused_applies(nn.Linear(8, 10), x)  # a bias
    assert not fused_applies(nn.Linear(8, 10, bias=False).to(torch.bfloat16), x.bfloat16())
    hooked = nn.Linear(8, 10, bias=False)
    hooked.register_forward_hook(lambda *a: None)
    assert not fused_applies(hooked, x)


def test_llama_loss_and_gradients_equal_the_plain_head():
    """A Llama's loss and every gradient (all weights trained, tied head) equal those of the plain head."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=1031, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    idx = torch.randint(0, 1031, (3, 17))
    targets = torch.roll(idx, -1, 1)
    targets[:, -1] = -100
    _, loss = model(idx, targets)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(idx)  # no targets: the plain head
    ref = F.cross_entropy(logits.view(-1, 1031), targets.view(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
