"""Command line: python -m minilora {demo, pretrain, finetune, generate, memory}.

    python -m minilora demo                                    # the whole story in a few minutes on a CPU
    python -m minilora pretrain --out runs/base --steps 800
    python -m minilora finetune --base runs/base --mode lora --out runs/lora [--resume]
    torchrun --nproc_per_node 2 -m minilora finetune --base runs/base --out runs/lora   # data parallel
    python -m minilora generate --model runs/base --adapter runs/lora/adapter --context "You must learn patience."
    python -m minilora memory --mode full lora qlora --n-layer 32 --n-embd 4096 --seq-len 512

Bad input (an argument, a file, a directory) ends with one line `error: ...` and exit status 2, before any
work starts where it can be known then; only a bug shows a traceback.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from .data import InstructionSet, load_jsonl, load_tokenizer, prompt, split_examples, yoda_dataset
from .demos.finetune import DemoConfig, pretrain_base, print_report, run_demo
from .parallel import is_main
from .generate import generate_per_adapter, generate_text, load_named_adapters, named_adapter_dirs
from .gpt import GPT, GPTConfig
from .memory import estimate, format_table
from .runs import check_run_dir
from .train import TrainConfig, measure_step_memory, prepare_model, train
from .train_config import INITS, MODES, OPTIMIZERS


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as every other bad input: one line `error: ...`, exit status 2."""
    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _int(least: int):
    """An argparse type: an integer >= least."""
    def parse(v: str) -> int:
        if not v.strip().lstrip("+-").isdigit() or int(v) < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {v!r}")
        return int(v)
    return parse


_positive, _count = _int(1), _int(0)


def _number(expected: str, ok):
    """An argparse type: a finite float for which ok(x) holds (inf and nan are refused, not trained on)."""
    def parse(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and ok(x)):
            raise argparse.ArgumentTypeError(f"expected a finite number {expected}, got {v!r}")
        return x
    return parse


_above_zero = _number("> 0", lambda x: x > 0)
_at_least_zero = _number(">= 0", lambda x: x >= 0)
_fraction = _number("in [0, 1)", lambda x: 0 <= x < 1)


def _device(v: str) -> str:
    """cpu, cuda, cuda:N or mps, and only one this PyTorch build and machine have."""
    try:
        d = torch.device(v)
    except (RuntimeError, ValueError):
        d = torch.device("meta")
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    have = {"cpu": True, "cuda": (d.index or 0) < n_cuda, "mps": torch.backends.mps.is_available()}
    if not have.get(d.type, False):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, one this machine has (this PyTorch "
                                         f"sees {n_cuda} CUDA device(s){'' if have['mps'] else ', no MPS'}), got {v!r}")
    return v


def _model_args(p: argparse.ArgumentParser, d) -> None:
    p.add_argument("--n-layer", type=_positive, default=d.n_layer)
    p.add_argument("--n-head", type=_positive, default=d.n_head)
    p.add_argument("--n-embd", type=_positive, default=d.n_embd)
    p.add_argument("--block-size", type=_positive, default=d.block_size)
    p.add_argument("--vocab-size", type=_positive, default=d.vocab_size, help="vocabulary size (a BPE needs >= 257)")


def _lora_args(p: argparse.ArgumentParser, d) -> None:
    p.add_argument("--r", "--lora-r", dest="r", type=_positive, default=d.r, help="LoRA rank (--lora-r under torchrun)")
    p.add_argument("--alpha", type=_above_zero, default=d.alpha, help="LoRA alpha (scaling = alpha / r)")
    p.add_argument("--targets", nargs="+", default=list(d.targets), help="module name patterns for LoRA")


def _run_args(p: argparse.ArgumentParser, d) -> None:
    p.add_argument("--seed", type=_count, default=d.seed)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it holds other files (nothing of theirs is deleted)")


