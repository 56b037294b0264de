"""Command line: python -m minilora {demo, pretrain, finetune, generate, memory}.

    python -m minilora demo                                    # the whole story in a few minutes on a CPU
    python -m minilora pretrain --out runs/base --steps 800
    python -m minilora finetune --base runs/base --mode lora --out runs/lora [--resume]
    torchrun --nproc_per_node 2 -m minilora finetune --base runs/base --out runs/lora   # data parallel
    python -m minilora generate --model runs/base --adapter runs/lora/adapter --context "You must learn patience."
    python -m minilora memory --mode full lora qlora --n-layer 32 --n-embd 4096 --seq-len 512
    python -m minilora memory --model-preset llama-2-70b --mode qlora --r 64 --dtype bfloat16 --fsdp 2

Bad input (an argument, a file, a directory) ends with one line `error: ...` and exit status 2, before any
work starts where it can be known then; a failure of the machine (a full disk, a lost rank) with one line
`error: ...` and exit status 1; only a bug shows a traceback. Under torchrun the ranks agree before any work
(minilora.parallel.decide), so a refusal is one line from one rank, and every command ends by shutting the
process group down (minilora.parallel.shutdown).
"""
from __future__ import annotations

import argparse
import errno
import re
import sys


from .data import InstructionSet, load_jsonl, load_tokenizer, prompt, split_examples, yoda_dataset
from .demos.finetune import DemoConfig, pretrain_base, print_report, run_demo
from .runs.cli_args import Parser, above_zero, at_least_zero, count, device, fraction, positive
from .parallel import AnotherRankFailed, DistributedError, decide, init_from_env, is_main, shutdown
from .generate import generate_per_adapter, generate_text, load_named_adapters, named_adapter_dirs
from . import from_pretrained, model_config
from .gpt import GPTConfig
from .hf.hub import resolve
from .memory.command import cmd_memory, default_targets
from .memory.llama import PRESETS
from .runs import check_run_dir, find_checkpoint, read_state
from .runs.preflight import check_batch, check_plan
from .train import TrainConfig, train
from .train_config import DEFAULT_TARGETS, INITS, LLAMA_TARGETS, MODES, OPTIMIZERS


def _model_args(p: argparse.ArgumentParser, d) -> None:
    p.add_argument("--n-layer", type=positive, default=d.n_layer)
    p.add_argument("--n-head", type=positive, default=d.n_head)
    p.add_argument("--n-embd", type=positive, default=d.n_embd)
    p.add_argument("--block-size", type=positive, default=d.block_size)
    p.add_argument("--vocab-size", type=positive, default=d.vocab_size, help="vocabulary size (a BPE needs >= 257)")


def _lora_args(p: argparse.ArgumentParser, d) -> None:
    p.add_argument("--r", "--lora-r", dest="r", type=positive, default=d.r, help="LoRA rank (--lora-r under torchrun)")
    p.add_argument("--alpha", type=above_zero, default=d.alpha, help="LoRA alpha (scaling = alpha / r)")
    p.add_argument("--targets", nargs="+", default=None,
                   help="module name patterns for LoRA (default: every linear layer inside the blocks: "
                        f"{' '.join(DEFAULT_TARGETS)} for a GPT, {' '.join(LLAMA_TARGETS)} for a Llama)")


def _run_args(p: argparse.ArgumentParser, d) -> None:
    p.add_argument("--seed", type=count, default=d.seed)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --out even if it holds other files (nothing of theirs is deleted)")


