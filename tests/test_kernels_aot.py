"""Every kernel configuration minilora can select compiles for real GPUs, without spilling.

Compiled ahead of time with triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32)):
no GPU is needed. ptxas' resource report (read with the cuobjdump that ships with Triton)
must show no stack frame and no local memory (no register spills), and the shared memory
must fit the architecture's per-block limit.

Covered here (to keep CI short): the bf16 tuned configurations (even K, one scale per row,
bias on, LoRA epilogue on and off) for sm_80 and sm_90, and the fp32 and per-element
configurations for sm_80; of the decode kernels (nf4_gemv.py), every bf16 tile configuration (bias,
LoRA and split-K on) and the smallest and largest fp32 one (LoRA on and off), per-block scales on
both architectures and per-word scales on sm_90. `python benchmarks/kernel_report.py` compiles every
configuration for both.
"""
import os

import pytest
import torch

pytest.importorskip("triton", reason="AOT compilation needs Triton")
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("TRITON_INTERPRET=1: kernels are imported for the interpreter", allow_module_level=True)

from minilora.kernels import aot, configs  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _cases():
    cases = []
    for arch in (80, 90):
        for plan, dtype in configs.all_plans(dtypes=(torch.bfloat16, torch.float32), flags="heavy",
                                             capability=arch):
            c = plan.constexprs
            if plan.kernel.startswith("gemv"):
                if _decode_case(plan, dtype, arch):
                    cases.append(pytest.param(plan, dtype, arch, id=f"{plan.kernel}-{str(dtype)[6:]}-sm{arch}-m"
                                              f"{c['BLOCK_M']}-g{c['GROUP']}" + ("-mma" if c["USE_DOT"] else "")
                                              + ("-lora" if c.get("HAS_LORA") else "")))
                continue
            tuned = dtype == torch.bfloat16 and c.get("PAIRED", True) and c.get("SCALE_PER_ROW", True)
            if arch == 90 and not tuned:
                continue
            tag = f"{plan.kernel}-{str(dtype)[6:]}-sm{arch}-" + "x".join(
                str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK") if k in c) + (
                "" if c.get("PAIRED", True) else "-oddK") + ("-lora" if c.get("HAS_LORA") else "")
            cases.append(pytest.param(plan, dtype, arch, id=tag))
    return cases


def _decode_case(plan, dtype, arch) -> bool:
    c = plan.constexprs
    if c["GROUP"] == 8 and arch == 80:
        return False
    if dtype == torch.float32:               # the smallest and largest fp32 tiles, LoRA on and off
        return c["BLOCK_M"] in (1, 16)
    return c.get("HAS_LORA") is not False


def test_every_selectable_tile_configuration_is_covered():
    """all_plans reaches every tile configuration the planners return for real shapes."""
    for arch in (80, 90):
        _covered(arch)


def _covered(arch):
    listed = {(p.tile_key, dt) for p, dt in configs.all_plans(dtypes=(torch.bfloat16,), flags="heavy",
                                                             capability=arch)}
    gpu = dict(blocksize=64, dtype=torch.bfloat16, double_quant=True, num_sms=132, interpreted=False,
               capability=arch)
    for M in (1, 2, 5, 16, 17, 33, 64, 65, 1000, 4096):
        for N, K in ((4096, 4096), (11008, 4096), (768, 3072), (100, 101)):
            for lora in (False, True):
                p = configs.plan_matmul(M, N, K, has_bias=True, has_lora=lora, **gpu)
                assert (p.tile_key, torch.bfloat16) in listed, p
            d = configs.plan_matmul_dx(M, N, K, **gpu)
            assert (d.tile_key, torch.bfloat16) in listed, d
            if configs.decode_supported(M, K):
                dec = {k: v for k, v in gpu.items() if k != "capability"}
                for p in (configs.plan_gemv(M, N, K, has_bias=True, has_lora=True, **dec),
                          configs.plan_gemv_dx(M, N, K, **dec)):
                    assert (p.tile_key, torch.bfloat16) in listed, p


@pytest.mark.parametrize("plan,dtype,arch", _cases())
def test_compiles_without_spills(plan, dtype, arch):
    usage = aot.resource_usage(aot.compile_plan(plan, dtype, arch))
    assert usage["stack"] == 0 and usage["local"] == 0, f"register spills: {usage}"
    assert usage["dynamic_shared"] + usage["shared"] <= SMEM_LIMIT[arch], usage
    assert 0 < usage["reg"] <= 255
