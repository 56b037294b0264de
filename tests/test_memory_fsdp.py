"""estimate(..., fsdp=N): one process's bytes when FSDP shards every parameter on dim 0, checked against sums
taken over a real minilora GPT's tensors (not against the estimate's own arithmetic). Fast: no training."""
import math

import pytest
import torch

import minilora.__main__ as cli
from minilora import GPT, GPTConfig, add_lora
from minilora.memory import PARTS, estimate
from minilora.memory.sharded import nf4_tensors
from minilora.qlora import add_qlora

# Odd sizes on purpose: 509 rows of wte, 30 of wpe, 144 of c_attn do not divide by 4, so ⌈dim 0 / N⌉ matters.
CONFIG = GPTConfig(block_size=30, vocab_size=509, n_layer=3, n_head=4, n_embd=48)
TARGETS = ["c_attn", "c_proj", "c_fc"]
R, BATCH, SEQ = 3, 5, 30
NF4_STORAGE = ("packed", "absmax", "nested_absmax")  # the 1-D tensors FSDP shards; the 0-dim offset is replicated


def real_model(mode: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    if mode == "qlora":
        add_qlora(model, TARGETS, r=R)
    elif mode == "lora":
        add_lora(model, TARGETS, r=R)
    return model


def tensors(model: GPT):
    """(name, shape, bytes per element, trainable, sharded) of every parameter and NF4 storage tensor."""
    for name, p in model.named_parameters():
        yield name, tuple(p.shape), p.element_size(), p.requires_grad, True
    for name, b in model.named_buffers():
        leaf = name.rpartition(".")[2]
        if leaf in NF4_STORAGE or leaf == "offset":
            yield name, tuple(b.shape), b.element_size(), False, leaf != "offset"


def held(shape, size, n, sharded=True) -> int:
    if not sharded:
        return math.prod(shape) * size
    return math.ceil(shape[0] / n) * math.prod(shape[1:]) * size


def unit(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:3]) if parts[:2] == ["transformer", "h"] else "root"


def expected(model: GPT, n: int) -> dict[str, int]:
    """The per-process bytes of rank 0, summed over the real model's tensors."""
    nf4 = sum(held(s, e, n, sh) for name, s, e, _, sh in tensors(model) if name.rpartition(".")[2] in
              NF4_STORAGE + ("offset",))
    adapters = [(s, e) for name, s, e, _, _ in tensors(model) if "lora_" in name]
    trainable = [(s, e) for _, s, e, t, _ in tensors(model) if t]
    everything = sum(held(s, e, n, sh) for _, s, e, _, sh in tensors(model))
    units: dict[str, int] = {}
    for name, s, e, _, sh in tensors(model):
        if sh:
            units[unit(name)] = units.get(unit(name), 0) + math.ceil(s[0] / n) * n * math.prod(s[1:]) * e
    return dict(nf4=nf4, adapters=sum(held(s, e, n) for s, e in adapters), held=everything,
                grads=sum(held(s, e, n) for s, e in trainable),
                state=sum(2 * held(s, e, n) + 4 for s, e in trainable),  # exp_avg, exp_avg_sq + fp32 step
                gathered=units["root"] + max(b for u, b in units.items() if u != "root"))


def est(mode: str, **kw):
    return estimate(CONFIG, mode, batch_size=kw.pop("batch_size", BATCH), seq_len=SEQ, r=R, targets=TARGETS,
                    device="cpu", **kw)


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_fsdp_1_is_the_unsharded_estimate_field_for_field(mode):
    one, plain = est(mode, fsdp=1), est(mode)
    assert one.as_dict() == plain.as_dict() and one.weights_by_dtype == plain.weights_by_dtype
    assert one.gathered == 0 and "gathered" in dict(PARTS)
    want = expected(real_model(mode), 1)
    assert one.weights + one.quantized_weights + one.adapters == want["held"]


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_sharded_parts_are_rank_0s_ceil_share_of_the_real_tensors(mode, n):
    got, want = est(mode, fsdp=n), expected(real_model(mode), n)
    assert got.weights + got.quantized_weights + got.adapters == want["held"]
    assert got.quantized_weights == want["nf4"] and got.adapters == want["adapters"]
    assert got.gradients + got.adapter_gradients == want["grads"]
    assert got.optimizer_state + got.adapter_optimizer_state == want["state"]
    assert got.gathered == want["gathered"] > 0
    full = est(mode)  # about 1/N of the unsharded bytes, never less
    for part in ("weights", "quantized_weights", "adapters", "gradients", "optimizer_state"):
        if getattr(full, part):
            assert getattr(full, part) / n <= getattr(got, part) < getattr(full, part) / n * 1.2, part
    assert got.n_params == full.n_params and got.n_trainable == full.n_trainable  # counts stay the model's


def test_nf4_storage_tensors_match_a_quantized_layer():
    model = real_model("qlora")
    layer = model.transformer.h[0].attn.c_attn.base_layer
    shapes = [(getattr(layer, k).numel(), getattr(layer, k).element_size()) for k in NF4_STORAGE]
    assert nf4_tensors(layer.out_features * layer.in_features) == shapes


@pytest.mark.parametrize("n", [2, 4])
def test_activations_are_those_of_rank_0s_share_of_the_batch(n):
    for mode in ("lora", "qlora"):
        got, alone = est(mode, fsdp=n), est(mode, batch_size=math.ceil(BATCH / n))
        assert got.activations == alone.activations and got.tokens == alone.tokens == math.ceil(BATCH / n) * SEQ
        assert got.activations < est(mode).activations


def test_cpu_offload_keeps_only_the_gathered_units_activations_and_offsets_on_the_device():
    on, off = est("qlora", fsdp=2, cpu_offload=True), est("qlora", fsdp=2)
    n_offsets = 4 * 4 * CONFIG.n_layer  # an fp32 offset per quantized linear (4 a block), replicated
    assert on.quantized_weights == n_offsets
    assert on.total == on.gathered + on.activations + n_offsets
    assert on.total + on.offloaded == off.total and on.offloaded > 0


@pytest.mark.parametrize("kw, needle", [
    (dict(fsdp=0), "fsdp"), (dict(fsdp=-2), "fsdp"), (dict(fsdp=1.5), "fsdp"), (dict(fsdp=True), "fsdp"),
    (dict(fsdp="2"), "fsdp"), (dict(fsdp=2, optimizer="paged"), "optimizer"),
    (dict(fsdp=2, optimizer="adamw8bit"), "optimizer"), (dict(fsdp=8), "batch_size"),
    (dict(cpu_offload=True), "cpu_offload"), (dict(fsdp=2, cpu_offload="yes"), "cpu_offload"),
])
def test_bad_fsdp_settings_are_refused_naming_the_argument(kw, needle):
    with pytest.raises(ValueError, match=needle):
        est("qlora", **kw)


def test_cli_memory_prints_per_process_figures(capsys):
    argv = ["memory", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--vocab-size",
            "100", "--batch-size", "4", "--mode", "qlora", "--fsdp", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "per process of 2 (FSDP)" in out.splitlines()[0] and "gathered block (FSDP)" in out
    assert cli.main(argv + ["--cpu-offload"]) == 0
    out = capsys.readouterr().out
    assert "per process of 2 (FSDP, CPU offload)" in out and "offloaded (host)" in out


def test_cli_refuses_to_measure_fsdp_in_one_process(capsys):
    rc = cli.main(["memory", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--measure", "--fsdp", "2"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "--measure" in err and "torchrun" in err
