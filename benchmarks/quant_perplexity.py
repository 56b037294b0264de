"""Held-out perplexity of minilora GPTs with their block linears quantized by each method (the QLoRA paper's Table 2
on our own models), with bits per parameter measured from the stored tensors and the time each method takes.

Models: the demo's pretrained base (minilora.demos.get_base, cached after its first build) and a larger GPT
(6 layers x 256 wide by default) pretrained here on the same English corpus with the base's tokenizer.
Quantized: every nn.Linear inside the transformer blocks (c_attn, c_proj, c_fc); the embeddings and the tied
lm_head stay fp32, as in the GPTQ and QLoRA papers' setups.

    python benchmarks/quant_perplexity.py [--steps 300] [--out out/quant_perplexity.png]
"""
from __future__ import annotations

import argparse
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from minilora import GPT, GPTConfig, evaluate  # noqa: E402
from minilora.data import TokenStream, english_documents, load_tokenizer, split_documents  # noqa: E402
from minilora.demos import DemoConfig, get_base  # noqa: E402
from minilora.runs.files import atomic_write  # noqa: E402
from minilora.llm_int8 import Int8Linear  # noqa: E402
from minilora.quant import (dequantize_4bit, dequantize_int8, fp4_code, int4_code, quantize_4bit,  # noqa: E402
                            quantize_int8, quantize_nf4)
from minilora.quant.affine import dequantize_affine, quantize_affine  # noqa: E402
from minilora.quant.gptq import quantize_model_gptq  # noqa: E402
from minilora.train import TrainConfig, train  # noqa: E402

TARGETS = ("c_attn", "c_proj", "c_fc")


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".h." in f".{n}"]


def _replace_weights(model, quantize):
    """quantize(weight) -> (dequantized weight, stored bytes) for every block linear; returns the bytes."""
    total = 0
    with torch.no_grad():
        for _, m in block_linears(model):
            w_hat, nbytes = quantize(m.weight.detach())
            m.weight.copy_(w_hat)
            total += nbytes
    return total


def _int8_absmax(w):   # one absmax per output row (blocks of in_features consecutive elements)
    q, absmax = quantize_int8(w, blocksize=w.shape[1])
    return dequantize_int8(q, absmax, blocksize=w.shape[1]), q.numel() + 4 * absmax.numel()


def _codebook(code, double_quant=False):
    def quantize(w):
        s = quantize_4bit(w, code, 64, double_quant)
        return dequantize_4bit(s), s.nbytes
    return quantize


def _nf4(double_quant):
    def quantize(w):
        s = quantize_nf4(w, 64, double_quant)
        return dequantize_4bit(s), s.nbytes
    return quantize


def _affine(w):
    s = quantize_affine(w, 4, 128)
    return dequantize_affine(s), s.nbytes


def _llm_int8(model, calib):
    total = 0
    for name, m in block_linears(model):
        layer = Int8Linear.from_linear(m, threshold=6.0, compute_dtype=torch.float16)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        total += layer.quantized_nbytes
    return total


def _gptq(act_order):
    def run(model, calib):
        states = quantize_model_gptq(model, calib, TARGETS, bits=4, groupsize=128, act_order=act_order)
        return sum(s.nbytes for s in states.values())
    return run


# name -> (apply(model, calibration batches) -> stored bytes of the quantized weights)
METHODS = {
    "fp32": lambda model, calib: 4 * sum(m.weight.numel() for _, m in block_linears(model)),
    "int8 absmax (row)": lambda model, calib: _replace_weights(model, _int8_absmax),
    "LLM.int8() t=6": _llm_int8,
    "int4 absmax b64": lambda model, calib: _replace_weights(model, _codebook(int4_code())),
    "int4 affine g128": lambda model, calib: _replace_weights(model, _affine),
    "FP4 b64": lambda model, calib: _replace_weights(model, _codebook(fp4_code())),
    "NF4 b64": lambda model, calib: _replace_weights(model, _nf4(False)),
    "NF4 + DQ": lambda model, calib: _replace_weights(model, _nf4(True)),
    "GPTQ int4 g128": _gptq(False),
    "GPTQ int4 g128 act-order": _gptq(True),
}


