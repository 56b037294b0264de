"""Command line: python -m minilora {demo, pretrain, finetune, generate, memory}.

    python -m minilora demo                                    # the whole story in a few minutes on a CPU
    python -m minilora pretrain --out runs/base --steps 800
    python -m minilora finetune --base runs/base --mode lora --out runs/lora [--resume]
    torchrun --nproc_per_node 2 -m minilora finetune --base runs/base --out runs/lora   # data parallel
    python -m minilora generate --model runs/base --adapter runs/lora/adapter --context "You must learn patience."
    python -m minilora memory --mode full lora qlora --n-layer 32 --n-embd 4096 --seq-len 512

Bad arguments end with one line `error: ...` and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return n


def _model_args(p: argparse.ArgumentParser, d) -> None:
    p.add_argument("--n-layer", type=_positive, default=d.n_layer)
    p.add_argument("--n-head", type=_positive, default=d.n_head)
    p.add_argument("--n-embd", type=_positive, default=d.n_embd)
    p.add_argument("--block-size", type=_positive, default=d.block_size)


def _lora_args(p: argparse.ArgumentParser, d) -> None:
    p.add_argument("--r", "--lora-r", dest="r", type=_positive, default=d.r, help="LoRA rank (--lora-r under torchrun)")
    p.add_argument("--alpha", type=float, default=d.alpha, help="LoRA alpha (scaling = alpha / r)")
    p.add_argument("--targets", nargs="+", default=list(d.targets), help="module name patterns for LoRA")


def build_parser() -> argparse.ArgumentParser:
    from .demos.finetune import DemoConfig
    from .train import TrainConfig
    dc, tc = DemoConfig(), TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m minilora", description="minilora: LoRA and QLoRA by hand")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="pretrain (or reuse) a small GPT, fine-tune it full / LoRA / QLoRA, report")
    p.add_argument("--out", default=dc.out, help="run directory (default %(default)s)")
    p.add_argument("--steps", type=_positive, default=dc.steps, help="fine-tuning steps per mode")
    p.add_argument("--pretrain-steps", type=_positive, default=dc.pretrain_steps)
    p.add_argument("--modes", nargs="+", choices=("full", "lora", "qlora"), default=list(dc.modes))
    p.add_argument("--cache", default=None, help="where pretrained bases are kept (default ~/.cache/minilora)")
    p.add_argument("--no-cache", action="store_true", help="pretrain a fresh base and keep it in --out only")
    p.add_argument("--n-train", type=_positive, default=dc.n_train)
    p.add_argument("--n-val", type=_positive, default=dc.n_val)
    p.add_argument("--vocab-size", type=int, default=dc.vocab_size, help="BPE vocabulary of the base (>= 257)")
    _model_args(p, dc)
    p.add_argument("--seed", type=int, default=dc.seed)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("pretrain", help="train a BPE tokenizer and a GPT from scratch on the stdlib's English")
    p.add_argument("--out", required=True, help="directory for config.json, model.safetensors, tokenizer")
    p.add_argument("--steps", type=_positive, default=dc.pretrain_steps)
    p.add_argument("--batch-size", type=_positive, default=dc.pretrain_batch_size)
    p.add_argument("--lr", type=float, default=dc.pretrain_lr)
    p.add_argument("--vocab-size", type=int, default=dc.vocab_size, help="BPE vocabulary (>= 257)")
    _model_args(p, dc)
    p.add_argument("--seed", type=int, default=dc.seed)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("finetune", help="fine-tune a base model on instruction data (full, LoRA or QLoRA)")
    p.add_argument("--base", required=True, help="base model directory (pretrain's --out, or a GPT-2 directory)")
    p.add_argument("--out", required=True, help="run directory: checkpoint/, adapter/ or model/, metrics.json")
    p.add_argument("--mode", choices=("full", "lora", "qlora"), default=tc.mode)
    p.add_argument("--data", default=None, help="JSONL of instruction/context/output (default: the Yoda task)")
    p.add_argument("--n-train", type=_positive, default=dc.n_train)
    p.add_argument("--n-val", type=_positive, default=dc.n_val)
    p.add_argument("--steps", type=_positive, default=dc.steps)
    p.add_argument("--batch-size", type=_positive, default=dc.batch_size)
    p.add_argument("--grad-accum", type=_positive, default=tc.grad_accum)
    p.add_argument("--lr", type=float, default=None, help="default: %g full, %g LoRA/QLoRA" % (dc.lr_full, dc.lr_lora))
    p.add_argument("--warmup-steps", type=int, default=10)
    _lora_args(p, dc)
    p.add_argument("--dropout", type=float, default=tc.dropout, help="LoRA dropout")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--paged", action="store_true", help="paged AdamW")
    p.add_argument("--seed", type=int, default=dc.seed)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("generate", help="greedy (or sampled) answer of a model, optionally with an adapter")
    p.add_argument("--model", required=True, help="model directory (config.json + model.safetensors)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT layout)")
    p.add_argument("--qlora", action="store_true", help="quantize the base to NF4 before loading the adapter")
    p.add_argument("--instruction", default="Say it like Yoda.")
    p.add_argument("--context", default=None, help="context of the instruction prompt")
    p.add_argument("--prompt", default=None, help="raw text to continue instead of an instruction prompt")
    p.add_argument("--max-new-tokens", type=_positive, default=60)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("memory", help="training-memory breakdown per mode (analytic; --measure runs one step)")
    p.add_argument("--model", default=None, help="take the shape from this model directory")
    _model_args(p, dc)
    p.add_argument("--vocab-size", type=_positive, default=dc.vocab_size)
    p.add_argument("--mode", nargs="+", choices=("full", "lora", "qlora"), default=["full", "lora", "qlora"])
    p.add_argument("--batch-size", type=_positive, default=dc.batch_size)
    p.add_argument("--seq-len", type=_positive, default=None, help="default: block size")
    _lora_args(p, dc)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--paged", action="store_true")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="weights, gradients and activations (AdamW state stays float32: the lecture's 12 B/param)")
    p.add_argument("--measure", action="store_true", help="also measure one real training step (small float32 models)")
    return parser


def cmd_demo(a) -> None:
    from .demos.finetune import DemoConfig, print_report, run_demo
    cfg = DemoConfig(steps=a.steps, pretrain_steps=a.pretrain_steps, modes=tuple(a.modes), seed=a.seed,
                     out=a.out, cache="" if a.no_cache else a.cache, progress=not a.no_progress,
                     n_train=a.n_train, n_val=a.n_val, vocab_size=a.vocab_size, n_layer=a.n_layer,
                     n_head=a.n_head, n_embd=a.n_embd, block_size=a.block_size)
    print_report(run_demo(cfg))


def cmd_pretrain(a) -> None:
    from .demos.finetune import DemoConfig, pretrain_base
    cfg = DemoConfig(vocab_size=a.vocab_size, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd,
                     block_size=a.block_size, pretrain_steps=a.steps, pretrain_batch_size=a.batch_size,
                     pretrain_lr=a.lr, seed=a.seed, progress=not a.no_progress)
    res = pretrain_base(cfg, Path(a.out))
    print(f"pretrained {a.steps} steps in {res.seconds:.0f}s: validation loss {res.final['loss']:.3f} "
          f"-> {a.out}")


def tokenizer_for(directory: str, model):
    """The tokenizer stored beside a model, checked against the model's vocabulary."""
    from .data import ByteTokenizer, load_tokenizer
    tok = load_tokenizer(directory)
    vocab = model.config.vocab_size
    if isinstance(tok, ByteTokenizer) and vocab != tok.vocab_size:
        raise ValueError(f"{directory} holds no tokenizer (tokenizer.json or minilora_tokenizer.json) for its "
                         f"vocabulary of {vocab}")
    if tok.vocab_size > vocab:
        raise ValueError(f"the tokenizer in {directory} has {tok.vocab_size} ids, the model only {vocab}")
    return tok


