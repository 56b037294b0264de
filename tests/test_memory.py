"""minilora.memory: the analytic model agrees with the bytes of a real training step, and gives the lecture's
figures (10B full fine-tuning: 120 GB; the ~40 GB LoRA/QLoRA figure; the QLoRA paper's 65B numbers)."""
import math

import pytest
import torch

from minilora import GPT, GPTConfig, PagedAdamW, add_lora, count_parameters
from minilora.memory import (MemoryBreakdown, activation_bytes_per_token, estimate, format_table, gpt_param_count,
                             measure, nf4_nbytes, saved_activations, scaled_config)
from minilora.memory.activations import ActivationSetup

TARGETS = ["c_attn", "c_proj", "c_fc"]
B, T, R = 2, 24, 4
LECTURE = dict(dtype="fp16", state_dtype="fp32")


def _qlora():
    try:
        from minilora.qlora import quantize_model
    except ImportError as e:  # the NF4 layers are not importable in this checkout
        pytest.skip(f"minilora.qlora not importable: {e}")
    return quantize_model


def _config(ckpt: bool, dropout: float = 0.0) -> GPTConfig:
    return GPTConfig(block_size=32, vocab_size=131, n_layer=4, n_head=4, n_embd=64, dropout=dropout,
                     gradient_checkpointing=ckpt)


def _measured(mode: str, cfg: GPTConfig, dtype=torch.float32, lora_dropout=0.0, optimizer="adamw"):
    torch.manual_seed(0)
    model = GPT(cfg).to(dtype).train()
    if mode == "qlora":
        _qlora()(model, TARGETS)  # every block linear (the tied lm_head stays)
    if mode != "full":
        add_lora(model, TARGETS, r=R, dropout=lora_dropout)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (PagedAdamW(params, page_size=4096, device_budget=8192) if optimizer == "paged"
           else torch.optim.AdamW(params, lr=1e-3))
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    targets = torch.randint(0, cfg.vocab_size, (B, T))
    return measure(model, opt, (idx, targets), steps=2 if optimizer == "paged" else 1)


def _assert_close(est: MemoryBreakdown, got: MemoryBreakdown, rel: float = 0.05):
    table = format_table([est, got])
    for part in ("weights", "quantized_weights", "gradients", "optimizer_state", "adapters", "adapter_gradients",
                 "adapter_optimizer_state", "activations", "offloaded"):
        assert est.relative_error(got, part) <= rel, f"{part} differs by more than {rel:.0%}:\n{table}"
    assert est.relative_error(got) <= rel, table
    assert est.n_params == got.n_params and est.n_trainable == got.n_trainable


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_estimate_matches_measured_step(mode, ckpt):
    cfg = _config(ckpt)
    if mode == "qlora":
        _qlora()
    got = _measured(mode, cfg)
    est = estimate(cfg, mode, batch_size=B, seq_len=T, r=R, targets=TARGETS, device="cpu")
    _assert_close(est, got)
    assert got.activations > 0 and got.total > 0
    if mode == "qlora":
        assert got.quantized_weights > 0 and got.gradients == 0 and got.adapter_gradients > 0


@pytest.mark.parametrize("mode,dtype", [("full", "bf16"), ("lora", "bf16"), ("qlora", "fp32")])
def test_estimate_matches_measured_with_dropout(mode, dtype):
    """Dropout in the GPT and in the adapters (CPU kernels: float masks, math attention); 16-bit weights, or
    an fp32 model around bf16 QLoRA layers (the adapters keep bf16 copies of their inputs)."""
    cfg = _config(True, dropout=0.1)
    got = _measured(mode, cfg, dtype=getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype]), lora_dropout=0.1)
    est = estimate(cfg, mode, batch_size=B, seq_len=T, r=R, targets=TARGETS, dtype=dtype, lora_dropout=0.1,
                   device="cpu")
    _assert_close(est, got)


def test_estimate_matches_measured_paged_optimizer():
    """PagedAdamW: fp32 pages, at most device_budget bytes of them resident, a host copy of every page."""
    cfg = _config(False)
    got = _measured("lora", cfg, optimizer="paged")
    est = estimate(cfg, "lora", batch_size=B, seq_len=T, r=R, targets=TARGETS, optimizer="paged", page_size=4096,
                   device_budget=8192, device="cpu")
    _assert_close(est, got)
    assert got.offloaded > got.adapter_optimizer_state > 0


