"""Ahead-of-time compilation of the kernels for a GPU that is not there, and what it costs.

`compile_plan(plan, dtype, capability)` builds the Triton source for one KernelPlan with
triton.compile(ASTSource(...), target=GPUTarget("cuda", capability, 32)) — no GPU needed —
and `resource_usage(compiled)` reads registers, stack (spills land there) and shared memory
from ptxas' output via the cuobjdump that ships with Triton.
"""
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from .configs import KernelPlan

_KERNELS = {   # plan.kernel -> (module, function)
    "dequant": ("nf4_dequant", "nf4_dequant_kernel"),
    "matmul": ("nf4_matmul", "nf4_matmul_kernel"),
    "matmul_dx": ("nf4_matmul_dx", "nf4_matmul_dx_kernel"),
    "gemv": ("nf4_gemv", "nf4_gemv_kernel"),
    "gemv_dx": ("nf4_gemv", "nf4_gemv_dx_kernel"),
}
_TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_INTS = {"M", "N", "K", "R", "row_bytes", "log2_blocksize", "k_per_split", "n_per_split", "numel",
         "num_splits"}


def jit_function(plan: KernelPlan):
    """The compiled-mode (@triton.jit) function a plan launches."""
    import importlib
    module, name = _KERNELS[plan.kernel]
    fn = getattr(importlib.import_module(f"{__package__}.{module}"), name)
    if type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("TRITON_INTERPRET=1 is set: kernels were imported for the interpreter "
                           "and cannot be compiled ahead of time in this process")
    return fn


def signature(plan: KernelPlan, dtype: torch.dtype) -> tuple:
    """(signature, constexprs, attrs) for ASTSource: argument types as Triton spells them."""
    fn = jit_function(plan)
    act = _TRITON_TYPE[dtype]
    decode = plan.kernel.startswith("gemv")           # decode plans write Y and keep partials aside
    out = act if plan.split == 1 or decode else "fp32"   # split tile plans write fp32 partial sums
    dq = plan.constexprs.get("DOUBLE_QUANT", True)
    pointer = {"x_ptr": act, "dy_ptr": act, "bias_ptr": act, "xa_ptr": act, "lora_b_ptr": act,
               "packed_ptr": "u8", "absmax_ptr": "u8" if dq else "fp32", "code_ptr": "fp32",
               "nested_code_ptr": "fp32", "nested_absmax_ptr": "fp32", "offset_ptr": "fp32",
               "y_ptr": out, "dx_ptr": out, "out_ptr": act,
               "words_ptr": "i32", "partial_ptr": "fp32", "counter_ptr": "i32"}
    # The common case: 16-byte aligned tensors and K a multiple of the blocksize; the JIT
    # specialises on the same divisibility when it holds.
    aligned = (plan.constexprs.get("SCALE_PER_ROW", True) and plan.constexprs.get("PAIRED", True)
               and plan.constexprs.get("GROUP", 64) > 8)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in plan.constexprs:
            sig[name] = "constexpr"
        elif name in pointer:
            sig[name] = "*" + pointer[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _INTS:
            sig[name] = "i32"
            if aligned and name in ("N", "K", "row_bytes", "k_per_split", "n_per_split"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "lora_scaling":
            sig[name] = "fp32"
        else:
            raise KeyError(f"no type known for argument {name} of {fn.__name__}")
    return sig, dict(plan.constexprs), attrs


def compile_plan(plan: KernelPlan, dtype: torch.dtype, capability: int):
    """Compile one plan for sm_<capability> (80: A100, 90: H100) without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = jit_function(plan)
    sig, constexprs, attrs = signature(plan, dtype)
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=plan.num_warps, num_stages=plan.num_stages)
    if plan.kernel == "dequant":
        options["enable_fp_fusion"] = False              # as launched (bit-exact rounding)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)


def _cuobjdump() -> str:
    import triton
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else "cuobjdump"


def resource_usage(compiled) -> dict:
    """Registers per thread, stack bytes per thread (spilled registers live there), local and
    shared memory: ptxas' numbers as cuobjdump --dump-resource-usage prints them, plus the
    dynamic shared memory Triton allocates (metadata.shared)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], check=True,
                              capture_output=True, text=True).stdout
    finally:
        os.remove(path)
    usage = {key.lower(): int(val) for key, val in
             re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    missing = {"reg", "stack", "shared", "local"} - usage.keys()
    if missing:
        raise RuntimeError(f"could not read {sorted(missing)} from cuobjdump output:\n{text}")
    usage["dynamic_shared"] = int(compiled.metadata.shared)
    usage["num_warps"] = int(compiled.metadata.num_warps)
    usage["num_stages"] = int(compiled.metadata.num_stages)
    return usage