def perplexity_table(model_dir, build, val: TokenStream, calib: list[torch.Tensor], eval_batches: int) -> list[dict]:
    rows = []
    for name, apply in METHODS.items():
        model = build(model_dir)
        n_params = sum(m.weight.numel() for _, m in block_linears(model))
        t0 = time.perf_counter()
        with torch.no_grad():
            nbytes = apply(model, calib)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            loss = evaluate(model, val, batch_size=32, max_batches=eval_batches)["loss"]
        rows.append({"method": name, "ppl": math.exp(loss), "bits": 8 * nbytes / n_params, "seconds": seconds})
        print(f"  {name:<26} ppl {rows[-1]['ppl']:8.3f}   {rows[-1]['bits']:6.3f} bits/param   "
              f"quantize {seconds:6.2f} s", flush=True)
    return rows


def pretrain_larger(tok, train_ids, val_ids, steps: int, n_layer: int, n_embd: int, block_size: int) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=tok.vocab_size, n_layer=n_layer, n_head=n_embd // 64,
                          n_embd=n_embd))
    cfg = TrainConfig(mode="full", lr=2e-3, betas=(0.9, 0.95), warmup_steps=20, steps=steps, batch_size=16,
                      seed=0, eval_max_batches=4, progress=False, label="pretrain-larger")
    res = train(model, cfg, TokenStream(train_ids, block_size), TokenStream(val_ids, block_size))
    print(f"larger GPT {n_layer} x {n_embd}: {steps} steps in {res.seconds:.0f} s, "
          f"final val loss {res.final['loss']:.3f}", flush=True)
    return res.model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="pretraining steps of the larger model (0: skip it)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--calib", type=int, default=32, help="calibration windows for GPTQ (from the training text)")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches of 32 windows")
    p.add_argument("--out", default="out/quant_perplexity.png")
    args = p.parse_args()
    t_start = time.perf_counter()
    torch.manual_seed(0)

    base_dir, cached = get_base(DemoConfig(progress=False))
    tok = load_tokenizer(base_dir)
    base = GPT.from_pretrained(base_dir)
    T = base.config.block_size
    train_text, val_text = split_documents(english_documents())
    train_ids, val_ids = tok.encode(train_text), tok.encode(val_text)
    val = TokenStream(val_ids, T)
    g = torch.Generator().manual_seed(0)
    calib = [TokenStream(train_ids, T).sample(8, g)[0] for _ in range(max(1, args.calib // 8))]
    print(f"held-out: {min(args.eval_batches * 32, (len(val_ids) - 1) // T)} windows of {T} tokens; "
          f"GPTQ calibration: {sum(len(c) for c in calib)} training windows", flush=True)

    results = {}
    print(f"demo base ({base_dir.name}{', cached' if cached else ''}): {base.config.n_layer} x {base.config.n_embd}")
    results[f"demo base {base.config.n_layer}x{base.config.n_embd}"] = perplexity_table(
        base_dir, GPT.from_pretrained, val, calib, args.eval_batches)
    if args.steps > 0:
        larger = pretrain_larger(tok, train_ids, val_ids, args.steps, args.layers, args.width, T)
        state = {k: v.clone() for k, v in larger.state_dict().items()}

        def build(_):
            m = GPT(larger.config)
            m.load_state_dict(state)
            return m.eval()
        results[f"larger {args.layers}x{args.width}"] = perplexity_table(None, build, val, calib, args.eval_batches)

    print()
    for model_name, rows in results.items():
        print(f"| {model_name} | held-out ppl | bits/param | quantize s |")
        print("|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['method']} | {r['ppl']:.3f} | {r['bits']:.3f} | {r['seconds']:.2f} |")
        four = sorted((r for r in rows if r["method"] in ("int4 absmax b64", "FP4 b64", "NF4 b64", "NF4 + DQ")),
                      key=lambda r: -r["ppl"])
        print("4-bit data-free, worst to best: " + " > ".join(f"{r['method']} ({r['ppl']:.3f})" for r in four))
        print()

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (model_name, rows) in zip(axes[0], results.items()):
        for r in rows:
            ax.scatter(r["bits"], r["ppl"], s=30)
            ax.annotate(r["method"], (r["bits"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per parameter (stored tensors)")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(model_name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write(args.out, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    print(f"plot -> {args.out}; total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
