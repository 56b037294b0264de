"""minilora against the reference implementations, as speed ratios measured in one run.

    quant    NF4 quantize and dequantize vs bitsandbytes           (benchmarks/quant_speed.py's measurement)
    lora     a LoRA training step vs PEFT on transformers' GPT2LMHeadModel
    qlora    a QLoRA training step vs PEFT + bitsandbytes 4-bit (nf4, double quant, bf16 compute)
    llama    the same two steps on a Llama (8 layers x 512, GQA 8/2 heads, all seven linears adapted) vs
             transformers' LlamaForCausalLM with PEFT (and bitsandbytes for QLoRA)
    ckpt     minilora's gradient checkpointing vs torch.utils.checkpoint (benchmarks/checkpointing.py's models)
    kernels  CUDA only: fused NF4 dequant-matmul vs bf16 (benchmarks/kernel_speed.py)

A training step is zero_grad + forward + backward + AdamW step, on the same weights (minilora's model saved
in Hugging Face's layout and loaded by transformers), the same config, the same LoRA targets, rank,
alpha and batch, in one process (the same threads); both losses at the first step are printed to show the
models are the same. What each side computes, in which dtype:

    LoRA    everything in float32: frozen weights, adapters A and B, activations, loss.
    QLoRA   the targets' weights in NF4 with double quantization (blocks of 64), dequantized to bfloat16 for
            each matmul (forward, and again for dX in backward: neither side keeps the dense weight;
            bitsandbytes' backward dequantizes to the weight's original float32, then casts); the
            layer's input cast to bfloat16 and its output back to float32; adapters A and B stored, multiplied
            and updated in bfloat16 on both sides (PEFT's are cast to bfloat16 after get_peft_model, as the
            QLoRA paper's training script does for a bf16 run; PEFT's default would keep them in float32);
            embeddings, norms, attention, lm_head and the loss in float32. minilora adds the adapter term to
            the bf16 base output and casts once; PEFT casts each to float32 and adds (and clones the base
            output, as its bitsandbytes layer does). bitsandbytes dequantizes in its compiled CPU kernel,
            minilora in PyTorch (minilora/quant/fast/).
    Llama   as above, and minilora's Llama computes its head and loss in one step (minilora/ops/
            linear_cross_entropy.py: the same float32 logits, with loss and gradients equal to F.cross_entropy's
            within float32 rounding) where transformers runs lm_head, then its cross-entropy.

Times are medians of --reps repetitions, interleaved (ABBA order) so that load changes hit both sides alike,
after a warm-up step each. On a machine whose cores other jobs keep busy, two or more threads per process
make each parallel operator wait for a descheduled thread, which swamps the work itself; --threads 1 then
gives steadier ratios. ratio = reference time / minilora time: > 1 means minilora is faster. A comparison whose
reference is not installed, or cannot run here, is skipped with the reason.

    python benchmarks/speed.py [--only lora qlora ...] [--reps 5] [--threads N] [--out out/speed.png]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from minilora import GPT, GPTConfig, add_lora  # noqa: E402
from minilora.llama import Llama, LlamaConfig  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGETS = ["c_attn", "c_proj", "c_fc"]  # both c_proj (attention and MLP) match, in minilora and in PEFT
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SECTIONS = ("quant", "lora", "qlora", "llama", "ckpt", "kernels")


def load_sibling(name: str):
    """Import benchmarks/<name>.py as a module (the benchmarks folder is not a package)."""
    path = HERE / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path.relative_to(HERE.parent)} not found")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each fn over reps runs, run in ABBA order after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(reps):
        for k in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step(model, optimizer, loss_fn) -> Callable[[], float]:
    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


def adam(model) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def reference_pair(args, quantized: bool, llama: bool):
    """minilora's model (LoRA or QLoRA) and transformers' (GPT2LMHeadModel or LlamaForCausalLM) + PEFT holding
    the same weights and the same adapters' targets, rank and alpha."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    if llama:
        mine = Llama(LlamaConfig(vocab_size=args.vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=args.seq))
        targets, kw = LLAMA_TARGETS, {}
    else:
        mine = GPT(GPTConfig(block_size=args.seq, vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads,
                             n_embd=args.width))
        targets, kw = TARGETS, dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with tempfile.TemporaryDirectory() as d:
        mine.save_pretrained(d)
        if quantized:
            from transformers import BitsAndBytesConfig
            kw.update(quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16), device_map="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = AutoModelForCausalLM.from_pretrained(d, **kw)
    ref = get_peft_model(ref, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                         target_modules=targets, fan_in_fan_out=not llama))
    if quantized:  # adapters in the compute dtype, as minilora's QLoRALinear keeps them
        for p in ref.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    if quantized:
        from minilora.qlora import quantize_model
        quantize_model(mine, targets, compute_dtype=torch.bfloat16)
    add_lora(mine, targets, r=args.r, alpha=2 * args.r)
    return mine.train(), ref.train()


