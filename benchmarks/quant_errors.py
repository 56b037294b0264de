"""Round-trip error of NF4, FP4, int4 and int8 absmax, blockwise (64), on N(0,1) data and on trained weights.

The trained weights come from a small minilora GPT trained here for a few hundred AdamW steps on the
English corpus in minilora.data (byte tokens); every linear weight of its blocks is measured.

    python benchmarks/quant_errors.py [--steps 300] [--out out/quant_errors.png]
"""
from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from minilora import GPT, GPTConfig  # noqa: E402
from minilora.data import ByteTokenizer, TokenStream, english_documents, split_documents  # noqa: E402
from minilora.quant import FORMATS, error_table  # noqa: E402


def trained_gpt_weights(steps: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Train a small GPT for `steps` AdamW steps; return its block linear weights (flattened) and a summary."""
    torch.manual_seed(seed)
    train_text, _ = split_documents(english_documents())
    tok = ByteTokenizer()
    stream = TokenStream(tok.encode(train_text[:2_000_000]), block_size=64)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=4, n_head=4, n_embd=128))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    t0, losses = time.perf_counter(), []
    for _ in range(steps):
        x, y = stream.sample(16, g)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    weights = [m.weight.detach().reshape(-1) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".h." in f".{name}"]
    w = torch.cat(weights)
    summary = (f"GPT 4 layers x 128 wide, {steps} steps, loss {losses[0]:.2f} -> {sum(losses[-20:]) / 20:.2f}, "
               f"{time.perf_counter() - t0:.0f} s; {len(weights)} block linear weights, {w.numel():,} values")
    return w, summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--out", default="out/quant_errors.png")
    args = p.parse_args()
    torch.manual_seed(0)
    gaussian = torch.randn(1 << 20)
    trained, summary = trained_gpt_weights(args.steps)
    print(summary)
    data = {"N(0,1)": gaussian, "trained GPT": trained}
    rows = error_table(data, FORMATS, args.blocksize)
    print(f"\nblocksize {args.blocksize}, absmax in float32 (no double quantization)")
    print(f"{'data':<12} {'format':<6} {'bits':>5} {'mean |err|':>11} {'max |err|':>10} {'RMSE/std':>9}")
    for r in rows:
        print(f"{r['data']:<12} {r['format']:<6} {r['bits_per_param']:>5.2f} {r['mean_abs']:>11.3e} "
              f"{r['max_abs']:>10.3e} {r['rel_rmse']:>9.4f}")
    if args.out:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for ax, name in zip(axes, data):
            sub = [r for r in rows if r["data"] == name]
            ax.bar([r["format"] for r in sub], [r["rel_rmse"] for r in sub], color="tab:blue")
            ax.set_yscale("log")
            ax.set_title(f"{name}: RMSE / std (blocksize {args.blocksize})")
        fig.tight_layout()
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        fig.savefig(args.out, dpi=120)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
