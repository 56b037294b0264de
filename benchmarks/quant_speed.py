"""Speed of minilora.quant against bitsandbytes' CPU path, measured in the same process on a 4096x4096 weight.

Both sides do the same work (NF4, blocksize 64, double quantization) and produce the same bytes, which
is checked before timing. Runs alternate between the two so that a change in machine load hits both;
each figure is the median of --repeats runs after one warm-up. Ratios > 1 mean minilora is faster.

Each call returns a new tensor, and each run's result is dropped before the next. bitsandbytes' output is
a fresh torch.empty each time (64 MiB: fresh 4 KiB pages, faulted in on first write); minilora's comes
from its huge-page cache (minilora/quant/fast/hugepages.py), which hands the dropped output's memory out
again. That is part of what is measured, on purpose: it is what a caller calling in a loop gets.

    python benchmarks/quant_speed.py [--repeats 9] [--out out/quant_speed.png]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from minilora.quant import dequantize_nf4, quantize_nf4  # noqa: E402

TARGETS = {"quantize fp32": 3.0, "dequantize -> fp32": 1.0, "dequantize -> bf16": 1.0}


def paired_medians(f_ref, f_ours, repeats: int) -> tuple[float, float]:
    """Median seconds of f_ref and f_ours, run alternately after one warm-up each."""
    f_ref(), f_ours()
    ref, ours = [], []
    for _ in range(repeats):
        for f, times in ((f_ref, ref), (f_ours, ours)):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
    return statistics.median(ref), statistics.median(ours)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default="out/quant_speed.png")
    args = p.parse_args()
    import bitsandbytes.functional as F  # the reference; needed for this benchmark

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load:.1f} at start")
    torch.manual_seed(0)
    rows = []
    plan = ((torch.float32, ("quantize fp32", "dequantize -> fp32")), (torch.bfloat16, ("dequantize -> bf16",)))
    for dtype, ops in plan:
        x = torch.randn(4096, 4096).to(dtype)
        packed, ref_state = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
        state = quantize_nf4(x, blocksize=64, double_quant=True)
        assert torch.equal(state.packed, packed.view(-1)) and torch.equal(state.absmax, ref_state.absmax)
        assert torch.equal(dequantize_nf4(state), F.dequantize_4bit(packed, ref_state))
        for op in ops:
            if op.startswith("quantize"):
                pair = (lambda: F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4"),
                        lambda: quantize_nf4(x, blocksize=64, double_quant=True))
            else:
                pair = (lambda: F.dequantize_4bit(packed, ref_state), lambda: dequantize_nf4(state))
            t_ref, t_ours = paired_medians(*pair, args.repeats)
            rows.append((op, t_ref, t_ours, t_ref / t_ours, TARGETS[op]))
    print(f"\n{'4096x4096, NF4 + double quant':<32} {'bitsandbytes':>13} {'minilora':>10} {'speed-up':>9} "
          f"{'target':>7}  met")
    for op, t_ref, t_ours, ratio, target in rows:
        print(f"{op:<32} {t_ref * 1e3:>10.1f} ms {t_ours * 1e3:>7.1f} ms {ratio:>8.2f}x {target:>6.1f}x  "
              f"{'yes' if ratio >= target else 'NO'}")
    print(f"load average {os.getloadavg()[0]:.1f} at end" if hasattr(os, "getloadavg") else "")
    if args.out:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.bar([r[0] for r in rows], [r[3] for r in rows], color="tab:green")
        ax.scatter([r[0] for r in rows], [r[4] for r in rows], color="k", marker="_", s=800, label="target")
        ax.set_ylabel("speed-up vs bitsandbytes (CPU)")
        ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        fig.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
