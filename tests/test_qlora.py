import copy

import pytest
import torch
import torch.nn as nn

from minilora import GPT, GPTConfig, LoRALinear, QLoRALinear, add_lora, count_parameters, lora_layers
from minilora.nf4_linear import FUSED_MAX_M, NF4Linear, resolve_backend
from minilora.qlora import merge_qlora, quantize_model


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def pair(compute_dtype, r=4, in_f=192, out_f=80, seed=0):
    """A QLoRALinear and a LoRALinear over its dequantized weight, with the same (non-zero) adapters."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f)
    q = QLoRALinear.from_linear(linear, r=r, alpha=8, compute_dtype=compute_dtype, backend="torch")
    nn.init.normal_(q.lora_B, std=0.1)
    dense = nn.Linear(in_f, out_f)
    with torch.no_grad():
        dense.weight.copy_(q.base_layer.dequantized_weight(torch.float32))
        dense.bias.copy_(linear.bias)
    ref = LoRALinear(dense, r=r, alpha=8)
    with torch.no_grad():
        ref.lora_A.copy_(q.lora_A.float())
        ref.lora_B.copy_(q.lora_B.float())
    return q, ref


@pytest.mark.parametrize("compute_dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_forward_and_backward_agree_with_lora_on_the_dequantized_weight(compute_dtype, tol):
    q, ref = pair(compute_dtype)
    x = torch.randn(3, 7, 192)
    xq, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yq, yr = q(xq), ref(xr)
    assert yq.dtype == x.dtype and yq.shape == (3, 7, 80)
    assert rel(yq, yr) < tol
    g = torch.randn_like(yr)
    yq.backward(g)
    yr.backward(g)
    assert rel(xq.grad, xr.grad) < tol
    assert rel(q.lora_A.grad, ref.lora_A.grad) < tol
    assert rel(q.lora_B.grad, ref.lora_B.grad) < tol
    assert q.base_layer.bias.grad is None and not any(b.requires_grad for b in q.base_layer.buffers())


def test_autograd_keeps_the_packed_weight_not_the_dequantized_one():
    q, _ = pair(torch.float32, in_f=512, out_f=512)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    dense_bytes = 512 * 512 * 4
    saved_bytes = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in saved}.values())
    assert all(t.numel() < 512 * 512 for t in saved)  # no full-size (out × in) tensor is kept
    assert saved_bytes < 0.2 * dense_bytes  # packed weight (~0.13 of fp32) + activations of 4 rows
    assert any(t.dtype == torch.uint8 and t.numel() == 512 * 512 // 2 for t in saved)
    y.sum().backward()
    assert x.grad is not None


def test_quantize_model_then_add_lora_is_qlora_and_stores_4127_bits_per_weight():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=512))
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"}
    quantize_model(model, compute_dtype=torch.bfloat16)
    nf4 = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert set(nf4) == set(linears)  # the tied lm_head stays as it is
    bf16_bytes = sum(m.weight.numel() * 2 for m in linears.values())
    stored = sum(m.quantized_nbytes for m in nf4.values())
    assert stored <= 4.127 / 16 * bf16_bytes
    add_lora(model, ["c_attn", "c_fc"], r=4)
    assert all(isinstance(l, QLoRALinear) for l in lora_layers(model).values())
    count = count_parameters(model)
    assert count.trainable == 2 * 4 * ((512 + 1536) + (512 + 2048))
    assert count.total == sum(p.numel() for p in GPT(model.config).parameters()) + count.trainable


def test_qlora_gpt_learns_like_lora_gpt():
    cfg = GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=64)
    data = torch.arange(16).repeat(8, 1) % 32  # a fixed sequence to memorise
    curves = {}
    for kind in ("lora", "qlora"):
        torch.manual_seed(0)
        model = GPT(cfg)
        if kind == "qlora":
            quantize_model(model, ["c_attn", "c_proj", "c_fc"], compute_dtype=torch.float32, backend="torch")
        add_lora(model, ["c_attn", "c_fc", "c_proj"], r=8, alpha=16)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        curves[kind] = []
        for _ in range(60):
            _, loss = model(data[:, :-1], data[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            curves[kind].append(loss.item())
    for kind, curve in curves.items():
        assert curve[-1] < 0.75 * curve[0], kind  # from ln(32) = 3.47
    assert abs(curves["qlora"][-1] - curves["lora"][-1]) < 0.05 * curves["lora"][-1]


def test_merge_qlora_dequantizes_and_reports_requantization_error():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=64)).eval()
    quantize_model(model, compute_dtype=torch.float32, backend="torch")
    add_lora(model, ["c_attn", "c_fc"], r=4)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=0.05)
    idx = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        before = model(idx)
    layer = next(iter(lora_layers(model).values()))
    layer.merge()  # LoRALinear's contract: merged, one dense matmul, same outputs; unmerge() is exact
    assert isinstance(layer.merged_linear, nn.Linear)
    with torch.no_grad():
        assert rel(model(idx), before) < 1e-5
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert layer.merged_linear is None and isinstance(layer.base_layer, NF4Linear)
    with torch.no_grad():
        assert torch.equal(model(idx), before)
    merged, report = merge_qlora(model)
    assert not lora_layers(merged) and report == {}
    assert type(merged.transformer.h[0].attn.c_attn) is nn.Linear
    with torch.no_grad():
        assert rel(merged(idx), before) < 1e-5
    model2 = GPT(merged.config)
    model2.load_state_dict(merged.state_dict())
    quantize_model(model2, ["c_attn"], compute_dtype=torch.float32)
    add_lora(model2, ["c_attn"], r=2)
    nn.init.normal_(model2.transformer.h[0].attn.c_attn.lora_B, std=0.05)
    requantized, report = merge_qlora(model2, requantize=True)
    assert isinstance(requantized.transformer.h[0].attn.c_attn, NF4Linear)
    assert set(report) == {"transformer.h.0.attn.c_attn"} and 0 < report["transformer.h.0.attn.c_attn"] < 0.15


def test_backend_choice_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv("MINILORA_BACKEND", "triton")
    assert resolve_backend("auto", cpu) == "triton" and resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv("MINILORA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MINILORA_BACKEND"):
        resolve_backend("auto", cpu)
    monkeypatch.delenv("MINILORA_BACKEND")
    with pytest.raises(ValueError, match="backend"):
        QLoRALinear.from_linear(nn.Linear(64, 64), backend="fast")
    with pytest.raises(ValueError, match="compute_dtype"):
        QLoRALinear.from_linear(nn.Linear(64, 64), compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="features"):
        QLoRALinear.from_linear(nn.Linear(64, 64), compute_dtype=torch.float32)(torch.randn(2, 63))
    with pytest.raises(TypeError, match="LayerNorm"):
        quantize_model(GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=8)), ["ln_1"])


@pytest.mark.parametrize("rows", [5, FUSED_MAX_M + 6])  # the fused kernels, then dequant kernel + matmul
def test_triton_backend_matches_torch_backend_in_interpreter_mode(rows):
    pytest.importorskip("triton", reason="triton (triton extra) runs the kernels under its interpreter")
    from minilora.kernels._runtime import interpreter_works
    if not interpreter_works():
        pytest.skip("this Triton's interpreter cannot run minilora's kernels")
    q, _ = pair(torch.float32, in_f=96, out_f=40)
    x = torch.randn(rows, 96)
    outs = {}
    for backend in ("torch", "triton"):
        q.base_layer.backend = backend
        xb = x.clone().requires_grad_()
        y = q(xb)
        y.backward(torch.ones_like(y))
        outs[backend] = (y, xb.grad, q.lora_A.grad.clone(), q.lora_B.grad.clone())
        q.zero_grad()
    for a, b in zip(outs["triton"], outs["torch"]):
        assert rel(a, b) < 1e-5


def backend_or_skip(backend):
    if backend == "triton":
        pytest.importorskip("triton", reason="triton (triton extra) runs the kernels under its interpreter")
        from minilora.kernels._runtime import interpreter_works
        if not interpreter_works():
            pytest.skip("this Triton's interpreter cannot run minilora's kernels")
    return backend


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("make", ["nf4", "qlora"])
def test_a_bias_set_to_train_gets_the_gradient_nn_linear_gives_it(make, backend):
    backend = backend_or_skip(backend)
    torch.manual_seed(0)
    linear = nn.Linear(64, 24)
    layer = (NF4Linear.from_linear(linear, compute_dtype=torch.float32, backend=backend) if make == "nf4" else
             QLoRALinear.from_linear(linear, r=2, compute_dtype=torch.float32, backend=backend))
    base = layer if make == "nf4" else layer.base_layer
    assert base.bias.grad is None and not base.bias.requires_grad  # frozen unless asked
    base.bias.requires_grad_(True)
    ref = nn.Linear(64, 24)
    with torch.no_grad():
        ref.weight.copy_(base.dequantized_weight(torch.float32))
        ref.bias.copy_(linear.bias)
    x, g = torch.randn(3, 5, 64), torch.randn(3, 5, 24)
    layer(x).backward(g)
    ref(x).backward(g)
    assert base.bias.grad is not None and rel(base.bias.grad, ref.bias.grad) < 1e-5


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_float_inputs_are_refused_like_nn_linear(dtype):
    q = QLoRALinear.from_linear(nn.Linear(64, 8), compute_dtype=torch.float32, backend="torch")
    x = torch.ones(2, 64, dtype=dtype)
    with pytest.raises(RuntimeError):
        nn.Linear(64, 8)(x)
    for layer in (q, q.base_layer):
        with pytest.raises(TypeError, match="floating-point"):
            layer(x)
    q.merge()
    with pytest.raises(TypeError, match="floating-point"):
        q(x)


def test_add_qlora_is_quantize_model_then_add_lora():
    from minilora import add_qlora
    cfg = GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    ours = add_qlora(GPT(cfg), ["c_attn", "c_fc", "lm_head"], r=4, alpha=8, compute_dtype=torch.float32)
    torch.manual_seed(0)
    ref = GPT(cfg)
    quantize_model(ref, [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")],
                   compute_dtype=torch.float32)
    add_lora(ref, ["c_attn", "c_fc", "lm_head"], r=4, alpha=8)
    assert {n: type(m) for n, m in ours.named_modules()} == {n: type(m) for n, m in ref.named_modules()}
    assert type(ours.lm_head) is LoRALinear and ours.lm_head.base_layer.weight is ours.transformer.wte.weight
    for (n, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n
    plain = GPT(cfg)
    before = {n: type(m) for n, m in plain.named_modules()}
    with pytest.raises(ValueError, match="tied lm_head stays in full precision"):
        add_qlora(plain, ["lm_head"])
    with pytest.raises(ValueError, match="alpha"):
        add_qlora(plain, ["c_attn"], alpha=float("nan"))
    assert {n: type(m) for n, m in plain.named_modules()} == before  # a failed call quantized nothing


def test_load_qlora_adapter_round_trip_and_rollback(tmp_path):
    from minilora import add_qlora, load_qlora_adapter, save_adapter
    cfg = GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    base = GPT(cfg).eval()
    trained = add_qlora(copy.deepcopy(base), ["c_attn", "lm_head"], r=4, alpha=8, compute_dtype=torch.float32)
    for layer in lora_layers(trained).values():
        nn.init.normal_(layer.lora_B, std=0.1)
    save_adapter(trained, tmp_path / "a")
    fresh = GPT(cfg).eval()
    fresh.load_state_dict(base.state_dict())
    load_qlora_adapter(fresh, tmp_path / "a")
    assert isinstance(fresh.transformer.h[1].attn.c_attn, QLoRALinear) and type(fresh.lm_head) is LoRALinear
    idx = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        assert rel(fresh(idx), trained(idx)) < 1e-6
    bad = GPT(cfg)
    add_lora(bad, ["c_fc"], r=4, alpha=8)  # already has LoRA layers, on other modules: the load must fail
    before = {n: type(m) for n, m in bad.named_modules()}
    with pytest.raises(KeyError):
        load_qlora_adapter(bad, tmp_path / "a")
    assert {n: type(m) for n, m in bad.named_modules()} == before  # c_attn was quantized, then put back
