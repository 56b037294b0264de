"""Paged AdamW: optimizer step time against torch.optim.AdamW, and the bytes paged per step.

A GPT's parameters get random gradients; each optimizer is stepped --reps times after one warm-up step and
the fastest step counts. Configurations: no budget (nothing paged), 25 % of the state with and without
prefetch, and budget 0 (every page visits the device only for its own update), for each --pages size.
Times are printed only as ratios to torch.optim.AdamW (single-tensor, the implementation PagedAdamW
mirrors) measured in the same run. On the CPU the "device" is the CPU itself, so paging can only cost time
there; the interesting run is --device cuda, where pages cross PCIe from pinned memory.

    python benchmarks/paged.py [--device cuda] [--width 1024 --layers 8] [--out out/paged.png]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from minilora import GPT, GPTConfig, PagedAdamW
from minilora.plots import plot_paged_step, save_figure


def fastest_step(opt, device, reps: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    opt.step()  # warm-up (and state creation)
    sync()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        opt.step()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--pages", type=int, nargs="+", default=[2**18, 2**20], help="page sizes in bytes")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="out/paged.png")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=args.vocab, n_layer=args.layers, n_head=8,
                          n_embd=args.width)).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    n = sum(p.numel() for p in model.parameters())
    print(f"GPT width {args.width}, {args.layers} blocks: {n:,} parameters, AdamW state {8 * n / 2**20:.1f} MiB, "
          f"on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}")
    base = fastest_step(torch.optim.AdamW(model.parameters(), foreach=False), device, args.reps)
    fe = fastest_step(torch.optim.AdamW(model.parameters(), foreach=True), device, args.reps)
    print(f"torch.optim.AdamW foreach / single-tensor: {fe / base:.2f}x")
    labels, ratios, moved = [], [], []
    print(f"{'page':>8} {'budget':>12} {'prefetch':>8} {'time vs AdamW':>13} {'MiB paged/step':>14} {'peak resident MiB':>17}")
    for ps in args.pages:
        full = PagedAdamW(model.parameters(), page_size=ps).state_nbytes()
        for name, budget, prefetch in (("none", None, True), ("25%", full // 4 // ps * ps, True),
                                       ("25%", full // 4 // ps * ps, False), ("0", 0, True)):
            if budget is not None and 0 < budget < ps:
                continue  # the state is smaller than four pages: no 25% budget of whole pages
            opt = PagedAdamW(model.parameters(), page_size=ps, device_budget=budget, prefetch=prefetch)
            t = fastest_step(opt, device, args.reps)
            steps = args.reps + 1
            per_step = opt.stats.bytes_moved / steps
            label = f"{ps >> 10} KiB pages, budget {name}{'' if prefetch else ', no prefetch'}"
            labels.append(label)
            ratios.append(t / base)
            moved.append(per_step)
            print(f"{ps >> 10:>5}KiB {name:>12} {str(prefetch):>8} {t / base:>12.2f}x {per_step / 2**20:>14.1f} "
                  f"{opt.stats.peak_resident_bytes / 2**20:>17.1f}")
    fig = plot_paged_step(labels, ratios, moved)
    save_figure(fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
