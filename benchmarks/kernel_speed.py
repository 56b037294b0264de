"""Fused NF4 dequant-matmul vs dequantize-then-matmul vs a plain bf16 matmul.

On a CUDA GPU: times, for weights of 4096 x 4096 and 11008 x 4096 / 4096 x 11008
(out_features x in_features) and M in {1, 16, 512, 4096} tokens,
    fused    minilora.kernels.nf4_matmul (W read as 4-bit codes, dequantized in registers)
    unfused  minilora.kernels.nf4_dequantize to a bf16 W, then torch.matmul
    bf16     torch.matmul with a bf16 W (no quantization)
and the backward input gradient dX = dY · W the same three ways. Speed is reported as ratios
against the bf16 matmul measured in the same run (> 1: faster than bf16). Each approach is
captured once in a CUDA graph and its replays are timed by triton.testing.do_bench (median),
which clears the L2 cache before every replay: W comes from memory, and Python's launch
overhead is left out, so the ratios compare GPU work.

Without a GPU it measures nothing and prints the bytes each approach must move per weight.

    python benchmarks/kernel_speed.py [--out runs/kernel_speed.png]
"""
import argparse
import os
import sys

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]   # (N out_features, K in_features)
TOKENS = [1, 16, 512, 4096]
BLOCKSIZE, NESTED = 64, 256
# Bytes per weight: 4-bit code + one uint8 absmax per 64 + one fp32 per 64·256 (double quant).
NF4_BYTES = 0.5 + 1 / BLOCKSIZE + 4 / (BLOCKSIZE * NESTED)
BF16_BYTES = 2.0


def bytes_table() -> None:
    print("No CUDA GPU here: no times measured. What each approach must move through memory:")
    print(f"  per weight: fused {NF4_BYTES:.4f} B  |  dequantize-then-matmul "
          f"{NF4_BYTES:.4f} + {BF16_BYTES:.0f} (write W) + {BF16_BYTES:.0f} (read W) = "
          f"{NF4_BYTES + 2 * BF16_BYTES:.4f} B  |  bf16 weight {BF16_BYTES:.0f} B")
    print(f"  a memory-bound GEMV can at best be {BF16_BYTES / NF4_BYTES:.2f}x faster than bf16 "
          f"(fused) or {BF16_BYTES / (NF4_BYTES + 2 * BF16_BYTES):.2f}x (unfused)")
    print(f"\n{'N x K':>12} {'M':>5} | {'MB fused':>9} {'MB unfused':>11} {'MB bf16':>8}"
          f" | {'bf16/fused':>10} {'bf16/unfused':>12}   (bytes incl. X and Y in bf16)")
    for N, K in SHAPES:
        for M in TOKENS:
            act = 2 * (M * K + M * N)
            fused = N * K * NF4_BYTES + act
            unfused = N * K * (NF4_BYTES + 2 * BF16_BYTES) + act
            bf16 = N * K * BF16_BYTES + act
            print(f"{N:>6}x{K:<5} {M:>5} | {fused / 1e6:9.1f} {unfused / 1e6:11.1f} {bf16 / 1e6:8.1f}"
                  f" | {bf16 / fused:10.2f} {bf16 / unfused:12.2f}")
    print("Byte ratios bound memory-bound runs only: with 4-bit weights a matmul becomes compute-bound"
          "\nfrom about M = 76 tokens on an H100 (39 on an A100), where all three do the same FLOPs.")


def random_nf4(N, K, device):
    """Random valid NF4 storage (timing does not depend on the values)."""
    nb = N * K // BLOCKSIZE
    code = torch.sort(torch.randn(16)).values
    return dict(packed=torch.randint(0, 256, (N * K // 2,), dtype=torch.uint8, device=device),
                absmax=torch.randint(0, 256, (nb,), dtype=torch.uint8, device=device),
                code=(code / code.abs().max()).to(device),
                nested_code=torch.sort(torch.rand(256) * 2 - 1).values.to(device),
                nested_absmax=(torch.rand(-(-nb // NESTED)) + 0.5).to(device),
                offset=torch.tensor(0.8, device=device), blocksize=BLOCKSIZE)


def gpu_ms(fn) -> float:
    """Median time of one replay of `fn` captured in a CUDA graph (L2 cleared before each)."""
    from triton.testing import do_bench
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                  # compile and warm up outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def measure(out_png: str) -> None:
    import triton

    from minilora.kernels import nf4_dequantize, nf4_matmul, nf4_matmul_dx

    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}")
    print("ratios = time(bf16 torch.matmul) / time(approach); > 1 is faster than bf16\n")
    print(f"{'pass':<5}{'N x K':>12} {'M':>5} | {'fused':>7} {'unfused':>8} | {'fused/unfused':>13}"
          f" | {'fused GB/s':>10} {'rel.err':>8}")
    rows = []
    torch.manual_seed(0)
    for N, K in SHAPES:
        q = random_nf4(N, K, dev)
        W = nf4_dequantize(**q, shape=(N, K), dtype=torch.bfloat16)
        for M in TOKENS:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
            cases = {
                "fwd": (lambda: nf4_matmul(x, **q, N=N, K=K),
                        lambda: torch.matmul(x, nf4_dequantize(**q, shape=(N, K), dtype=torch.bfloat16).T),
                        lambda: torch.matmul(x, W.T)),
                "dX": (lambda: nf4_matmul_dx(dy, **q, N=N, K=K),
                       lambda: torch.matmul(dy, nf4_dequantize(**q, shape=(N, K), dtype=torch.bfloat16)),
                       lambda: torch.matmul(dy, W)),
            }
            for name, (fused, unfused, bf16) in cases.items():
                ref = bf16().double()
                err = ((fused().double() - ref).norm() / ref.norm()).item()
                t = [gpu_ms(f) for f in (fused, unfused, bf16)]
                moved = N * K * NF4_BYTES + 2 * (M * K + M * N)
                row = (name, N, K, M, t[2] / t[0], t[2] / t[1], t[1] / t[0], moved / (t[0] * 1e-3) / 1e9, err)
                rows.append(row)
                print(f"{name:<5}{N:>6}x{K:<5} {M:>5} | {row[4]:7.2f} {row[5]:8.2f} | {row[6]:13.2f}"
                      f" | {row[7]:10.0f} {err:8.1e}", flush=True)
        del W, q
    try:
        plot(rows, out_png)
        print(f"\nwrote {out_png}")
    except ImportError:
        print("\nmatplotlib not installed: no figure")


def plot(rows, out_png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, name in zip(axes, ("fwd", "dX")):
        sel = [r for r in rows if r[0] == name]
        labels = [f"{r[1]}x{r[2]}\nM={r[3]}" for r in sel]
        xs = range(len(sel))
        ax.bar([i - 0.2 for i in xs], [r[4] for r in sel], 0.4, label="fused NF4")
        ax.bar([i + 0.2 for i in xs], [r[5] for r in sel], 0.4, label="dequantize + matmul")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs), labels, fontsize=6)
        ax.set_title(f"{name}: speed relative to bf16 torch.matmul")
        ax.legend()
    os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
    tmp = out_png + ".tmp.png"
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, out_png)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/kernel_speed.png")
    args = ap.parse_args()
    try:
        import triton  # noqa: F401
        have_triton = True
    except ImportError:
        have_triton = False
    if not (torch.cuda.is_available() and have_triton):
        bytes_table()
        return 0
    measure(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