def build_parser() -> argparse.ArgumentParser:
    dc, tc = DemoConfig(), TrainConfig()
    parser = _Parser(prog="python -m minilora", description="minilora: LoRA and QLoRA by hand")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="pretrain (or reuse) a small GPT, fine-tune it full / LoRA / QLoRA, report")
    p.add_argument("--out", default=dc.out, help="run directory (default %(default)s)")
    p.add_argument("--steps", type=_positive, default=dc.steps, help="fine-tuning steps per mode")
    p.add_argument("--pretrain-steps", type=_positive, default=dc.pretrain_steps)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(dc.modes))
    p.add_argument("--cache", default=None, help="where pretrained bases are kept (default ~/.cache/minilora)")
    p.add_argument("--no-cache", action="store_true", help="pretrain a fresh base and keep it in --out only")
    p.add_argument("--n-train", type=_positive, default=dc.n_train)
    p.add_argument("--n-val", type=_positive, default=dc.n_val)
    _model_args(p, dc)
    _run_args(p, dc)

    p = sub.add_parser("pretrain", help="train a BPE tokenizer and a GPT from scratch on the stdlib's English")
    p.add_argument("--out", required=True, help="directory for config.json, model.safetensors, tokenizer")
    p.add_argument("--steps", type=_positive, default=dc.pretrain_steps)
    p.add_argument("--batch-size", type=_positive, default=dc.pretrain_batch_size)
    p.add_argument("--lr", type=_above_zero, default=dc.pretrain_lr)
    _model_args(p, dc)
    _run_args(p, dc)

    p = sub.add_parser("finetune", help="fine-tune a base model on instruction data (full, LoRA or QLoRA)")
    p.add_argument("--base", required=True, help="base model directory (pretrain's --out, or a GPT-2 directory)")
    p.add_argument("--out", required=True, help="run directory: checkpoint/, adapter/ or model/, metrics.json")
    p.add_argument("--mode", choices=MODES, default=tc.mode)
    p.add_argument("--data", default=None, help="JSONL of instruction/context/output (default: the Yoda task)")
    p.add_argument("--n-train", type=_positive, default=dc.n_train)
    p.add_argument("--n-val", type=_positive, default=dc.n_val)
    p.add_argument("--steps", type=_positive, default=dc.steps)
    p.add_argument("--batch-size", type=_positive, default=dc.batch_size)
    p.add_argument("--grad-accum", type=_positive, default=tc.grad_accum)
    p.add_argument("--lr", type=_above_zero, default=None, help="default: %g full, %g LoRA/QLoRA" % (dc.lr_full, dc.lr_lora))
    p.add_argument("--warmup-steps", type=_count, default=10)
    _lora_args(p, dc)
    p.add_argument("--dropout", type=_fraction, default=tc.dropout, help="LoRA dropout")
    p.add_argument("--dora", action="store_true", help="DoRA: a trained magnitude per output beside the direction")
    p.add_argument("--init", choices=INITS, default=tc.init, help="how A and B start (loftq: --mode qlora)")
    p.add_argument("--loftq-iter", type=_positive, default=tc.loftq_iter, help="--init loftq: NF4 + SVD rounds")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="adamw (default), paged, adamw8bit, paged8bit")
    p.add_argument("--paged", action="store_true", help="the same as --optimizer paged")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model across the ranks (default: DDP)")
    p.add_argument("--eval-every", type=_count, default=0)
    p.add_argument("--save-every", type=_count, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:N or mps")
    _run_args(p, dc)

    p = sub.add_parser("generate", help="greedy (or sampled) answer of a model, optionally with an adapter")
    p.add_argument("--model", required=True, help="model directory (config.json + model.safetensors)")
    p.add_argument("--adapter", action="append", metavar="[NAME=]DIR", help="adapter directory (PEFT layout); "
                   "repeat as NAME=DIR to answer through several adapters in one mixed batch")
    p.add_argument("--qlora", action="store_true", help="quantize the base to NF4 before loading the adapter")
    p.add_argument("--instruction", default="Say it like Yoda.")
    p.add_argument("--context", default=None, help="context of the instruction prompt")
    p.add_argument("--prompt", default=None, help="raw text to continue instead of an instruction prompt")
    p.add_argument("--max-new-tokens", type=_positive, default=60)
    p.add_argument("--temperature", type=_at_least_zero, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=_count, default=0)

    p = sub.add_parser("memory", help="training-memory breakdown per mode (analytic; --measure runs one step)")
    p.add_argument("--model", default=None, help="take the shape from this model directory")
    _model_args(p, dc)
    p.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--batch-size", type=_positive, default=dc.batch_size)
    p.add_argument("--seq-len", type=_positive, default=None, help="default: block size")
    _lora_args(p, dc)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="adamw (default), paged, adamw8bit, paged8bit")
    p.add_argument("--paged", action="store_true", help="the same as --optimizer paged")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="weights, gradients and activations (AdamW state stays float32: the lecture's 12 B/param)")
    p.add_argument("--measure", action="store_true", help="also measure one real training step (small float32 models)")
    p.add_argument("--fsdp", type=_positive, default=1, help="bytes per process of N sharding the model (default 1)")
    p.add_argument("--cpu-offload", action="store_true", help="with --fsdp N: shards, grads, Adam state on the host")
    return parser


