"""Gradient checkpointing: peak saved-activation bytes and training-step time for n = 4, 16, 36 blocks.

Three modes on the same tiny-width GPT and batch:
  none      plain forward + backward
  minilora  minilora's checkpointing, ⌈√n⌉ segments
  torch     torch.utils.checkpoint (reentrant) on the same segments, the reference to compare with
Bytes are measured with minilora's saved-tensor meter (peak of saved-for-backward bytes alive at once);
times are the fastest of --reps forward+backward passes and are printed only as ratios to `none`.

    python benchmarks/checkpointing.py [--out out/checkpointing.png] [--reps 3] [--device cuda]
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint

from minilora import GPT, GPTConfig, measure_saved_activations, segment_bounds
from minilora.plots import plot_checkpointing, save_figure

MODES = ("none", "minilora", "torch")


def build(n: int, mode: str, args) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=args.seq, vocab_size=256, n_layer=n, n_head=2, n_embd=args.width,
                    dropout=0.1, gradient_checkpointing=mode == "minilora")
    model = GPT(cfg).to(args.device).train()
    if mode == "torch":
        def run_blocks(x):
            for s, e in segment_bounds(n):
                seg = nn.Sequential(*model.transformer.h[s:e])
                x = torch_checkpoint.checkpoint(seg, x, use_reentrant=True, preserve_rng_state=True)
            return x
        model.run_blocks = run_blocks
    return model


def step(model: GPT, idx: torch.Tensor) -> None:
    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    model(idx, idx)[1].backward()
    if idx.is_cuda:
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[4, 16, 36])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="out/checkpointing.png")
    args = ap.parse_args()
    idx = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(args.device)

    peaks = {m: [] for m in MODES}
    ratios = {m: [] for m in MODES[1:]}
    where = torch.cuda.get_device_name(args.device) if idx.is_cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"GPT width {args.width}, batch {args.batch} x {args.seq} tokens, fp32, {where}")
    print(f"{'n':>3} {'segments':>8} {'peak none':>11} {'peak mine':>11} {'peak torch':>11} "
          f"{'mine/none':>9} {'2√n/n':>6} {'mine/torch':>10} {'time mine':>9} {'time torch':>10} {'max rel dgrad':>13}")
    for n in args.blocks:
        models = {m: build(n, m, args) for m in MODES}
        for m, model in models.items():
            peaks[m].append(measure_saved_activations(lambda model=model: step(model, idx), exclude=model).peak)
        g0 = {k: p.grad for k, p in models["none"].named_parameters()}
        drift = max(((p.grad - g0[k]).norm() / g0[k].norm()).item()
                    for m in MODES[1:] for k, p in models[m].named_parameters())
        best = {m: math.inf for m in MODES}
        for model in models.values():
            step(model, idx)  # warm-up
        for _ in range(args.reps):  # interleaved, so load changes hit every mode alike
            for m, model in models.items():
                t0 = time.perf_counter()
                step(model, idx)
                best[m] = min(best[m], time.perf_counter() - t0)
        for m in MODES[1:]:
            ratios[m].append(best[m] / best["none"])
        p = {m: peaks[m][-1] for m in MODES}
        print(f"{n:>3} {len(segment_bounds(n)):>8} {p['none']:>11,} {p['minilora']:>11,} {p['torch']:>11,} "
              f"{p['minilora'] / p['none']:>9.3f} {2 * math.sqrt(n) / n:>6.3f} {p['minilora'] / p['torch']:>10.3f} "
              f"{ratios['minilora'][-1]:>8.2f}x {ratios['torch'][-1]:>9.2f}x {drift:>13.1e}")
    fig = plot_checkpointing(args.blocks, peaks, {f"{m} / none": r for m, r in ratios.items()})
    save_figure(fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
