"""The decode kernels (kernels/nf4_gemv.py, M <= 16) against float64 and against the tile kernels.

CPU tensors run them under the Triton interpreter; with CUDA the same checks run compiled.
Bounds as in test_kernels_nf4.py: ‖out − ref‖/‖ref‖ <= 1e-5 in fp32, 1e-2 in bf16/fp16. The cases
are chosen so that every tile configuration the decode planners can return (configs.decode_plans)
runs, and every value of every flag (scale grouping, split-K, double quantization, bias, LoRA),
on ragged shapes: N odd, K not a multiple of the 256-column tile, M = 1..16.
"""
import pytest
import torch

pytest.importorskip("triton", reason="minilora.kernels need Triton (the interpreter runs them on CPU)")

from test_kernels_nf4 import DEVICES, TOL, random_nf4, reference_dequant, rel_err  # noqa: E402

from minilora.kernels import configs, nf4_matmul, nf4_matmul_dx  # noqa: E402
from minilora.kernels import ops  # noqa: E402
from minilora.kernels._runtime import interpreter_works  # noqa: E402

# (M, N, K, blocksize, double_quant, bias, lora, dtype): one row per case, M = 1..16 over both.
CASES = [
    (1, 37, 1048, 64, True, True, False, torch.float32),     # split-K forward, per-block scales
    (2, 263, 72, 32, False, False, True, torch.float32),     # split-K dX
    (3, 33, 1040, 64, True, False, False, torch.float32),    # K % 256 != 0
    (4, 9, 1024, 1024, True, True, True, torch.float32),     # one scale per 256-code tile
    (5, 17, 200, 64, True, False, False, torch.float32),     # K % 64 != 0: per-word scales
    (6, 40, 136, 64, False, True, False, torch.float32),
    (7, 11, 72, 32, True, False, True, torch.float32),
    (8, 23, 264, 128, True, True, False, torch.float32),
    (9, 15, 96, 64, True, False, False, torch.float32),
    (12, 25, 520, 64, False, False, True, torch.float32),
    (16, 19, 256, 64, True, True, True, torch.float32),
    (1, 261, 136, 64, False, False, True, torch.bfloat16),   # split-K dX
    (2, 45, 520, 32, True, True, False, torch.bfloat16),
    (3, 33, 200, 64, True, False, False, torch.bfloat16),    # per-word scales
    (4, 29, 1024, 512, False, True, True, torch.bfloat16),
    (5, 131, 1040, 64, True, False, True, torch.bfloat16),   # tensor cores, split-K
    (10, 27, 136, 64, True, True, False, torch.bfloat16),
    (11, 13, 72, 128, False, False, False, torch.bfloat16),
    (13, 21, 264, 64, True, False, True, torch.bfloat16),
    (14, 35, 200, 32, True, True, False, torch.bfloat16),
    (15, 7, 96, 64, False, True, True, torch.bfloat16),
    (16, 39, 256, 64, True, False, False, torch.bfloat16),
    (4, 19, 136, 64, True, True, False, torch.float16),
    (16, 21, 264, 64, True, False, True, torch.float16),
]
R = 5


def _plans(case):
    M, N, K, bs, dq, bias, lora, dtype = case
    kw = dict(blocksize=bs, dtype=dtype, double_quant=dq, num_sms=configs.INTERPRETER_SMS, interpreted=False)
    return (configs.plan_gemv(M, N, K, has_bias=bias, has_lora=lora, **kw),
            configs.plan_gemv_dx(M, N, K, **kw))


def _tiles(plan):
    return plan.kernel, plan.constexprs["BLOCK_M"], plan.constexprs["USE_DOT"], plan.num_warps


def test_cases_cover_every_decode_configuration():
    """Each tile configuration decode_plans lists (per dtype class) and each flag value runs above."""
    ran = {(_tiles(p), c[-1] == torch.float32) for c in CASES for p in _plans(c)}
    listed = {(_tiles(p), dt == torch.float32) for p, dt in configs.decode_plans((torch.bfloat16, torch.float32))}
    assert listed <= ran, listed - ran
    seen = {}
    for c in CASES:
        for p in _plans(c):
            group = p.constexprs["GROUP"]
            seen.setdefault((p.kernel, "GROUP"), set()).add("word" if group == 8 else "block" if group == c[3] else "tile")
            for name in ("SPLIT", "DOUBLE_QUANT", "HAS_BIAS", "HAS_LORA"):
                if name in p.constexprs:
                    seen.setdefault((p.kernel, name), set()).add(p.constexprs[name])
    for key, values in seen.items():
        assert values == ({"word", "block", "tile"} if key[1] == "GROUP" else {False, True}), (key, values)
    assert {M for M, *_ in CASES} == set(range(1, 17))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-{c[1]}x{c[2]}-bs{c[3]}-{str(c[7])[6:]}")
