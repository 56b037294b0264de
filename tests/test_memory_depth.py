"""The memory estimate at any depth: outside + n_layer × one block gives the bytes the full-depth model gave, and a
model of a million layers is described from one block (no block built per layer, bytes exactly linear in depth)."""
import json
from pathlib import Path

import pytest

import minilora.gpt
import minilora.llama
from memory_cases import cases, run_case
from minilora.gpt import GPTConfig
from minilora.llama import LlamaConfig
from minilora.memory import estimate, gpt_param_count
from minilora.memory.inventory import _one_block_model
from minilora.memory.llama import llama_param_count

GOLDEN = json.loads((Path(__file__).parent / "memory_golden.json").read_text())


def test_same_bytes_as_the_full_depth_meta_model():
    """400 seeded cases (GPT and Llama, 1-9 blocks, every mode, optimizer, fsdp, dtype, checkpointing, and target
    patterns that select every block, some blocks by number, or none): every field equal to what the estimate
    that built the whole model on the meta device gave (tests/memory_golden.json), errors included."""
    got = [run_case(*c) for c in cases()]
    assert len(got) == len(GOLDEN) == 400
    diff = [(i, c) for i, (c, a, b) in enumerate(zip(cases(), got, GOLDEN)) if a != b]
    assert not diff, f"{len(diff)} cases differ, first {diff[0]}"


def _count_blocks(monkeypatch) -> list[int]:
    built = [0]
    for cls in (minilora.gpt.Block, minilora.llama.LlamaDecoderLayer):
        init = cls.__init__

        def counting(self, *a, _init=init, **k):
            built[0] += 1
            _init(self, *a, **k)
        monkeypatch.setattr(cls, "__init__", counting)
    return built


DEEP = [GPTConfig(block_size=64, vocab_size=100, n_layer=10**6, n_head=4, n_embd=64),
        LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=10**6,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)]


@pytest.mark.parametrize("config", DEEP, ids=["gpt", "llama"])
def test_a_million_layers_are_described_by_one_block(config, monkeypatch):
    _one_block_model.cache_clear()
    built = _count_blocks(monkeypatch)
    field = "num_hidden_layers" if isinstance(config, LlamaConfig) else "n_layer"
    for depth in (1000, 10**6):
        cfg = type(config)(**{**vars(config), field: depth})
        for mode in ("full", "lora", "qlora"):
            for kw in ({}, dict(checkpointing=True), dict(fsdp=2, batch_size=2), dict(optimizer="paged8bit")):
                m = estimate(cfg, mode, **kw)
                assert m.n_params == (llama_param_count if field == "num_hidden_layers" else gpt_param_count)(cfg)
        assert built[0] == 1, depth  # the one block that stands for all of them, built once (then cached)


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_bytes_are_exactly_linear_in_depth(family, mode):
    """Without checkpointing every part is a + b·n_layer: equal steps from 10⁶ to 2·10⁶ to 3·10⁶ layers, and the
    step is what one layer adds between 1 and 2 layers."""
    def at(n):
        field = "num_hidden_layers" if family == "llama" else "n_layer"
        cfg = DEEP[family == "llama"]
        m = estimate(type(cfg)(**{**vars(cfg), field: n, "checkpoint_segments": None}), mode,
                     checkpointing=False, batch_size=2, fsdp=2)
        return {**m.as_dict(), "n_params": m.n_params, "n_trainable": m.n_trainable}

    one, two = at(1), at(2)
    m1, m2, m3 = at(10**6), at(2 * 10**6), at(3 * 10**6)
    for k in m1:
        if k != "gathered":  # FSDP gathers one block at a time: the same at any depth
            assert m3[k] - m2[k] == m2[k] - m1[k] == 10**6 * (two[k] - one[k]), k
        else:
            assert m1[k] == m3[k] == one[k]


def _naive_peak(acts) -> int:
    """The peak as the full-depth walk computed it: every block's dict, every segment replayed."""
    def union(*dicts):
        merged = {}
        for d in dicts:
            merged.update(d)
        return sum(merged.values())
    blocks, pre, post = acts.blocks, acts.pre, acts.post
    if acts.segments is None:
        return union(pre, *blocks, post)
    inputs = [f"h{i}.x" for i in range(len(blocks))]
    peak = union(pre, {inputs[a]: acts.input_bytes for a, _ in acts.segments}, post)
    kept = {}
    for a, b in acts.segments:
        kept[inputs[a]] = acts.input_bytes
        peak = max(peak, union(pre, kept, *blocks[a:b]))
    return peak


def test_checkpointed_peak_from_the_segments_next_to_a_run_boundary():
    """Random runs of blocks (some saving their input 'x', some a shared tensor), any segment count: the peak
    from the few segments next to a boundary equals the maximum over every segment replayed."""
    import random

    from minilora.memory.depth import BlockRun, SavedActivations
    rng = random.Random(0)
    for _ in range(300):
        runs = [BlockRun(rng.randint(1, 6), {k: rng.randint(1, 50) for k in rng.sample(["x", "a", "b", "c"], 2)},
                         rng.choice([{}, {"rope": 7}])) for _ in range(rng.randint(1, 5))]
        n = sum(r.count for r in runs)
        acts = SavedActivations(pre={"idx": rng.randint(0, 9)}, runs=runs, post={f"h{n}.x": 5, "log_probs": 11},
                                n_segments=rng.choice([None, rng.randint(1, n)]), tokens=1,
                                input_bytes=rng.randint(1, 60))
        assert acts.peak == _naive_peak(acts)


PATTERNS = [r".*c_attn", r".*\.h\.\d+\.mlp\..*_fc", r"transformer\.h\.[0-9]+\.attn\.c_attn", r".*[^a]\.attn\.c_attn",
            r"(?i).*C_PROJ", r".*\.[13]\.attn\.c_.*", r".*[^5]\.attn\.c_attn", r".*h\.(\d)\1\..*", r".*\.1\d\..*c_fc",
            r"transformer.h.12.mlp.c_fc", r"[", r".*\.(?=2)\d+\.ln_1"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_pattern_selects_the_same_blocks_as_block_by_block(pattern):
    """Tried once per digit count (a pattern blind to digits) or block by block: the same (block, module) pairs
    as matching every name of a 1234-block GPT with minilora.inject's rule."""
    from minilora.inject import _matches
    from minilora.memory.inventory import Layers
    layers = Layers(GPTConfig(block_size=8, vocab_size=11, n_layer=1234, n_head=1, n_embd=4))
    got = {(i, n) for a, b, n in layers._spans(pattern) for i in range(a, b)}
    want = {(i, n) for i in range(1234) for n in layers.block_names if _matches(layers.name(i, n), pattern)}
    assert got == want


def test_a_digit_blind_regex_is_tried_once_per_digit_count(monkeypatch):
    """r'.*c_attn' on a million blocks: tried on one block of each digit count (7), not a million."""
    import minilora.memory.inventory as inventory
    calls = [0]
    real = inventory.matches

    def counting(name, pattern):
        calls[0] += 1
        return real(name, pattern)
    monkeypatch.setattr(inventory, "matches", counting)
    m = estimate(DEEP[0], "lora", targets=r".*c_attn")
    names = len(inventory.Layers(DEEP[0]).names)
    assert calls[0] <= names + 7 * names and m.adapters == 10**6 * 8 * (64 + 3 * 64) * 4  # A and B at r 8, fp32