def build_parser() -> argparse.ArgumentParser:
    dc, tc = DemoConfig(), TrainConfig()
    parser = Parser(prog="python -m minilora", description="minilora: LoRA and QLoRA by hand")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="pretrain (or reuse) a small GPT, fine-tune it full / LoRA / QLoRA, report")
    p.add_argument("--out", default=dc.out, help="run directory (default %(default)s)")
    p.add_argument("--steps", type=positive, default=dc.steps, help="fine-tuning steps per mode")
    p.add_argument("--pretrain-steps", type=positive, default=dc.pretrain_steps)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(dc.modes))
    p.add_argument("--cache", default=None, help="where pretrained bases are kept (default ~/.cache/minilora)")
    p.add_argument("--no-cache", action="store_true", help="pretrain a fresh base and keep it in --out only")
    p.add_argument("--n-train", type=positive, default=dc.n_train)
    p.add_argument("--n-val", type=positive, default=dc.n_val)
    _model_args(p, dc)
    _run_args(p, dc)

    p = sub.add_parser("pretrain", help="train a BPE tokenizer and a GPT from scratch on the stdlib's English")
    p.add_argument("--out", required=True, help="directory for config.json, model.safetensors, tokenizer")
    p.add_argument("--steps", type=positive, default=dc.pretrain_steps)
    p.add_argument("--batch-size", type=positive, default=dc.pretrain_batch_size)
    p.add_argument("--lr", type=above_zero, default=dc.pretrain_lr)
    _model_args(p, dc)
    _run_args(p, dc)

    p = sub.add_parser("finetune", help="fine-tune a base model on instruction data (full, LoRA or QLoRA)")
    p.add_argument("--base", required=True, help="base model directory (pretrain's --out, a GPT-2 or Llama-family "
                                                 "transformers directory) or a Hugging Face model id")
    p.add_argument("--out", required=True, help="run directory: checkpoint/, adapter/ or model/, metrics.json")
    p.add_argument("--mode", choices=MODES, default=tc.mode)
    p.add_argument("--data", default=None, help="JSONL of instruction/context/output (default: the Yoda task)")
    p.add_argument("--n-train", type=positive, default=None, help=f"training examples (default {dc.n_train}; with "
                   "--data: every example not held out)")
    p.add_argument("--n-val", type=positive, default=None, help=f"validation examples (default {dc.n_val}; with "
                   "--data: 10%% of the file), held out before --n-train are taken")
    p.add_argument("--steps", type=positive, default=dc.steps)
    p.add_argument("--batch-size", type=positive, default=dc.batch_size)
    p.add_argument("--grad-accum", type=positive, default=tc.grad_accum)
    p.add_argument("--lr", type=above_zero, default=None, help="default: %g full, %g LoRA/QLoRA" % (dc.lr_full, dc.lr_lora))
    p.add_argument("--warmup-steps", type=count, default=10)
    _lora_args(p, dc)
    p.add_argument("--dropout", type=fraction, default=tc.dropout, help="LoRA dropout")
    p.add_argument("--dora", action="store_true", help="DoRA: a trained magnitude per output beside the direction")
    p.add_argument("--init", choices=INITS, default=tc.init, help="how A and B start (loftq: --mode qlora)")
    p.add_argument("--loftq-iter", type=positive, default=tc.loftq_iter, help="--init loftq: NF4 + SVD rounds")
    p.add_argument("--bits", type=int, choices=(4, 2), default=tc.bits, help="--mode qlora: the base in NF4 or NF2")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="adamw (default), paged, adamw8bit, paged8bit")
    p.add_argument("--paged", action="store_true", help="the same as --optimizer paged")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model across the ranks (default: DDP)")
    p.add_argument("--eval-every", type=count, default=0)
    p.add_argument("--save-every", type=count, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:N or mps")
    _run_args(p, dc)

    p = sub.add_parser("generate", help="greedy (or sampled) answer of a model, optionally with an adapter")
    p.add_argument("--model", required=True, help="model directory (config.json + safetensors; GPT-2 or Llama "
                                                  "family) or a Hugging Face model id")
    p.add_argument("--adapter", action="append", metavar="[NAME=]DIR", help="adapter directory (PEFT layout); "
                   "repeat as NAME=DIR to answer through several adapters in one mixed batch")
    p.add_argument("--qlora", action="store_true", help="quantize the base to NF4 before loading the adapter "
                   "(NF2 when the adapter was made on a 2-bit base)")
    p.add_argument("--instruction", default="Say it like Yoda.")
    p.add_argument("--context", default=None, help="context of the instruction prompt")
    p.add_argument("--prompt", default=None, help="raw text to continue instead of an instruction prompt")
    p.add_argument("--max-new-tokens", type=positive, default=60)
    p.add_argument("--temperature", type=at_least_zero, default=0.0, help="0: greedy")
    p.add_argument("--seed", type=count, default=0)

    p = sub.add_parser("memory", help="training-memory breakdown per mode (analytic; --measure runs one step)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--model", "--config", dest="model", default=None,
                       help="take the shape from this directory's config.json (GPT-2 or Llama family; no weights read)")
    shape.add_argument("--model-preset", choices=sorted(PRESETS), default=None,
                       help="a released Llama's shape (exact parameter count)")
    _model_args(p, dc)
    p.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--batch-size", type=positive, default=dc.batch_size)
    p.add_argument("--seq-len", type=positive, default=None, help="default: block size")
    _lora_args(p, dc)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="adamw (default), paged, adamw8bit, paged8bit")
    p.add_argument("--paged", action="store_true", help="the same as --optimizer paged")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="weights, gradients and activations (AdamW state stays float32: the lecture's 12 B/param)")
    p.add_argument("--measure", action="store_true", help="also measure one real training step (small float32 models)")
    p.add_argument("--fsdp", type=positive, default=1, help="bytes per process of N sharding the model (default 1)")
    p.add_argument("--cpu-offload", action="store_true", help="with --fsdp N: shards, grads, Adam state on the host")
    return parser


