"""What the NF4 kernels can reach and what they cost: the roofline model, then registers and spills.

First the bytes-moved model (kernels/roofline.py): for each weight shape, M and pass, the
configuration nf4_matmul picks and the best speed-up over a bf16 torch.matmul the roofline allows
(decode kernels for M <= 16, tile kernels above, and dequantize-then-matmul for comparison).

Then it compiles each configuration ahead of time for sm_80 (A100) and sm_90 (H100) — no GPU needed —
and prints what ptxas reports (via cuobjdump --dump-resource-usage): registers per thread,
stack bytes per thread (where spilled registers go; 0 means no spills), local memory, and
the dynamic shared memory Triton allocates.

    python benchmarks/kernel_report.py                 # production flags + worst case
    python benchmarks/kernel_report.py --flags all     # every flag combination (slow)
    python benchmarks/kernel_report.py --dtype bf16 --arch 90
    python benchmarks/kernel_report.py --model-only --device A100
"""
import argparse
import os
import sys
import time

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("unset TRITON_INTERPRET: this report compiles the kernels for real GPUs")

import torch  # noqa: E402

from minilora.kernels import aot, configs, roofline  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}     # opt-in shared memory per block


def describe(plan) -> str:
    c = plan.constexprs
    tile = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in c) or str(c.get("BLOCK"))
    flags = [name.lower() for name in ("DOUBLE_QUANT", "SCALE_PER_ROW", "PAIRED", "HAS_BIAS",
                                       "HAS_LORA", "USE_DOT", "SPLIT") if c.get(name)]
    if "GROUP" in c:
        flags.append(f"group{c['GROUP']}")
    if c.get("DOT_PRECISION") and c["DOT_PRECISION"] != "ieee":
        flags.append(c["DOT_PRECISION"])
    if plan.split > 1 and not plan.kernel.startswith("gemv"):
        flags.append("fp32-partials")        # split plans write fp32 partial sums
    return f"{plan.kernel:<9} {tile:<11} w{plan.num_warps} s{plan.num_stages} {','.join(flags)}"


SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)]   # (N out, K in)
TOKENS = [1, 4, 16, 64, 512, 4096]


def model_table(device: "roofline.Device") -> None:
    """The roofline model's predicted best ratio over bf16 torch.matmul, per shape, M and pass."""
    print(f"Roofline model on {device.name} ({device.bandwidth / 1e12:.2f} TB/s, "
          f"{device.tensor_flops / 1e12:.0f} TFLOP/s bf16, {device.fma_flops / 1e12:.1f} TFLOP/s fp32 FMA):")
    print("predicted best speed-up over bf16 torch.matmul (upper bounds: dequantization instructions"
          " not counted)")
    print(f"{'pass':<5}{'N x K':>12} {'M':>5} | {'configuration nf4_matmul runs':<28}{'MB':>8}{'ratio':>7}"
          f" | {'dequant+mm':>10}")
    for pass_ in ("fwd", "dX"):
        for N, K in SHAPES:
            for M in TOKENS:
                approach = "decode" if configs.decode_supported(M, K) else "tiles"
                moved = roofline.bytes_moved(approach, pass_, M, N, K, device)
                print(f"{pass_:<5}{N:>6}x{K:<5} {M:>5} | "
                      f"{roofline.describe(approach, pass_, M, N, K, device):<28}{moved / 1e6:8.1f}"
                      f"{roofline.predicted_ratio(approach, pass_, M, N, K, device):7.2f}"
                      f" | {roofline.predicted_ratio('dequant+mm', pass_, M, N, K, device):10.2f}")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flags", choices=["heavy", "all"], default="heavy")
    ap.add_argument("--dtype", choices=list(DTYPES), action="append")
    ap.add_argument("--arch", type=int, choices=[80, 90], action="append")
    ap.add_argument("--device", choices=list(roofline.DEVICES), action="append",
                    help="roofline model for this GPU (default: H100)")
    ap.add_argument("--model-only", action="store_true", help="print the model, compile nothing")
    ap.add_argument("--kernels", choices=["all", "decode", "tiles"], default="all",
                    help="compile only the decode kernels (nf4_gemv.py) or only the others")
    args = ap.parse_args()
    for name in args.device or ["H100"]:
        model_table(roofline.DEVICES[name])
    if args.model_only:
        return 0
    dtypes = [DTYPES[d] for d in (args.dtype or list(DTYPES))]
    archs = args.arch or [80, 90]
    plans = [(plan, dtype, arch) for arch in archs
             for plan, dtype in configs.all_plans(dtypes=dtypes, flags=args.flags, capability=arch)
             if args.kernels == "all" or plan.kernel.startswith("gemv") == (args.kernels == "decode")]
    print(f"{len(plans)} configurations over sm_{', sm_'.join(map(str, archs))}; "
          f"triton {__import__('triton').__version__}")
    print(f"{'arch':<6}{'dtype':<6}{'configuration':<62}{'regs':>5}{'stack':>6}{'local':>6}{'smem':>8}")
    bad = 0
    start = time.time()
    for plan, dtype, arch in plans:
        usage = aot.resource_usage(aot.compile_plan(plan, dtype, arch))
        smem = usage["dynamic_shared"] + usage["shared"]
        spills = usage["stack"] or usage["local"]
        flag = ""
        if spills:
            flag = "  <- spills"
        if smem > SMEM_LIMIT[arch]:
            flag += "  <- too much shared memory"
        bad += bool(flag)
        print(f"sm_{arch:<3}{str(dtype)[6:]:<9}{describe(plan):<59}{usage['reg']:>5}"
              f"{usage['stack']:>6}{usage['local']:>6}{smem:>8}{flag}", flush=True)
    print(f"{bad} configurations spill or exceed shared memory ({time.time() - start:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