def test_checkpointing_shrinks_activations_as_sqrt_n():
    cfg = GPTConfig(block_size=64, vocab_size=64, n_layer=16, n_head=2, n_embd=32)
    plain = estimate(cfg, "full", checkpointing=False, device="cpu")
    ckpt = estimate(cfg, "full", checkpointing=True, device="cpu")
    per_block = plain.saved.per_token_per_block() * plain.tokens
    blocks = sum(sum(b.values()) for b in plain.saved.blocks)
    assert blocks == pytest.approx(16 * per_block, rel=0.01)
    # √16 = 4 segments of 4 blocks: the replay of the last segment holds 4 inputs + 4 blocks' activations
    assert ckpt.activations < plain.activations / 2
    assert ckpt.activations <= 4 * per_block + 4 * plain.saved.input_bytes + sum(plain.saved.pre.values()) + 1


def test_per_block_activation_formula():
    """Full fine-tuning, no dropout: 16·C values + (4 + n_head) fp32 statistics per token and block."""
    C, nh = 96, 6
    cfg = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=nh, n_embd=C)
    for dtype, item in ((torch.float32, 4), (torch.float16, 2)):
        per = activation_bytes_per_token(cfg, "full", dtype=dtype, device="cuda")
        assert per["per_block"] == 16 * C * item + (4 + nh) * 4
    lora = activation_bytes_per_token(cfg, "lora", dtype="fp16", r=8, device="cuda")
    assert lora["per_block"] == 16 * C * 2 + (4 + nh) * 4 + 4 * 8 * 2  # + x·Aᵀ (r values) per adapted layer


def test_param_count_and_scaled_config():
    cfg = GPTConfig(block_size=64, vocab_size=100, n_layer=3, n_head=4, n_embd=64)
    assert gpt_param_count(cfg) == count_parameters(GPT(cfg)).total
    c10 = scaled_config(10_000_000_000, n_layer=31, n_embd=5120, n_head=40)
    assert gpt_param_count(c10) == 10_000_000_000
    c65 = scaled_config(65_000_000_000, n_layer=80, n_embd=8192, n_head=64)
    assert abs(gpt_param_count(c65) - 65e9) < 8192
    with pytest.raises(ValueError, match="exceed"):
        scaled_config(1_000_000, n_layer=31, n_embd=5120, n_head=40)


def test_lecture_10b_full_finetuning_is_120_gb():
    c10 = scaled_config(10_000_000_000, n_layer=31, n_embd=5120, n_head=40)
    full = estimate(c10, "full", **LECTURE)
    assert full.weights == full.gradients == 20 * 10**9  # fp16: 2 bytes each
    step_counters = full.optimizer_state - 80 * 10**9  # AdamW's m + v in fp32: 8 bytes per parameter
    assert 0 < step_counters < 10_000  # + one 4-byte step counter per tensor
    assert f"{full.state_bytes / 1e9:.1f}" == "120.0"
    assert full.bytes_per_param("weights") + full.bytes_per_param("gradients") == 4
    mixed = estimate(c10, "full", **LECTURE, master_weights=True)
    assert f"{mixed.state_bytes / 1e9:.1f}" == "160.0" and mixed.master_weights == 40 * 10**9


