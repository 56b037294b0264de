"""8-bit optimizer state: the blockwise 8-bit quantizer byte-equal to bitsandbytes', AdamW8bit step for step
against bitsandbytes' AdamW8bit and torch.optim.AdamW, and a state_dict that resumes exactly."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from minilora import AdamW8bit, PagedAdamW8bit
from minilora.quant import dequantize_blockwise_8bit, quantize_blockwise_8bit
from minilora.quant.blockwise8bit import dynamic_map

BF = pytest.importorskip("bitsandbytes.functional")
bnb = pytest.importorskip("bitsandbytes")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCKSIZES = [256, 512, 1024, 2048, 4096]


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps_equal_bitsandbytes(signed):
    assert torch.equal(dynamic_map(signed), BF.create_dynamic_map(signed=signed))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 9000), blocksize=st.sampled_from(BLOCKSIZES), dtype=st.sampled_from(DTYPES),
       signed=st.booleans(), exponent=st.integers(-8, 3), zeros=st.integers(0, 700), seed=st.integers(0, 2**31))
def test_quantize_blockwise_8bit_equals_bitsandbytes(n, blocksize, dtype, signed, exponent, zeros, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 10.0 ** exponent
    if not signed:
        x = x.square()  # a second moment: never negative
    x[:zeros] = 0  # whole blocks of zeros (absmax 0)
    x = x.clamp(-6e4, 6e4).to(dtype)
    code = BF.create_dynamic_map(signed=signed)
    q_ref, s_ref = BF.quantize_blockwise(x, code=code, blocksize=blocksize)
    state = quantize_blockwise_8bit(x, blocksize, signed)
    assert torch.equal(state.codes, q_ref)
    assert torch.equal(state.absmax, s_ref.absmax)
    assert torch.equal(dequantize_blockwise_8bit(state), BF.dequantize_blockwise(q_ref, s_ref))


@pytest.mark.parametrize("signed", [True, False])
def test_error_is_at_most_half_the_largest_gap_per_block(signed):
    x = torch.randn(4096 * 3 + 17, generator=torch.Generator().manual_seed(0))
    x = x if signed else x.abs()
    state = quantize_blockwise_8bit(x, 256, signed)
    code = dynamic_map(signed)
    half_gap = (code[1:] - code[:-1]).max() / 2 + 2 / 65535  # nearest code, snapped to the 65,536-point grid
    bound = state.absmax.repeat_interleave(256)[:x.numel()] * half_gap
    assert ((dequantize_blockwise_8bit(state) - x).abs() <= bound * (1 + 1e-6)).all()
    assert state.codes.shape == x.shape and state.codes.dtype == torch.uint8


def test_quantizer_rejects_bad_input():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_blockwise_8bit(torch.randn(10), blocksize=100)
    with pytest.raises(TypeError, match="float"):
        quantize_blockwise_8bit(torch.arange(10))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_blockwise_8bit(torch.tensor([1.0, float("inf")]))


def _run(make_opt, shapes, steps, seed=1, w0=None):
    w0 = w0 or [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    params = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = make_opt(params)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * (1 + step % 3)
        opt.step()
    return params, opt


SHAPES = [(64, 128), (300, 70), (10, 10), (5000,)]


def test_first_step_state_equals_bitsandbytes_code_for_code():
    ours, opt = _run(lambda ps: AdamW8bit(ps, lr=1e-3), SHAPES, 1)
    ref, ropt = _run(lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3), SHAPES, 1)
    for p, q in zip(ours, ref):
        s, r = opt.state[p], ropt.state[q]
        if p.numel() >= 4096:
            assert torch.equal(s["exp_avg_codes"], r["state1"]) and torch.equal(s["exp_avg_sq_codes"], r["state2"])
            assert torch.equal(s["exp_avg_absmax"], r["absmax1"]) and torch.equal(s["exp_avg_sq_absmax"], r["absmax2"])
        else:
            assert r["state1"].dtype == torch.float32 and "exp_avg" in s  # small tensors keep fp32 state
        assert torch.equal(p, q)


def test_trajectory_within_1e3_of_bitsandbytes_after_100_steps():
    ours, _ = _run(lambda ps: AdamW8bit(ps, lr=1e-3), SHAPES, 100)
    ref, _ = _run(lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3), SHAPES, 100)
    for p, q in zip(ours, ref):
        assert ((p - q).norm() / q.norm()).item() < 1e-3


def test_small_tensors_follow_torch_adamw_exactly_and_large_ones_closely():
    ours, _ = _run(lambda ps: AdamW8bit(ps, lr=1e-2, weight_decay=0.1), SHAPES, 30)
    ref, _ = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), SHAPES, 30)
    assert torch.equal(ours[2], ref[2])  # 100 elements: fp32 state, the same update
    for p, q in zip(ours, ref):
        assert ((p - q).norm() / q.norm()).item() < 2e-2


def test_state_is_two_bytes_per_parameter_plus_absmax():
    ours, opt = _run(lambda ps: AdamW8bit(ps), [(1024, 64)], 1)
    n = 1024 * 64
    assert opt.state_nbytes() == 2 * n + 2 * 4 * (n // 256)


def test_state_dict_round_trips_through_safetensors_and_resumes_exactly(tmp_path):
    full, _ = _run(lambda ps: AdamW8bit(ps, lr=1e-3), SHAPES, 20)
    half, opt = _run(lambda ps: AdamW8bit(ps, lr=1e-3), SHAPES, 10)
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
    save_file(tensors, tmp_path / "opt.safetensors")
    loaded = load_file(tmp_path / "opt.safetensors")
    state = {i: {k: loaded[f"{i}.{k}"] for k in s} for i, s in sd["state"].items()}
    params = [torch.nn.Parameter(p.detach().clone()) for p in half]
    resumed = AdamW8bit(params, lr=1e-3)
    resumed.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    g = torch.Generator().manual_seed(1)
    for step in range(20):  # replay the same gradient stream, applying only the second half
        grads = [torch.randn(p.shape, generator=g) * (1 + step % 3) for p in params]
        if step >= 10:
            for p, gr in zip(params, grads):
                p.grad = gr
            resumed.step()
    for p, q in zip(params, full):
        assert torch.equal(p, q)


def test_bad_hyper_parameters_and_state_are_refused():
    p = torch.nn.Parameter(torch.randn(5000))
    for kw in (dict(lr=float("inf")), dict(lr=-1.0), dict(eps=float("nan")), dict(betas=(0.9, 1.0))):
        with pytest.raises(ValueError):
            AdamW8bit([p], **kw)
    _, opt = _run(lambda ps: AdamW8bit(ps), [(5000,)], 1)
    sd = opt.state_dict()
    sd["state"][0]["exp_avg_codes"] = sd["state"][0]["exp_avg_codes"][:10]
    with pytest.raises(ValueError, match="exp_avg_codes"):
        AdamW8bit([torch.nn.Parameter(torch.randn(5000))]).load_state_dict(sd)


# ----- PagedAdamW8bit: the same update, its state in pages -----

PAGED_SHAPES = [(64, 128), (300, 70), (10, 10), (5000,), (257, 33)]


@pytest.mark.parametrize("budget_pages", [None, 0, 1, 3])
def test_paged_8bit_equals_adamw8bit_under_any_budget(budget_pages):
    page_size = 520 * 8  # 2,048 state elements per page: parameters span several pages and share some
    budget = None if budget_pages is None else budget_pages * page_size
    ref, ropt = _run(lambda ps: AdamW8bit(ps, lr=1e-2), PAGED_SHAPES, 12)
    ours, opt = _run(lambda ps: PagedAdamW8bit(ps, lr=1e-2, page_size=page_size, device_budget=budget),
                     PAGED_SHAPES, 12)
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
    sd, rsd = opt.state_dict(), ropt.state_dict()
    for i in rsd["state"]:
        for k, v in rsd["state"][i].items():
            assert torch.equal(sd["state"][i][k], v), (i, k)
    if budget_pages is not None:
        assert opt.stats.pages_out > 0 and opt.stats.peak_resident_bytes <= max(budget, page_size)


def test_paged_8bit_state_moves_to_and_from_adamw8bit_and_resumes_exactly():
    full, _ = _run(lambda ps: PagedAdamW8bit(ps, page_size=520 * 8, device_budget=520 * 8), PAGED_SHAPES, 8)
    half, opt = _run(lambda ps: AdamW8bit(ps), PAGED_SHAPES, 4)
    params = [torch.nn.Parameter(p.detach().clone()) for p in half]
    resumed = PagedAdamW8bit(params, page_size=520 * 8, device_budget=520 * 8)
    resumed.load_state_dict(opt.state_dict())
    g = torch.Generator().manual_seed(1)
    for step in range(8):
        grads = [torch.randn(p.shape, generator=g) * (1 + step % 3) for p in params]
        if step >= 4:
            for p, gr in zip(params, grads):
                p.grad = gr
            resumed.step()
    for p, q in zip(params, full):
        assert torch.equal(p, q)


def test_paged_8bit_state_is_a_quarter_of_paged_fp32():
    from minilora import PagedAdamW
    shapes = [(1024, 256)]
    _, p8 = _run(lambda ps: PagedAdamW8bit(ps, page_size=520 * 64), shapes, 1)
    _, p32 = _run(lambda ps: PagedAdamW(ps, page_size=2048 * 64), shapes, 1)
    assert p8.state_nbytes() == 1024 * 256 // 256 * 520  # 2 bytes per element + 8 per block of 256
    assert p32.state_nbytes() == 8 * 1024 * 256
    with pytest.raises(ValueError, match="page_size"):
        PagedAdamW8bit([torch.nn.Parameter(torch.zeros(5000))], page_size=100)


# ----- the memory model: estimate agrees with a measured step; the 10B full fine-tune -----

def _measure_8bit(optimizer: str, mode: str):
    from minilora import GPT, GPTConfig, add_lora
    from minilora.memory import estimate, measure
    cfg = GPTConfig(block_size=32, vocab_size=131, n_layer=4, n_head=4, n_embd=64)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    if mode == "lora":
        add_lora(model, ["c_attn", "c_proj", "c_fc"], r=4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (AdamW8bit(params) if optimizer == "adamw8bit"
           else PagedAdamW8bit(params, page_size=520 * 16, device_budget=520 * 32))
    idx, targets = torch.randint(0, 131, (2, 24)), torch.randint(0, 131, (2, 24))
    got = measure(model, opt, (idx, targets), steps=2)
    kw = dict(page_size=520 * 16, device_budget=520 * 32) if optimizer == "paged8bit" else {}
    est = estimate(cfg, mode, batch_size=2, seq_len=24, r=4, targets=["c_attn", "c_proj", "c_fc"],
                   optimizer=optimizer, device="cpu", **kw)
    return est, got


@pytest.mark.parametrize("optimizer", ["adamw8bit", "paged8bit"])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_estimate_matches_a_measured_step_with_8bit_state(optimizer, mode):
    from minilora.memory import format_table
    est, got = _measure_8bit(optimizer, mode)
    table = format_table([est, got])
    for part in ("optimizer_state", "adapter_optimizer_state", "offloaded", "gradients", "weights"):
        assert est.relative_error(got, part) <= 0.05, f"{part}:\n{table}"
    assert est.relative_error(got) <= 0.05, table


def test_10b_full_fine_tune_is_60_gb_with_8bit_adam():
    from minilora.memory import estimate, scaled_config
    c10 = scaled_config(10_000_000_000, n_layer=31, n_embd=5120, n_head=40, block_size=2048)
    kw = dict(dtype="fp16", state_dtype="fp32", batch_size=1, seq_len=2048, checkpointing=False)
    full, eight = estimate(c10, "full", **kw), estimate(c10, "full", optimizer="adamw8bit", **kw)
    n = full.n_params
    assert round(full.state_bytes / 1e9) == 120  # the lecture's figure: 12 bytes per parameter
    assert 60e9 <= eight.state_bytes <= 60e9 + 8 * n / 256 + 1e6  # 2 + 2 + 1 + 1 bytes, plus the absmax
    assert eight.optimizer_state < full.optimizer_state / 3.9


# ----- wired in: the trainer and the command line -----

def test_full_fine_tuning_with_8bit_state_matches_adamw_on_the_yoda_task(demo_base):
    """The demo's base, full fine-tuning at a small budget: validation loss within 5 %, exact match within 3 points."""
    from minilora import GPT
    from minilora.data import InstructionSet, load_tokenizer, yoda_dataset
    from minilora.train import TrainConfig, train
    train_ex, val_ex = yoda_dataset(1000, 100, seed=0)
    final = {}
    for optimizer in ("adamw", "adamw8bit"):
        base = GPT.from_pretrained(demo_base)
        tok = load_tokenizer(demo_base, vocab_size=base.config.vocab_size)
        cfg = TrainConfig(mode="full", optimizer=optimizer, steps=150, lr=1e-3, warmup_steps=10, batch_size=16,
                          progress=False)
        final[optimizer] = train(base, cfg, InstructionSet(train_ex, tok, base.config.block_size),
                                 InstructionSet(val_ex, tok, base.config.block_size)).final
    ref, ours = final["adamw"], final["adamw8bit"]
    assert abs(ours["loss"] - ref["loss"]) <= 0.05 * ref["loss"], final
    assert abs(ours["exact_match"] - ref["exact_match"]) <= 0.03, final


def test_train_config_and_cli_take_the_optimizer(tmp_path, capsys):
    from minilora.__main__ import main
    from minilora.train import TrainConfig, make_optimizer
    model = torch.nn.Linear(100, 100)
    for name, cls in (("adamw", torch.optim.AdamW), ("paged", None), ("adamw8bit", AdamW8bit),
                      ("paged8bit", PagedAdamW8bit)):
        opt = make_optimizer(model, TrainConfig(mode="full", optimizer=name))
        assert type(opt).__name__ == (cls.__name__ if cls else "PagedAdamW")
    assert TrainConfig(paged=True).optimizer == "paged"  # the older flag still works
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="adamw8bit", paged=True)
    assert main(["memory", "--n-layer", "2", "--n-embd", "64", "--n-head", "2", "--vocab-size", "100",
                 "--mode", "full", "--optimizer", "adamw8bit"]) in (0, None)
    assert "optimizer adamw8bit" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["memory", "--optimizer", "lion"])
    assert e.value.code == 2