def cmd_demo(a) -> None:
    _check_model_args(a)
    check_run_dir(a.out, "demo", a.overwrite)  # before any work: a file, or someone else's files, is refused
    cfg = DemoConfig(steps=a.steps, pretrain_steps=a.pretrain_steps, modes=tuple(a.modes), seed=a.seed,
                     out=a.out, cache="" if a.no_cache else a.cache, progress=not a.no_progress,
                     n_train=a.n_train, n_val=a.n_val, vocab_size=a.vocab_size, n_layer=a.n_layer,
                     n_head=a.n_head, n_embd=a.n_embd, block_size=a.block_size, overwrite=a.overwrite)
    print_report(run_demo(cfg))


def _check_model_args(a) -> None:
    """The GPT's shape and the learning rate, checked before the tokenizer and the model are trained."""
    if a.vocab_size < 257:
        raise ValueError(f"vocab_size (--vocab-size) must be >= 257 for a BPE (256 bytes + end-of-text), "
                         f"got {a.vocab_size}")
    GPTConfig(block_size=a.block_size, vocab_size=a.vocab_size, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)
    if getattr(a, "lr", None) is not None:
        TrainConfig(mode="full", lr=a.lr, steps=a.steps, batch_size=a.batch_size)


def cmd_pretrain(a) -> None:
    _check_model_args(a)
    check_run_dir(a.out, "pretrain", a.overwrite)  # before the tokenizer and the model are trained
    cfg = DemoConfig(vocab_size=a.vocab_size, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd,
                     block_size=a.block_size, pretrain_steps=a.steps, pretrain_batch_size=a.batch_size,
                     pretrain_lr=a.lr, seed=a.seed, progress=not a.no_progress)
    res = pretrain_base(cfg, a.out, overwrite=a.overwrite)
    print(f"pretrained {a.steps} steps in {res.seconds:.0f}s: validation loss {res.final['loss']:.3f} -> {a.out}")


