"""Training memory: minilora's analytic model against measured bytes, then against the lecture's figures.

(a) A small GPT trained for one step in each mode (full, LoRA, QLoRA; checkpointing off/on): the bytes the
    tensors really hold (parameters, gradients, optimizer state, peak saved activations) beside
    minilora.memory.estimate() for the same config.
(b) The same GPT scaled to exactly 10B parameters: full fine-tuning under the lecture's assumptions (fp16
    weights + fp16 gradients + fp32 Adam state = 12 B/param), mixed precision (+ fp32 master weights),
    LoRA and QLoRA with their breakdown, and what the slide's "~40 GB" must include, in numbers.
(c) The QLoRA paper's 65B figures (> 780 GB to fine-tune in 16 bits, < 48 GB with QLoRA) from the same model.

    python benchmarks/memory_vs_slides.py [--out out/memory_vs_slides.png]
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from minilora import GPT, GPTConfig, add_lora  # noqa: E402
from minilora.memory import (GB, estimate, format_bytes, format_table, gpt_param_count, measure,  # noqa: E402
                             scaled_config)
from minilora.plots import plot_memory_breakdown, save_figure  # noqa: E402

TARGETS = ["c_attn", "c_proj", "c_fc"]  # every linear layer of every block (the QLoRA paper's choice)
LECTURE = dict(dtype="fp16", state_dtype="fp32")                        # slide: fp16 model, fp32 Adam
QLORA = dict(dtype="bf16", compute_dtype="bf16", state_dtype="fp32")    # slide: NF4 base, bf16 adapters


def small_gpt_table(args) -> None:
    cfg = dict(block_size=args.seq, vocab_size=512, n_layer=6, n_head=4, n_embd=128)
    dtype = getattr(torch, args.dtype)
    cuda = args.device == "cuda"
    print(f"(a) small GPT {cfg}, batch {args.batch} x {args.seq}, LoRA r={args.r} on {TARGETS}, AdamW, {args.dtype} "
          f"on {args.device} (QLoRA: NF4 base, bf16 compute and adapters)")
    print(f"{'mode':<6} {'ckpt':<5} {'estimate':>10} {'measured':>10} {'rel.err':>8} {'act. est':>10} "
          f"{'act. meas':>10} {'rel.err':>8}" + (f" {'cuda max alloc':>14} {'/ estimate':>10}" if cuda else ""))
    for mode in ("full", "lora", "qlora"):
        for ckpt in (False, True):
            config = GPTConfig(**cfg, gradient_checkpointing=ckpt)
            torch.manual_seed(0)
            model = GPT(config).to(args.device, dtype).train()
            if mode == "qlora":
                try:
                    from minilora.qlora import quantize_model
                    quantize_model(model, TARGETS)
                except Exception as e:  # noqa: BLE001 - reported, not hidden
                    print(f"{mode:<6} {str(ckpt):<5} skipped: minilora.qlora unavailable ({type(e).__name__}: {e})")
                    continue
            if mode != "full":
                add_lora(model, TARGETS, r=args.r)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            idx = torch.randint(0, 512, (args.batch, args.seq), device=args.device)
            got = measure(model, opt, (idx, torch.roll(idx, -1, 1)))
            est = estimate(config, mode, batch_size=args.batch, seq_len=args.seq, r=args.r, targets=TARGETS,
                           dtype=dtype, device=args.device)
            line = (f"{mode:<6} {str(ckpt):<5} {format_bytes(est.total):>10} {format_bytes(got.total):>10} "
                    f"{est.relative_error(got):>8.2%} {format_bytes(est.activations):>10} "
                    f"{format_bytes(got.activations):>10} {est.relative_error(got, 'activations'):>8.2%}")
            if cuda:
                line += f" {format_bytes(got.peak_allocated):>14} {got.peak_allocated / est.total:>10.2f}"
            print(line)
    if cuda:
        print("cuda max alloc also holds what autograd does not save: the logits, gradients in flight, the "
              "dequantized weight of the layer being computed, workspace; the estimate counts saved tensors only")


def tokens_to_reach(target: float, b1, b2) -> float:
    """Tokens in flight at which b (linear in the batch: b1 at one sequence, b2 at two) totals `target` bytes."""
    per_seq = b2.activations - b1.activations
    fixed = b1.total - per_seq
    return (target - fixed) / per_seq * b1.tokens


def slide_10b(args) -> list:
    c10 = scaled_config(10_000_000_000, n_layer=31, n_embd=5120, n_head=40, block_size=args.big_seq)
    print(f"\n(b) GPT scaled to {gpt_param_count(c10):,} parameters: n_layer={c10.n_layer}, n_embd={c10.n_embd}, "
          f"n_head={c10.n_head}, vocab_size={c10.vocab_size} (the vocabulary absorbs the remainder), "
          f"batch 1 x {args.big_seq} tokens, LoRA r=64 on every block linear")
    act = dict(batch_size=1, seq_len=args.big_seq, checkpointing=False)
    rows = [
        estimate(c10, "full", **LECTURE, **act, label="full: fp16 + fp32 Adam"),
        estimate(c10, "full", **LECTURE, master_weights=True, **act, label="full, mixed precision"),
        estimate(c10, "lora", **LECTURE, r=64, **act, label="LoRA (fp16 base)"),
        estimate(c10, "qlora", **QLORA, r=64, **act, label="QLoRA (NF4 base)"),
        estimate(c10, "qlora", **QLORA, r=64, **{**act, "checkpointing": True}, label="QLoRA + checkpointing"),
        estimate(c10, "full", **LECTURE, optimizer="adamw8bit", **act, label="full: fp16 + 8-bit Adam"),
    ]
    print(format_table(rows, unit="GB"))
    print(f"{'without activations':<26}" + "".join(f"{format_bytes(b.state_bytes, 'GB'):>24}" for b in rows))
    print(f"{'bytes / parameter (state)':<26}" + "".join(f"{b.state_bytes / b.n_params:>24.3f}" for b in rows))
    full = rows[0]
    print(f"\nslide 'full fine-tuning, 10B -> 120 GB': weights {format_bytes(full.weights, 'GB')} + gradients "
          f"{format_bytes(full.gradients, 'GB')} + Adam state {format_bytes(full.optimizer_state, 'GB')} = "
          f"{format_bytes(full.state_bytes, 'GB')} ({full.state_bytes / full.n_params:.2f} B/param; the Adam "
          f"step counters add {full.optimizer_state - 8 * full.n_params} bytes). Mixed precision's fp32 master "
          f"copy makes it {format_bytes(rows[1].state_bytes, 'GB')} (16 B/param). Activations come on top: "
          f"{format_bytes(full.activations, 'GB')} at 1 x {args.big_seq} tokens.")
    eight = rows[-1]
    print(f"With 8-bit Adam state (AdamW8bit: 1 byte each for m and v, an fp32 absmax per 256 values) the same "
          f"full fine-tune holds {format_bytes(eight.state_bytes, 'GB')} ({eight.state_bytes / eight.n_params:.3f} "
          f"B/param): Adam state {format_bytes(eight.optimizer_state, 'GB')} instead of "
          f"{format_bytes(full.optimizer_state, 'GB')}.")

    print("\nslide '10B -> ~40 GB' (LoRA/QLoRA). Weights, adapters and optimizer state alone give:")
    for b in rows[2:4]:
        print(f"  {b.label:<18} {format_bytes(b.state_bytes, 'GB')}  (base {format_bytes(b.weights + b.quantized_weights, 'GB')}, "
              f"adapters {b.adapters / 1e9:.2f} GB + grads {b.adapter_gradients / 1e9:.2f} GB "
              f"+ fp32 Adam {b.adapter_optimizer_state / 1e9:.2f} GB)")
    print("  so 40 GB is not weights + state: it holds once activations are counted. Tokens in flight "
          "(batch x sequence) that bring each recipe to 40 GB:")
    for mode, kw, name in (("lora", LECTURE, "LoRA (fp16 base)"), ("qlora", QLORA, "QLoRA (NF4 base)")):
        for ckpt in (False, True):
            b1 = estimate(c10, mode, **kw, r=64, batch_size=1, seq_len=args.big_seq, checkpointing=ckpt)
            b2 = estimate(c10, mode, **kw, r=64, batch_size=2, seq_len=args.big_seq, checkpointing=ckpt)
            n = tokens_to_reach(40 * GB, b1, b2)
            per_tok = (b2.activations - b1.activations) / b1.tokens
            print(f"  {name:<18} checkpointing {'on ' if ckpt else 'off'}: {per_tok / 1e6:6.3f} MB of activations "
                  f"per token -> 40 GB at {n:,.0f} tokens = {n / args.big_seq:.2f} sequences of {args.big_seq}")
    return rows


def paper_65b(args) -> list:
    c65 = scaled_config(65_000_000_000, n_layer=80, n_embd=8192, n_head=64, block_size=2048)
    seq = args.paper_seq
    print(f"\n(c) GPT scaled to {gpt_param_count(c65):,} parameters (n_layer=80, n_embd=8192, vocab_size="
          f"{c65.vocab_size}), batch 1 x {seq} tokens, LoRA r=64 on every block linear")
    rows = [
        estimate(c65, "full", **LECTURE, batch_size=1, seq_len=seq, label="65B full, 16-bit"),
        estimate(c65, "qlora", **QLORA, r=64, batch_size=1, seq_len=seq, checkpointing=True,
                 label="65B QLoRA + ckpt"),
        estimate(c65, "qlora", **QLORA, r=64, batch_size=1, seq_len=seq, checkpointing=True, optimizer="paged",
                 device_budget=0, label="65B QLoRA + ckpt + paged"),
    ]
    print(format_table(rows, unit="GB"))
    full, q, paged = rows
    print(f"QLoRA paper: '> 780 GB' for 16-bit fine-tuning of 65B -> ours: {format_bytes(full.state_bytes, 'GB')} "
          f"of weights + gradients + Adam state (12 B/param), {format_bytes(full.total, 'GB')} with activations "
          f"({'>' if full.total > 780 * GB else 'NOT >'} 780 GB)")
    print(f"QLoRA paper: '< 48 GB' with QLoRA -> ours: {format_bytes(q.total, 'GB')} "
          f"({'<' if q.total < 48 * GB else 'NOT <'} 48 GB; NF4 base {format_bytes(q.quantized_weights, 'GB')}); "
          f"with the Adam state paged out to the host: {format_bytes(paged.total, 'GB')} on the device, "
          f"{format_bytes(paged.offloaded, 'GB')} in host memory")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--big-seq", type=int, default=2048, help="sequence length for the 10B rows")
    ap.add_argument("--paper-seq", type=int, default=512, help="sequence length for the 65B rows")
    ap.add_argument("--out", default="out/memory_vs_slides.png")
    args = ap.parse_args()
    torch.manual_seed(0)
    small_gpt_table(args)
    rows10 = slide_10b(args)
    rows65 = paper_65b(args)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw=dict(width_ratios=[5, 3]))
    plot_memory_breakdown(rows10, ax=ax1, title=f"10B parameters, batch 1 x {args.big_seq} tokens",
                          reference_lines={"slide: 120 GB": 120, "slide: ~40 GB": 40})
    plot_memory_breakdown(rows65, ax=ax2, title=f"65B parameters, batch 1 x {args.paper_seq} tokens",
                          reference_lines={"QLoRA paper: 780 GB": 780, "48 GB GPU": 48})
    fig.tight_layout()
    save_figure(fig, args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
