"""minilora.kernels against a plain-PyTorch reference.

CPU tensors run the Triton kernels under the interpreter (no GPU needed); on a machine with
CUDA the same checks also run the compiled kernels. Bounds, from the kernels' contract:
dequantization is bit-identical to the reference; matmuls have ‖out − ref‖/‖ref‖ <= 1e-5 in
fp32 and <= 1e-2 in bf16/fp16 against a float64 reference computed from the fp32 weight.
"""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="minilora.kernels need Triton (the interpreter runs them on CPU)")

from minilora.kernels import (nf4_dequantize, nf4_dequantize_state, nf4_matmul,  # noqa: E402
                              nf4_matmul_dx, nf4_matmul_dx_state, nf4_matmul_state)
from minilora.kernels import configs  # noqa: E402
from minilora.kernels._runtime import interpreter_works  # noqa: E402

needs_interpreter = pytest.mark.skipif(
    not interpreter_works(), reason="this Triton's interpreter cannot run loops with run-time "
    "bounds (Triton 3.6 with NumPy >= 2.3); CPU checks need triton >= 3.9")
DEVICES = [pytest.param("cpu", marks=needs_interpreter)] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


# ---- a tiny producer and the reference, independent of any quantizer ---------------------

def random_nf4(N, K, blocksize=64, double_quant=True, seed=0, device="cpu"):
    """Random but valid NF4 storage for a weight (N, K): every code, scale and table entry
    is drawn at random, so the kernels are checked on the layout, not on one quantizer."""
    g = torch.Generator().manual_seed(seed)
    numel = N * K
    nb = -(-numel // blocksize)
    code = torch.sort(torch.randn(16, generator=g)).values
    q = dict(packed=torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, generator=g),
             code=code / code.abs().max(), blocksize=blocksize)
    if double_quant:
        q.update(absmax=torch.randint(0, 256, (nb,), dtype=torch.uint8, generator=g),
                 nested_code=torch.sort(torch.rand(256, generator=g) * 2 - 1).values,
                 nested_absmax=torch.rand(-(-nb // 256), generator=g) + 0.5,
                 offset=torch.tensor(0.75 + torch.rand((), generator=g).item()))
    else:
        q.update(absmax=torch.rand(nb, generator=g) + 0.1)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in q.items()}


def reference_dequant(q, N, K):
    """W[j] = code[nibble_j] · absmax_fp32[j // blocksize], in fp32 (first code: high nibble)."""
    numel = N * K
    p = q["packed"].cpu().long()
    nibbles = torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:numel]
    absmax = q["absmax"].cpu()
    if absmax.dtype == torch.uint8:
        i = torch.arange(absmax.numel())
        absmax = q["nested_code"].cpu()[absmax.long()] * q["nested_absmax"].cpu()[i // 256]
        absmax = absmax + q["offset"].cpu()
    w = q["code"].cpu()[nibbles] * absmax[torch.arange(numel) // q["blocksize"]]
    return w.reshape(N, K)


def rel_err(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


# ---- dequantization -----------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,K,blocksize,dq", [
    (37, 70, 64, True), (5, 33, 64, True), (1, 1, 64, True), (130, 130, 64, True),
    (33, 31, 32, True), (20, 100, 128, False), (130, 130, 64, False)])
def test_dequantize_is_bit_identical(device, N, K, blocksize, dq):
    q = random_nf4(N, K, blocksize, dq, seed=N * K, device=device)
    ref = reference_dequant(q, N, K)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = nf4_dequantize(**q, shape=(N, K), dtype=dtype)
        assert out.dtype == dtype and out.shape == (N, K) and out.device.type == device
        assert torch.equal(out.cpu(), ref.to(dtype)), f"{dtype}: not bit-identical"


@needs_interpreter
def test_dequantize_matches_bitsandbytes():
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    W = torch.randn(70, 130, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        packed, st = F.quantize_4bit(W.to(dtype), quant_type="nf4", compress_statistics=True,
                                     blocksize=64)
        out = nf4_dequantize(packed, st.absmax, st.code, shape=W.shape, dtype=dtype, blocksize=64,
                             nested_absmax=st.state2.absmax, nested_code=st.state2.code,
                             offset=st.offset)
        assert torch.equal(out, F.dequantize_4bit(packed, st)), f"{dtype}: differs from bitsandbytes"


@needs_interpreter
def test_kernels_match_minilora_quant():
    """minilora.quant's QuantState goes straight in: same dequantized W, bit for bit, and a
    matmul against it (both storage variants, bf16 and fp32 weights)."""
    quant = pytest.importorskip("minilora.quant")
    if not hasattr(quant, "quantize_nf4"):
        pytest.skip("minilora.quant.quantize_nf4 not available yet")
    g = torch.Generator().manual_seed(2)
    for dq, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        W = torch.randn(40, 192, generator=g).to(dtype)
        state = quant.quantize_nf4(W, blocksize=64, double_quant=dq)
        ref = quant.dequantize_nf4(state)
        assert torch.equal(nf4_dequantize_state(state), ref)
        x = torch.randn(5, 192, generator=g).to(dtype)
        y = nf4_matmul_state(x, state)
        assert rel_err(y, x.double() @ ref.double().T) <= TOL[dtype]


# ---- fused matmuls ------------------------------------------------------------------------

def _shapes():
    """Edge cases plus seeded random shapes; M covers all three forward paths."""
    fixed = [(1, 37, 70), (2, 20, 33), (3, 40, 128), (4, 64, 257), (5, 50, 100), (16, 33, 64),
             (33, 70, 192), (70, 130, 130), (65, 17, 64),
             (1, 40, 640), (20, 40, 640), (9, 1100, 40)]     # long reductions: split-K / split-N
    g = torch.Generator().manual_seed(123)
    rand = [tuple(int(torch.randint(lo, hi, (), generator=g)) for lo, hi in
                  ((1, 80), (1, 100), (1, 200))) for _ in range(4)]
    return fixed + rand


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M,N,K", _shapes())
def test_matmul_forward_and_dx(device, M, N, K):
    dq = (M + N) % 2 == 0                     # both storage variants over the shapes
    blocksize = 32 if K % 3 == 0 else 64
    q = random_nf4(N, K, blocksize, dq, seed=M + N + K, device=device)
    W = reference_dequant(q, N, K).double()
    g = torch.Generator().manual_seed(M * N)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(M, K, generator=g).to(dtype)
        dy = torch.randn(M, N, generator=g).to(dtype)
        y = nf4_matmul(x.to(device), **q, N=N, K=K, kernel="tiles")   # decode: test_kernels_decode.py
        dx = nf4_matmul_dx(dy.to(device), **q, N=N, K=K, kernel="tiles")
        assert y.shape == (M, N) and y.dtype == dtype
        assert dx.shape == (M, K) and dx.dtype == dtype
        assert rel_err(y, x.double() @ W.T) <= TOL[dtype], f"forward {dtype}"
        assert rel_err(dx, dy.double() @ W) <= TOL[dtype], f"dX {dtype}"


def test_shapes_cover_every_path():
    """The shapes above reach the small-M (split and unsplit) and the large-M configurations."""
    seen = set()
    for M, N, K in _shapes():
        kw = dict(blocksize=64, dtype=torch.float32, double_quant=True, num_sms=configs.INTERPRETER_SMS,
                  interpreted=True)
        p = configs.plan_matmul(M, N, K, has_bias=False, has_lora=False, **kw)
        seen.add((p.kernel, p.constexprs["GROUP_M"] > 1, p.split > 1))
        d = configs.plan_matmul_dx(M, N, K, **kw)
        seen.add((d.kernel, d.constexprs["GROUP_M"] > 1, d.split > 1))
    assert {("matmul", False, True), ("matmul", False, False), ("matmul", True, False),
            ("matmul_dx", False, True), ("matmul_dx", False, False), ("matmul_dx", True, False)} <= seen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M", [1, 3, 24, 80])
def test_bias_and_lora_epilogue(device, M):
    N, K, R = 72, 96, 5
    q = random_nf4(N, K, seed=M, device=device)
    W = reference_dequant(q, N, K).double()
    g = torch.Generator().manual_seed(M)
    for dtype in (torch.float32, torch.bfloat16):
        x, bias = torch.randn(2, M, K, generator=g).to(dtype), torch.randn(N, generator=g).to(dtype)
        A, B = torch.randn(R, K, generator=g).to(dtype), torch.randn(N, R, generator=g).to(dtype)
        xa = x @ A.T
        y = nf4_matmul(x.to(device), **q, N=N, K=K, bias=bias.to(device), lora_xa=xa.to(device),
                       lora_B=B.to(device), lora_scaling=0.25, kernel="tiles")
        ref = x.double() @ W.T + bias.double() + 0.25 * (xa.double() @ B.double().T)
        assert y.shape == (2, M, N)
        assert rel_err(y, ref) <= TOL[dtype], dtype


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_and_state_helpers(device):
    N, K, M = 48, 128, 6
    q = random_nf4(N, K, seed=7, device=device)
    state = types.SimpleNamespace(**q, shape=torch.Size((N, K)), dtype=torch.float16)
    W = reference_dequant(q, N, K)
    assert torch.equal(nf4_dequantize_state(state).cpu(), W.half())
    x = torch.randn(M, K).half()
    dy = torch.randn(M, N).half()
    y = nf4_matmul_state(x.to(device), state)
    dx = nf4_matmul_dx_state(dy.to(device), state)
    assert rel_err(y, x.double() @ W.double().T) <= TOL[torch.float16]
    assert rel_err(dx, dy.double() @ W.double()) <= TOL[torch.float16]


@needs_interpreter
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_interpreter():
    """The compiled kernels and the interpreter compute the same function (bf16, all paths)."""
    N, K = 96, 192
    q = random_nf4(N, K, seed=3)
    qc = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in q.items()}
    for M in (1, 8, 100):
        x = torch.randn(M, K).bfloat16()
        y_cpu, y_gpu = nf4_matmul(x, **q, N=N, K=K), nf4_matmul(x.cuda(), **qc, N=N, K=K)
        assert rel_err(y_gpu, y_cpu.double()) <= 1e-2


# ---- errors -------------------------------------------------------------------------------

@needs_interpreter
def test_bad_inputs_are_refused():
    q = random_nf4(8, 64)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="K = 32"):
        nf4_matmul(x, **q, N=16, K=32)
    with pytest.raises(ValueError, match="packed"):
        nf4_matmul(x, **q, N=9, K=64)
    with pytest.raises(TypeError, match="packed must be uint8"):
        nf4_dequantize(q["packed"].int(), q["absmax"], q["code"], shape=(8, 64))
    with pytest.raises(ValueError, match="blocksize"):
        nf4_dequantize(q["packed"], q["absmax"], q["code"], shape=(8, 64), blocksize=48)
    with pytest.raises(ValueError, match="nested_absmax, nested_code and offset are required"):
        nf4_dequantize(q["packed"], q["absmax"], q["code"], shape=(8, 64))
    with pytest.raises(ValueError, match="lora_xa"):
        nf4_matmul(x, **q, N=8, K=64, lora_B=torch.randn(8, 4))
    with pytest.raises(TypeError, match="x must be float32"):
        nf4_matmul(x.double(), **q, N=8, K=64)
    with pytest.raises(TypeError, match="bias is torch.float16"):
        nf4_matmul(x, **q, N=8, K=64, bias=torch.randn(8).half())
    with pytest.raises(TypeError, match="QuantState fields"):
        nf4_matmul_state(x, types.SimpleNamespace(packed=q["packed"]))
    assert nf4_matmul(torch.randn(0, 64), **q, N=8, K=64).shape == (0, 8)


@needs_interpreter
def test_env_interpreter_mode_in_subprocess():
    """With TRITON_INTERPRET=1 set before Triton is imported, the kernels run too."""
    code = (
        "import torch, sys; sys.path.insert(0, %r)\n"
        "from test_kernels_nf4 import random_nf4, reference_dequant, rel_err\n"
        "from minilora.kernels import nf4_matmul\n"
        "q = random_nf4(24, 80, seed=5); W = reference_dequant(q, 24, 80).double()\n"
        "x = torch.randn(3, 80).bfloat16()\n"
        "e = rel_err(nf4_matmul(x, **q, N=24, K=80), x.double() @ W.T)\n"
        "assert e <= 1e-2, e; print('ok', e)\n" % str(Path(__file__).parent))
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