def test_lecture_40_gb_needs_activations():
    """LoRA/QLoRA state alone is far below 40 GB; the slide's figure holds with activations of N tokens."""
    c10 = scaled_config(10_000_000_000, n_layer=31, n_embd=5120, n_head=40)
    lora = estimate(c10, "lora", **LECTURE, r=64, batch_size=1, seq_len=2048, checkpointing=False)
    qlora = estimate(c10, "qlora", dtype="bf16", compute_dtype="bf16", state_dtype="fp32", r=64, batch_size=1,
                     seq_len=2048, checkpointing=False)
    assert 21e9 < lora.state_bytes < 23e9        # 20 GB fp16 base + adapters with grads and fp32 Adam
    assert 7e9 < qlora.state_bytes < 8e9         # 5 GB NF4 + 0.5 GB embeddings + adapters
    nf4 = sum(nf4_nbytes(5120 * 5120 * k) for k in (3, 1, 4, 4)) * 31  # c_attn, c_proj, c_fc, c_proj
    assert qlora.quantized_weights == nf4
    assert qlora.quantized_weights * 8 / (12 * 5120 * 5120 * 31) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256),
                                                                                 abs=1e-4)
    per_token = lora.activations / lora.tokens
    tokens_for_40 = (40e9 - lora.state_bytes) / per_token
    assert 3000 < tokens_for_40 < 4000
    # activations are linear in the tokens (fused attention has no T² term): twice the batch, twice the bytes
    two = estimate(c10, "lora", **LECTURE, r=64, batch_size=2, seq_len=2048, checkpointing=False)
    assert two.activations == pytest.approx(2 * lora.activations, rel=1e-9)
    assert two.state_bytes == lora.state_bytes


def test_qlora_paper_65b():
    """QLoRA paper: > 780 GB to fine-tune 65B in 16 bits; QLoRA fits in < 48 GB."""
    c65 = scaled_config(65_000_000_000, n_layer=80, n_embd=8192, n_head=64)
    full = estimate(c65, "full", **LECTURE, batch_size=1, seq_len=512)
    assert f"{full.state_bytes / 1e9:.0f}" == "780" and full.total > 780e9
    q = estimate(c65, "qlora", dtype="bf16", compute_dtype="bf16", state_dtype="fp32", r=64, batch_size=1,
                 seq_len=512, checkpointing=True)
    assert q.total < 48e9
    paged = estimate(c65, "qlora", dtype="bf16", compute_dtype="bf16", r=64, batch_size=1, seq_len=512,
                     checkpointing=True, optimizer="paged", device_budget=0)
    assert paged.adapter_optimizer_state < 1e6 and paged.offloaded > 4e9 and paged.total < q.total


def test_nf4_bytes_formula():
    n = 4096 * 4096
    assert nf4_nbytes(n) == n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4
    assert nf4_nbytes(n, double_quant=False) == n // 2 + 4 * (n // 64)
    assert nf4_nbytes(n) * 8 / n == pytest.approx(4.127, abs=1e-3)


def test_nf4_bytes_match_quantized_storage():
    try:
        from minilora.quant import quantize_nf4
    except ImportError as e:
        pytest.skip(f"minilora.quant.quantize_nf4 not importable: {e}")
    for shape in [(64, 64), (96, 40), (3, 1000)]:
        w = torch.randn(shape)
        state = quantize_nf4(w)
        assert state.nbytes == nf4_nbytes(w.numel())


def test_saved_activations_validates_kind():
    s = ActivationSetup(batch_size=1, seq_len=4, kinds=[dict.fromkeys(
        ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), "sideways")], embeddings_trained=True)
    with pytest.raises(ValueError, match="kind"):
        saved_activations(1, 1, 8, 10, s)


def test_bad_arguments():
    cfg = _config(False)
    with pytest.raises(ValueError, match="mode"):
        estimate(cfg, "half")
    with pytest.raises(ValueError, match="seq_len"):
        estimate(cfg, seq_len=33)
    with pytest.raises(ValueError, match="optimizer"):
        estimate(cfg, optimizer="sgd")
    with pytest.raises(TypeError, match="dtype"):
        estimate(cfg, dtype="int8")
    with pytest.raises(ValueError, match="batch_size"):
        estimate(cfg, batch_size=0)
    with pytest.raises(TypeError, match="optimizer"):
        measure(GPT(cfg), None, None)


def test_memory_figure_saved_whole_or_not_at_all(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from minilora.plots import plot_memory_breakdown, save_figure

    c = GPTConfig(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32)
    fig = plot_memory_breakdown([estimate(c, mode, batch_size=1, seq_len=16, r=4) for mode in ("full", "lora")])
    out = save_figure(fig, tmp_path / "figs" / "memory.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(p.name for p in out.parent.iterdir()) == ["memory.png"]
    with pytest.raises(ValueError, match="suffix"):
        save_figure(fig, tmp_path / "memory")