def test_decode_forward_and_dx(device, case):
    M, N, K, bs, dq, bias, lora, dtype = case
    q = random_nf4(N, K, bs, dq, seed=M * 1000 + N, device=device)
    W = reference_dequant(q, N, K).double()
    g = torch.Generator().manual_seed(M + K)
    x, dy = torch.randn(M, K, generator=g).to(dtype), torch.randn(M, N, generator=g).to(dtype)
    epi, ref = {}, x.double() @ W.T
    if bias:
        b = torch.randn(N, generator=g).to(dtype)
        epi["bias"], ref = b.to(device), ref + b.double()
    if lora:
        xa, B = torch.randn(M, R, generator=g).to(dtype), torch.randn(N, R, generator=g).to(dtype)
        epi.update(lora_xa=xa.to(device), lora_B=B.to(device), lora_scaling=0.5)
        ref = ref + 0.5 * xa.double() @ B.double().T
    y = nf4_matmul(x.to(device), **q, N=N, K=K, kernel="decode", **epi)
    dx = nf4_matmul_dx(dy.to(device), **q, N=N, K=K, kernel="decode")
    assert y.shape == (M, N) and y.dtype == dtype and dx.shape == (M, K) and dx.dtype == dtype
    assert rel_err(y, ref) <= TOL[dtype], "forward"
    assert rel_err(dx, dy.double() @ W) <= TOL[dtype], "dX"
    # The tile kernels (the readable reference) compute the same function.
    y_ref = nf4_matmul(x.to(device), **q, N=N, K=K, kernel="tiles", **epi)
    assert rel_err(y, y_ref.double()) <= 2 * TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_split_k_is_deterministic_and_leaves_counters_zero(device):
    q = random_nf4(37, 1048, seed=4, device=device)
    x = torch.randn(1, 1048).to(device)
    assert _plans((1, 37, 1048, 64, True, False, False, torch.float32))[0].split > 1
    y1 = nf4_matmul(x, **q, N=37, K=1048)
    y2 = nf4_matmul(x, **q, N=37, K=1048)
    assert torch.equal(y1, y2)
    assert all(int(c.abs().sum()) == 0 for c in ops._COUNTERS.values())


@pytest.mark.parametrize("device", DEVICES)
def test_auto_picks_decode_for_small_m_and_k_multiple_of_8(device):
    """auto = decode for M <= 16 and K % 8 == 0: bit-equal to kernel='decode'; K % 8 != 0 and
    M > 16 go to the tile kernels."""
    q = random_nf4(24, 96, seed=6, device=device)
    x = torch.randn(3, 96).bfloat16().to(device)
    assert torch.equal(nf4_matmul(x, **q, N=24, K=96), nf4_matmul(x, **q, N=24, K=96, kernel="decode"))
    assert configs.decode_supported(16, 96) and not configs.decode_supported(17, 96)
    assert not configs.decode_supported(1, 100)
    q2 = random_nf4(24, 100, seed=6, device=device)
    with pytest.raises(ValueError, match="K % 8 == 0"):
        nf4_matmul(torch.randn(2, 100).to(device), **q2, N=24, K=100, kernel="decode")
    with pytest.raises(ValueError, match="kernel must be one of"):
        nf4_matmul_dx(torch.randn(2, 24).to(device), **q, N=24, K=96, kernel="gemv")


def test_decode_reads_bitsandbytes_layout():
    """A weight packed by bitsandbytes goes straight into the decode kernels (no repacking)."""
    if not interpreter_works():
        pytest.skip("this Triton's interpreter cannot run the kernels on CPU")
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    g = torch.Generator().manual_seed(9)
    W = torch.randn(45, 264, generator=g)
    packed, st = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True, blocksize=64)
    Wq = F.dequantize_4bit(packed, st).double()
    x, dy = torch.randn(3, 264, generator=g), torch.randn(3, 45, generator=g)
    kw = dict(N=45, K=264, blocksize=64, nested_absmax=st.state2.absmax, nested_code=st.state2.code,
              offset=st.offset, kernel="decode")
    assert rel_err(nf4_matmul(x, packed, st.absmax, st.code, **kw), x.double() @ Wq.T) <= 1e-5
    assert rel_err(nf4_matmul_dx(dy, packed, st.absmax, st.code, **kw), dy.double() @ Wq) <= 1e-5