def _instruction_data(a, tok, block_size: int):
    from .data import InstructionSet, load_jsonl, split_examples, yoda_dataset
    if a.data:
        train_ex, val_ex = split_examples(load_jsonl(a.data), 0.1, seed=a.seed)
    else:
        train_ex, val_ex = yoda_dataset(a.n_train, a.n_val, seed=a.seed)
    return InstructionSet(train_ex, tok, block_size), InstructionSet(val_ex, tok, block_size)


def cmd_finetune(a) -> None:
    from .demos.finetune import DemoConfig
    from .gpt import GPT
    from .train import TrainConfig, train
    dc = DemoConfig()
    base = GPT.from_pretrained(a.base)
    tok = tokenizer_for(a.base, base)
    train_set, val_set = _instruction_data(a, tok, base.config.block_size)
    lr = a.lr if a.lr is not None else (dc.lr_full if a.mode == "full" else dc.lr_lora)
    cfg = TrainConfig(mode=a.mode, r=a.r, alpha=a.alpha, dropout=a.dropout, targets=tuple(a.targets), lr=lr,
                      warmup_steps=a.warmup_steps, steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum,
                      gradient_checkpointing=a.gradient_checkpointing, paged=a.paged, seed=a.seed,
                      device=a.device, eval_every=a.eval_every, save_every=a.save_every, out_dir=a.out,
                      progress=not a.no_progress)
    res = train(base, cfg, train_set, val_set, resume=a.resume)
    from .distributed import is_main
    if not is_main():  # under torchrun, rank 0 alone saves and reports
        return
    if a.mode == "full":
        tok.save(Path(a.out) / "model")
    ev = res.final
    print(f"{a.mode}: {res.params}")
    print(f"step {len(res.losses)}: train loss {res.losses[-1]:.4f}, validation loss {ev['loss']:.4f}, "
          f"exact match {100 * ev['exact_match']:.1f}% -> {a.out}")


