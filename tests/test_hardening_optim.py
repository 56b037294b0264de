"""Loading an optimizer's state: it continues the given state exactly, or refuses naming the key and the reason.

- PagedAdamW8bit continues a state with fp32 moments for a parameter of min_8bit_size elements or more (torch
  AdamW's, PagedAdamW's, AdamW8bit's), exactly as AdamW8bit does: the same next step, the same step counter.
- A poisoned state (NaN / Inf / negative absmax, NaN moments, a negative second moment, step NaN or -1, codes
  that are not uint8, absmax that is not float32) is refused with a ValueError naming the key, and neither the
  parameters nor the optimizer's state change: nothing non-finite reaches a parameter through a loaded state.
"""
import math

import pytest
import torch

from minilora import AdamW8bit, PagedAdamW, PagedAdamW8bit

N = 4096  # elements of the large parameter: min_8bit_size, so the 8-bit optimizers keep 8-bit state for it


def params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(64, N // 64)), torch.nn.Parameter(torch.randn(8))]


def grads(ps, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def trained(make, steps: int = 2):
    ps = params()
    opt = make(ps)
    for s in range(steps):
        grads(ps, s)
        opt.step()
    return ps, opt


OPTIMIZERS = {"AdamW8bit": lambda ps: AdamW8bit(ps, lr=1e-2),
              "PagedAdamW8bit": lambda ps: PagedAdamW8bit(ps, lr=1e-2, page_size=4 * 520),
              "PagedAdamW": lambda ps: PagedAdamW(ps, lr=1e-2, page_size=2048)}
FP32_SOURCES = {"torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
                "PagedAdamW": OPTIMIZERS["PagedAdamW"]}


@pytest.mark.parametrize("source", sorted(FP32_SOURCES))
def test_paged8bit_continues_fp32_moments_as_adamw8bit_does(source):
    ps, opt = trained(FP32_SOURCES[source])
    sd = opt.state_dict()
    after = {}
    for name in ("AdamW8bit", "PagedAdamW8bit"):
        qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        o = OPTIMIZERS[name](qs)
        o.load_state_dict(sd)
        assert float(o.state_dict()["state"][0]["step"]) == 2, name
        grads(qs, 7)
        o.step()
        after[name] = [q.detach().clone() for q in qs]
    ref = [p.detach().clone() for p in ps]
    grads(ps, 7)
    opt.step()  # the source itself, one more step: what "continues exactly" means
    for name, qs in after.items():
        for q, p, p0 in zip(qs, ps, ref):
            assert not torch.equal(q, p0), name  # it moved
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)


def poisons(name: str) -> dict:
    """{description: (key it must name, edit of state 0)} for the large parameter's state in `name`'s layout."""
    def setter(key, value):
        def edit(st):
            st[key] = value(st[key])
        return edit
    out = {"step NaN": ("step", setter("step", lambda t: torch.tensor(math.nan))),
           "step -1": ("step", setter("step", lambda t: torch.tensor(-1.0))),
           "step Inf": ("step", setter("step", lambda t: torch.tensor(math.inf)))}
    if name == "PagedAdamW":
        return out | {"exp_avg NaN": ("exp_avg", setter("exp_avg", lambda t: t.index_fill(0, torch.tensor([3]), math.nan))),
                      "exp_avg_sq < 0": ("exp_avg_sq", setter("exp_avg_sq", lambda t: -t - 1)),
                      "exp_avg_sq Inf": ("exp_avg_sq", setter("exp_avg_sq", lambda t: t.index_fill(0, torch.tensor([0]), math.inf)))}
    return out | {
        "absmax NaN": ("exp_avg_absmax", setter("exp_avg_absmax", lambda t: t.index_fill(0, torch.tensor([1]), math.nan))),
        "absmax Inf": ("exp_avg_sq_absmax", setter("exp_avg_sq_absmax", lambda t: t.index_fill(0, torch.tensor([0]), math.inf))),
        "absmax < 0": ("exp_avg_absmax", setter("exp_avg_absmax", lambda t: -t - 1)),
        "absmax fp16": ("exp_avg_absmax", setter("exp_avg_absmax", lambda t: t.half())),
        "codes float32": ("exp_avg_codes", setter("exp_avg_codes", lambda t: t.float())),
        "codes int8": ("exp_avg_sq_codes", setter("exp_avg_sq_codes", lambda t: t.view(torch.int8))),
    }


CASES = [(name, poison) for name in sorted(OPTIMIZERS) for poison in poisons(name)]


@pytest.mark.parametrize("name,poison", CASES)
def test_a_poisoned_state_is_refused_naming_the_key_and_changes_nothing(name, poison):
    ps, opt = trained(OPTIMIZERS[name])
    sd = opt.state_dict()
    key, edit = poisons(name)[poison]
    edit(sd["state"][0])
    target_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    target, _ = OPTIMIZERS[name](target_ps), None
    grads(target_ps, 5)
    target.step()  # a state of its own, which a refused load must leave as it was
    before_p = [p.detach().clone() for p in target_ps]
    before = target.state_dict()
    with pytest.raises(ValueError, match=key):
        target.load_state_dict(sd)
    assert all(torch.equal(p, q) for p, q in zip(target_ps, before_p)), "a refused load changed a parameter"
    now = target.state_dict()
    assert now["state"].keys() == before["state"].keys()
    for i in before["state"]:
        for k, v in before["state"][i].items():
            assert torch.equal(now["state"][i][k], v), f"a refused load changed state {i}.{k}"
    grads(target_ps, 6)
    target.step()
    assert all(bool(torch.isfinite(p).all()) for p in target_ps)