def cmd_demo(a) -> None:
    check_run_dir(a.out, "demo", a.overwrite)  # before any work: a file, or someone else's files, is refused
    cfg = DemoConfig(steps=a.steps, pretrain_steps=a.pretrain_steps, modes=tuple(a.modes), seed=a.seed,
                     out=a.out, cache="" if a.no_cache else a.cache, progress=not a.no_progress,
                     n_train=a.n_train, n_val=a.n_val, vocab_size=a.vocab_size, n_layer=a.n_layer,
                     n_head=a.n_head, n_embd=a.n_embd, block_size=a.block_size, overwrite=a.overwrite)
    print_report(run_demo(cfg))


def cmd_pretrain(a) -> None:
    check_run_dir(a.out, "pretrain", a.overwrite)  # before the tokenizer and the model are trained
    cfg = DemoConfig(vocab_size=a.vocab_size, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd,
                     block_size=a.block_size, pretrain_steps=a.steps, pretrain_batch_size=a.batch_size,
                     pretrain_lr=a.lr, seed=a.seed, progress=not a.no_progress)
    res = pretrain_base(cfg, a.out, overwrite=a.overwrite)
    print(f"pretrained {a.steps} steps in {res.seconds:.0f}s: validation loss {res.final['loss']:.3f} -> {a.out}")


def cmd_finetune(a) -> None:
    check_run_dir(a.out, "finetune", a.overwrite)  # before the model and the data are read
    dc = DemoConfig()
    lr = a.lr if a.lr is not None else (dc.lr_full if a.mode == "full" else dc.lr_lora)
    cfg = TrainConfig(mode=a.mode, r=a.r, alpha=a.alpha, dropout=a.dropout, targets=tuple(a.targets), lr=lr,
                      use_dora=a.dora, init=a.init, loftq_iter=a.loftq_iter, warmup_steps=a.warmup_steps, steps=a.steps,
                      batch_size=a.batch_size, grad_accum=a.grad_accum, seed=a.seed,
                      gradient_checkpointing=a.gradient_checkpointing, paged=a.paged, optimizer=a.optimizer or "adamw",
                      fsdp=a.fsdp, device=a.device, eval_every=a.eval_every, save_every=a.save_every, out_dir=a.out,
                      overwrite=a.overwrite, progress=not a.no_progress)
    data = load_jsonl(a.data) if a.data else None  # a bad file fails here, before the model is read
    examples = split_examples(data, 0.1, seed=a.seed) if data else yoda_dataset(a.n_train, a.n_val, seed=a.seed)
    base = GPT.from_pretrained(a.base)
    tok = load_tokenizer(a.base, vocab_size=base.config.vocab_size)
    train_set, val_set = (InstructionSet(ex, tok, base.config.block_size) for ex in examples)
    res = train(base, cfg, train_set, val_set, resume=a.resume)
    if not is_main():  # under torchrun, rank 0 alone reports (train wrote <out>/model with its tokenizer)
        return
    print(f"{a.mode}: {res.params}")
    print(f"step {len(res.losses)}: train loss {res.losses[-1]:.4f}, validation loss {res.final['loss']:.4f}, "
          f"exact match {100 * res.final['exact_match']:.1f}% -> {a.out}")