def cmd_generate(a) -> None:
    import torch
    from .adapters import load_adapter
    from .data import prompt
    from .gpt import GPT
    model = GPT.from_pretrained(a.model)
    tok = tokenizer_for(a.model, model)
    if a.adapter:
        if a.qlora:
            import json
            from .inject import find_targets
            from .qlora import quantize_model, untied_linears
            config = Path(a.adapter) / "adapter_config.json"
            if not config.is_file():
                raise FileNotFoundError(f"{config} not found")
            targets = json.loads(config.read_text())["target_modules"]
            quantize_model(model, untied_linears(model, find_targets(model, targets)), compute_dtype=torch.float32)
        load_adapter(model, a.adapter)
    elif a.qlora:
        raise ValueError("--qlora needs --adapter")
    if a.prompt is not None and a.context is not None:
        raise ValueError("give either --prompt or --context, not both")
    text = a.prompt if a.prompt is not None else prompt(a.instruction, a.context or "")
    ids = tok.encode(text)
    n = max(0, min(a.max_new_tokens, model.config.block_size - len(ids)))
    if a.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {a.temperature}")
    g = torch.Generator().manual_seed(a.seed)
    out = model.generate(torch.tensor([ids]), n, greedy=a.temperature == 0, temperature=a.temperature or 1.0,
                         eos_token_id=tok.eos_id, generator=g)[0, len(ids):].tolist()
    if tok.eos_id in out:
        out = out[:out.index(tok.eos_id)]
    print(tok.decode(out))


def cmd_memory(a) -> None:
    from .gpt import GPT, GPTConfig
    from .memory import estimate, format_table
    if a.model:
        cfg = GPT.from_pretrained(a.model).config
    else:
        cfg = GPTConfig(block_size=a.block_size, vocab_size=a.vocab_size, n_layer=a.n_layer, n_head=a.n_head,
                        n_embd=a.n_embd)
    seq = a.seq_len or cfg.block_size
    rows = []
    for mode in a.mode:
        rows.append(estimate(cfg, mode, batch_size=a.batch_size, seq_len=seq, r=a.r, targets=tuple(a.targets),
                             dtype=a.dtype, state_dtype="float32",
                             compute_dtype="float32" if a.dtype == "float32" else a.dtype,
                             optimizer="paged" if a.paged else "adamw", checkpointing=a.gradient_checkpointing,
                             device="cpu", label=f"{mode} (estimate)"))
        if a.measure:
            rows.append(_measure(cfg, mode, a, seq))
    print(f"GPT: {cfg.n_layer} layers x {cfg.n_embd} wide, vocab {cfg.vocab_size}, {rows[0].n_params:,} parameters; "
          f"batch {a.batch_size} x {seq} tokens; {a.dtype} weights, AdamW{' (paged)' if a.paged else ''}"
          f"{', gradient checkpointing' if a.gradient_checkpointing else ''}")
    print(format_table(rows))


def _measure(cfg, mode: str, a, seq: int):
    import torch
    from .gpt import GPT
    from .train import TrainConfig, measure_step_memory, prepare_model
    if a.dtype != "float32":
        raise ValueError("--measure trains a float32 model; leave --dtype at float32 to measure")
    n_params = 12 * cfg.n_layer * cfg.n_embd ** 2
    if n_params > 50_000_000:
        raise ValueError(f"--measure runs a real step; {n_params:,} parameters is too large for it here")
    tc = TrainConfig(mode=mode, r=a.r, targets=tuple(a.targets), gradient_checkpointing=a.gradient_checkpointing,
                     paged=a.paged, batch_size=a.batch_size)
    torch.manual_seed(0)
    model = prepare_model(GPT(cfg), tc)
    x = torch.randint(cfg.vocab_size, (a.batch_size, seq))
    m = measure_step_memory(model, tc, (x, x))
    m.label = f"{mode} (measured)"
    return m


COMMANDS = {"demo": cmd_demo, "pretrain": cmd_pretrain, "finetune": cmd_finetune, "generate": cmd_generate,
            "memory": cmd_memory}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
