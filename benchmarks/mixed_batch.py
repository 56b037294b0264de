"""A mixed batch against one adapter: the cost of serving two adapters from one base in one forward.

The same GPT carries two LoRA adapters (r = 8 on every linear layer of the blocks). On the same batch it times
  one      every example through adapter "a"              model(idx)
  mixed    half the examples through "a", half through "b"   model(idx, adapter_names=[...])
  two      the two halves as two separate forwards (what a mixed batch saves)
as the median of --reps interleaved runs, and prints each as a ratio to `one`, measured in this run.

    python benchmarks/mixed_batch.py [--batch 16] [--seq 128] [--width 256] [--layers 4] [--reps 15] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from minilora import GPT, GPTConfig, add_lora, lora_layers, set_adapter


def build(args) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=args.seq, vocab_size=1024, n_layer=args.layers, n_head=4, n_embd=args.width))
    add_lora(model, ["c_attn", "c_proj", "c_fc"], r=8, adapter_name="a")
    add_lora(model, ["c_attn", "c_proj", "c_fc"], r=8, adapter_name="b")
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.02)
            for parked in layer.parked_adapters.values():
                parked.B.normal_(std=0.02)
    set_adapter(model, "a")
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    idx = torch.randint(0, 1024, (args.batch, args.seq))
    names = ["a", "b"] * (args.batch // 2) + ["a"] * (args.batch % 2)
    half = args.batch // 2
    runs = {
        "one": lambda: model(idx),
        "mixed": lambda: model(idx, adapter_names=names),
        "two": lambda: (model(idx[:half]), set_adapter(model, "b"), model(idx[half:]), set_adapter(model, "a")),
    }
    times = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(args.reps):
            for k, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    one = statistics.median(times["one"])
    print(f"GPT {args.layers} x {args.width}, two LoRA adapters r=8; batch {args.batch} x {args.seq} tokens; "
          f"median of {args.reps}, {torch.get_num_threads()} threads")
    for k in runs:
        print(f"{k:6s} {statistics.median(times[k]) * 1e3:8.1f} ms   {statistics.median(times[k]) / one:5.2f}x one")


if __name__ == "__main__":
    main()