def cmd_generate(a) -> None:
    if a.prompt is not None and a.context is not None:
        raise ValueError("give either --prompt or --context, not both")
    adapters = named_adapter_dirs(a.adapter or [], qlora=a.qlora)  # several: NAME=DIR each, one mixed batch
    model = load_named_adapters(GPT.from_pretrained(a.model), adapters, qlora=a.qlora)
    tok = load_tokenizer(a.model, vocab_size=model.config.vocab_size)
    text = a.prompt if a.prompt is not None else prompt(a.instruction, a.context or "")
    if len(adapters) > 1:
        answers = generate_per_adapter(model, tok, text, list(adapters), a.max_new_tokens, a.temperature, a.seed)
        return print("\n".join(f"{name}: {answer}" for name, answer in answers.items()))
    print(generate_text(model, tok, text, a.max_new_tokens, temperature=a.temperature, seed=a.seed))


def cmd_memory(a) -> None:
    if a.measure and a.fsdp > 1:
        raise ValueError("--measure runs one process; measure FSDP under torchrun (see tests/test_fsdp.py)")
    cfg = GPT.from_pretrained(a.model).config if a.model else GPTConfig(
        block_size=a.block_size, vocab_size=a.vocab_size, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)
    seq, rows = a.seq_len or cfg.block_size, []
    opt = TrainConfig(optimizer=a.optimizer or "adamw", paged=a.paged).optimizer  # --paged alone: "paged"
    for mode in a.mode:
        rows.append(estimate(cfg, mode, batch_size=a.batch_size, seq_len=seq, r=a.r, targets=tuple(a.targets),
                             dtype=a.dtype, compute_dtype=a.dtype, state_dtype="float32", optimizer=opt,
                             checkpointing=a.gradient_checkpointing, fsdp=a.fsdp, cpu_offload=a.cpu_offload,
                             device="cpu", label=f"{mode} (estimate)"))
        if a.measure:
            rows.append(_measure(cfg, mode, a, seq))
    fsdp = f"; per process of {a.fsdp} (FSDP{', CPU offload' if a.cpu_offload else ''})" if a.fsdp > 1 else ""
    print(f"GPT: {cfg.n_layer} layers x {cfg.n_embd} wide, vocab {cfg.vocab_size}, {rows[0].n_params:,} parameters; "
          f"batch {a.batch_size} x {seq} tokens; {a.dtype} weights, optimizer {opt}"
          f"{', gradient checkpointing' if a.gradient_checkpointing else ''}{fsdp}")
    print(format_table(rows))


def _measure(cfg, mode: str, a, seq: int):
    if a.dtype != "float32":
        raise ValueError("--measure trains a float32 model; leave --dtype at float32 to measure")
    if (n_params := 12 * cfg.n_layer * cfg.n_embd ** 2) > 50_000_000:
        raise ValueError(f"--measure runs a real step; {n_params:,} parameters is too large for it here")
    tc = TrainConfig(mode=mode, r=a.r, targets=tuple(a.targets), gradient_checkpointing=a.gradient_checkpointing,
                     paged=a.paged, optimizer=a.optimizer or "adamw", batch_size=a.batch_size)
    torch.manual_seed(0)
    model = prepare_model(GPT(cfg), tc)
    x = torch.randint(cfg.vocab_size, (a.batch_size, seq))
    m = measure_step_memory(model, tc, (x, x))
    m.label = f"{mode} (measured)"
    return m


COMMANDS = {"demo": cmd_demo, "pretrain": cmd_pretrain, "finetune": cmd_finetune, "generate": cmd_generate,
            "memory": cmd_memory}


# Bad input as the library reports it (CheckpointError, RunDirError, JSON errors are ValueErrors); else a bug.
BAD_INPUT = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
             IsADirectoryError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except BAD_INPUT as e:
        msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
        print(f"error: {' '.join(msg.split())}", file=sys.stderr)  # one line, whatever the message holds
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