def cmd_finetune(a) -> None:
    init_from_env()  # under torchrun: join the process group first, so the ranks agree on any refusal below
    dc = DemoConfig()
    lr = a.lr if a.lr is not None else (dc.lr_full if a.mode == "full" else dc.lr_lora)

    def prepare():  # everything that can refuse, before any work and before the run directory exists
        if is_main():  # one process looks at the run directory (another rank may be about to create it)
            check_run_dir(a.out, "finetune", a.overwrite, a.resume)
        base_dir = resolve(a.base, "finetune")
        cfg = TrainConfig(mode=a.mode, r=a.r, alpha=a.alpha, dropout=a.dropout, use_dora=a.dora, init=a.init,
                          loftq_iter=a.loftq_iter, bits=a.bits, lr=lr,
                          targets=default_targets(a.targets, model_config(base_dir, "finetune")),
                          warmup_steps=a.warmup_steps, steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum,
                          gradient_checkpointing=a.gradient_checkpointing, paged=a.paged, seed=a.seed,
                          optimizer=a.optimizer or "adamw", fsdp=a.fsdp, device=a.device, eval_every=a.eval_every,
                          save_every=a.save_every, out_dir=a.out, overwrite=a.overwrite, progress=not a.no_progress)
        check_batch(cfg)  # under torchrun: an example for every rank
        data = load_jsonl(a.data) if a.data else None  # a bad file fails here, before the model is read
        examples = split_examples(data, 0.1, seed=a.seed, n_train=a.n_train, n_val=a.n_val) if data else \
            yoda_dataset(a.n_train or dc.n_train, a.n_val or dc.n_val, seed=a.seed)
        base = from_pretrained(base_dir)
        check_plan(base, cfg, f"the base model {base_dir}")  # finite weights; --targets and --r fit its layers
        tok = load_tokenizer(base_dir, vocab_size=base.config.vocab_size)
        return cfg, base, [InstructionSet(ex, tok, base.config.block_size) for ex in examples]
    cfg, base, (train_set, val_set) = decide(prepare)
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
    model_dir = resolve(a.model, "generate")
    model = load_named_adapters(from_pretrained(model_dir), adapters, qlora=a.qlora)
    tok = load_tokenizer(model_dir, vocab_size=model.config.vocab_size)
    text = a.prompt if a.prompt is not None else prompt(a.instruction, a.context or "")
    if len(adapters) > 1:
        answers = generate_per_adapter(model, tok, text, list(adapters), a.max_new_tokens, a.temperature, a.seed)
        return print("\n".join(f"{name}: {answer}" for name, answer in answers.items()))
    print(generate_text(model, tok, text, a.max_new_tokens, temperature=a.temperature, seed=a.seed))


COMMANDS = {"demo": cmd_demo, "pretrain": cmd_pretrain, "finetune": cmd_finetune, "generate": cmd_generate,
            "memory": cmd_memory}


# Bad input as the library reports it (CheckpointError, RunDirError, JSON errors are ValueErrors); else a bug.
BAD_INPUT = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
             IsADirectoryError, PermissionError)


def _error(msg: str, args=None) -> None:
    """One line `error: msg`; a setting the library names as TrainConfig.x / DemoConfig.x is named by its flag
    --x where this command has one (args: the parsed arguments)."""
    def flag(m):
        name = f"--{m[1].replace('_', '-')}"
        return name if hasattr(args, m[1]) and name not in msg else m[0]  # (a message may name it already)
    if args is not None:
        msg = re.sub(r"\b(?:TrainConfig|DemoConfig)\.(\w+)", flag, msg)
    print(f"error: {' '.join(msg.split())}", file=sys.stderr)  # one line, whatever the message holds


def _interrupted(args) -> str:
    """What Ctrl-C leaves: for a fine-tune, the checkpoint a rerun with --resume continues from."""
    try:
        path = find_checkpoint(args.out) if args.command == "finetune" else None
        step = read_state(path)["step"] if path else None
    except (OSError, ValueError):
        step = None
    if step is None:
        return "interrupted"
    return f"interrupted: the checkpoint at step {step} in {args.out} is kept; rerun with --resume to continue from it"


def _run(args) -> int:
    try:
        COMMANDS[args.command](args)
    except AnotherRankFailed:  # a lower rank refused the same input and says so: one line from one rank
        return 2
    except BAD_INPUT as e:
        _error(str(e.args[0] if isinstance(e, KeyError) and e.args else e), args)
        return 2
    except DistributedError as e:
        _error(str(e))
        return 1
    except OSError as e:  # the machine, not the input: a full disk, an I/O error
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        _error(f"{e.strerror or e}{f' writing {e.filename}' if e.filename else ''}"
               + ("; nothing was replaced by a partial file (a checkpoint already written is kept): free some space "
                  "and rerun, with --resume to continue a fine-tune" if full else ""))
        return 1
    except KeyboardInterrupt:
        print(_interrupted(args), file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status = 1
    try:
        status = _run(args)
    finally:  # under torchrun: the process group and its threads end here, while Python is whole
        shutdown(finished=status == 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