def step_ratio(args, quantized: bool, rows: list, llama: bool = False) -> None:
    name = ("Llama " if llama else "") + ("QLoRA step" if quantized else "LoRA step")
    ref_name = "PEFT + bitsandbytes" if quantized else "PEFT"
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
        if quantized:
            import bitsandbytes  # noqa: F401
    except ImportError as e:
        print(f"{name}: skipped, reference not installed ({e})")
        return
    try:
        mine, ref = reference_pair(args, quantized, llama)
    except Exception as e:  # noqa: BLE001 - e.g. a bitsandbytes build without CPU 4-bit support
        print(f"{name}: skipped, the reference cannot be built here ({type(e).__name__}: {e})")
        return
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    targets = torch.roll(idx, -1, 1)
    targets[:, -1] = -100  # transformers shifts labels inside; minilora gets the shifted targets
    fns = {"minilora": train_step(mine, adam(mine), lambda: mine(idx, targets)[1]),
           ref_name: train_step(ref, adam(ref), lambda: ref(input_ids=idx, labels=idx).loss)}
    first = {k: f() for k, f in fns.items()}  # also the warm-up
    dt = {k: {str(p.dtype).removeprefix("torch.") for p in m.parameters() if p.requires_grad}
          for k, m in (("minilora", mine), (ref_name, ref))}
    t = interleaved_medians(fns, args.reps)
    ratio = t[ref_name] / t["minilora"]
    print(f"{name}: first-step loss minilora {first['minilora']:.6f} vs {ref_name} {first[ref_name]:.6f}; "
          f"adapter dtype {dt['minilora']} vs {dt[ref_name]}; median minilora {t['minilora']:.3f} s, "
          f"{ref_name} {t[ref_name]:.3f} s -> ratio {ratio:.2f}x")
    rows.append((f"{name} vs {ref_name}", ratio))


def quant_ratio(args, rows: list) -> None:
    """NF4 quantize / dequantize of a 4096 x 4096 weight, timed with benchmarks/quant_speed.py's paired_medians."""
    try:
        qs = load_sibling("quant_speed")
        import bitsandbytes.functional as F
    except (FileNotFoundError, ImportError) as e:
        print(f"NF4 quantize/dequantize: skipped ({e})")
        return
    from minilora.quant import dequantize_nf4, quantize_nf4

    torch.manual_seed(0)
    x = torch.randn(4096, 4096)
    packed, ref_state = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    state = quantize_nf4(x, blocksize=64, double_quant=True)
    same = torch.equal(state.packed, packed.view(-1)) and torch.equal(dequantize_nf4(state),
                                                                       F.dequantize_4bit(packed, ref_state))
    pairs = {"NF4 quantize (fp32, 4096^2)": (
                 lambda: F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4"),
                 lambda: quantize_nf4(x, blocksize=64, double_quant=True)),
             "NF4 dequantize (-> fp32, 4096^2)": (
                 lambda: F.dequantize_4bit(packed, ref_state), lambda: dequantize_nf4(state))}
    for label, (ref, ours) in pairs.items():
        t_ref, t_ours = qs.paired_medians(ref, ours, max(args.reps, 5))
        print(f"{label} vs bitsandbytes: median minilora {t_ours * 1e3:.1f} ms, bitsandbytes {t_ref * 1e3:.1f} ms "
              f"-> ratio {t_ref / t_ours:.2f}x (same bytes: {same})")
        rows.append((f"{label} vs bitsandbytes", t_ref / t_ours))


def ckpt_ratio(args, rows: list) -> None:
    try:
        cb = load_sibling("checkpointing")
    except FileNotFoundError as e:
        print(f"checkpointing: skipped ({e})")
        return
    ns = argparse.Namespace(seq=args.seq, width=args.ckpt_width, batch=args.batch, device="cpu")
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    models = {m: cb.build(args.ckpt_blocks, m, ns) for m in ("minilora", "torch")}
    t = interleaved_medians({m: (lambda model=model: cb.step(model, idx)) for m, model in models.items()},
                            args.reps)
    ratio = t["torch"] / t["minilora"]
    print(f"checkpointing ({args.ckpt_blocks} blocks of width {args.ckpt_width}, forward + backward): median "
          f"minilora {t['minilora']:.3f} s, torch.utils.checkpoint {t['torch']:.3f} s -> ratio {ratio:.2f}x")
    rows.append(("checkpointing vs torch.utils.checkpoint", ratio))


def kernel_ratios(args, rows: list) -> None:
    if not torch.cuda.is_available():
        print("kernels: skipped, no CUDA GPU here (the fused NF4 kernels are compared with bf16 matmuls by "
              "benchmarks/kernel_speed.py on a CUDA machine)")
        return
    ks = load_sibling("kernel_speed")
    out = os.path.join(os.path.dirname(args.out) or ".", "kernel_speed.png")
    print(f"kernels: running benchmarks/kernel_speed.py (writes {out})")
    ks.measure(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--layers", type=int, default=6, help="GPT-2-shaped model: 6 x 768 = distilgpt2's shape")
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ckpt-blocks", type=int, default=16)
    ap.add_argument("--ckpt-width", type=int, default=256)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads for every side (default: torch's)")
    ap.add_argument("--out", default="out/speed.png")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GPT-2-shaped model: {args.layers} layers, "
          f"width {args.width}, {args.heads} heads, vocab {args.vocab}; batch {args.batch} x {args.seq}; "
          f"LoRA r={args.r}, alpha={2 * args.r} on {TARGETS}; {args.reps} reps")
    rows: list[tuple[str, float]] = []
    if "quant" in args.only:
        quant_ratio(args, rows)
    if "lora" in args.only:
        step_ratio(args, False, rows)
    if "qlora" in args.only:
        step_ratio(args, True, rows)
    if "llama" in args.only:
        step_ratio(args, False, rows, llama=True)
        step_ratio(args, True, rows, llama=True)
    if "ckpt" in args.only:
        ckpt_ratio(args, rows)
    if "kernels" in args.only:
        kernel_ratios(args, rows)
    if not rows:
        print("nothing measured")
        return
    print("\nratio = reference time / minilora time (> 1: minilora faster)")
    for label, ratio in rows:
        print(f"  {label:<45} {ratio:6.2f}x")
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.2))
    ax.barh([r[0] for r in rows], [r[1] for r in rows], color=["#55a868" if r[1] >= 1 else "#c44e52" for r in rows])
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xlabel("reference time / minilora time")
    ax.invert_yaxis()
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
