"""The end-to-end demo: pretrain a small GPT on English, fine-tune it to speak like Yoda three ways.

    1. base model   a small GPT-2-shaped model with a byte-level BPE trained on the stdlib's English
                    (cached under ~/.cache/minilora after the first run; MINILORA_CACHE moves it)
    2. task         instruction/context/output examples: rewrite a sentence in Yoda's word order
    3. fine-tune    full, LoRA and QLoRA with one trainer, same data, same steps
    4. report       one table: trainable parameters, measured memory of one training step, validation
                    loss, exact match of greedy answers on held-out sentences, time; answers before and
                    after; a PNG of the loss curves

`python -m minilora demo` runs it; every number it prints is measured in that run.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..data import (BPETokenizer, InstructionSet, TokenStream, english_documents, load_tokenizer, save_jsonl,
                   split_documents, yoda_dataset)
from ..runs.files import atomic_write, atomic_write_json
from ..gpt import GPT, GPTConfig
from ..train_config import MODES
from ..runs import RunDir, RunLockedError
from ..evaluate import evaluate
from ..generate import respond
from ..train import TrainConfig, TrainResult, train


@dataclass
class DemoConfig:
    # base model and its pretraining
    vocab_size: int = 1024         # byte-level BPE: 256 bytes + merges + end-of-text
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 96
    pretrain_steps: int = 800
    pretrain_batch_size: int = 16
    pretrain_lr: float = 2e-3
    # the instruction task and fine-tuning
    n_train: int = 2000
    n_val: int = 200
    steps: int = 400
    batch_size: int = 16
    lr_full: float = 1e-3
    lr_lora: float = 5e-3
    r: int = 8
    alpha: float = 32.0
    # every linear layer, the output projection (lm_head) included: without it, LoRA on this small base
    # learns the new word order far more slowly than full fine-tuning (the lm_head adapter is 9,216 params)
    targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc", "lm_head")
    modes: tuple[str, ...] = MODES
    seed: int = 0
    out: str = "runs/demo"
    overwrite: bool = False        # out may be a non-empty directory that is not a demo run (nothing is deleted)
    cache: str | None = None       # None: $MINILORA_CACHE or ~/.cache/minilora; "" : no cache
    progress: bool = True
    n_show: int = 2                # validation examples shown before / after

    def __post_init__(self):
        self.modes, self.targets = tuple(self.modes), tuple(self.targets)
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes must be a non-empty subset of {MODES}, got {self.modes!r}")
        for name in ("pretrain_steps", "steps", "n_train", "n_val", "batch_size", "pretrain_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DemoConfig.{name} must be an int >= 1, got {v!r}")


def cache_dir(cfg: DemoConfig) -> Path | None:
    if cfg.cache == "":
        return None
    return Path(cfg.cache or os.environ.get("MINILORA_CACHE") or Path.home() / ".cache" / "minilora")


def base_key(cfg: DemoConfig) -> str:
    """Hash of everything the base model depends on: its shape, its pretraining, the Python whose stdlib
    text it read."""
    fields = {k: getattr(cfg, k) for k in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size",
                                             "pretrain_steps", "pretrain_batch_size", "pretrain_lr", "seed")}
    fields["python"] = platform.python_version()
    fields["format"] = 1
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def pretrain_base(cfg: DemoConfig, out: str | os.PathLike, log=print, overwrite: bool = False) -> TrainResult:
    """Train a BPE tokenizer and a GPT from scratch on the stdlib English corpus; save both into the run
    directory `out` (minilora.runs: checked and locked before any work; a non-empty directory that is not a
    pretrain run is refused unless overwrite, and even then nothing else in it is touched)."""
    with RunDir(out, "pretrain", overwrite) as run_dir:
        return _pretrain_into(cfg, run_dir, log)


def _pretrain_into(cfg: DemoConfig, run_dir: RunDir, log) -> TrainResult:
    t0 = time.perf_counter()
    docs = english_documents()
    train_text, val_text = split_documents(docs)
    tok = BPETokenizer.train(train_text, cfg.vocab_size)
    train_ids, val_ids = tok.encode(train_text), tok.encode(val_text)
    log(f"corpus: {len(docs)} documents, {len(train_text) + len(val_text):,} characters of stdlib English "
        f"-> {len(train_ids) + len(val_ids):,} BPE tokens (vocab {tok.vocab_size}) "
        f"[{time.perf_counter() - t0:.1f}s]")
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=tok.vocab_size, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_embd=cfg.n_embd))
    tc = TrainConfig(mode="full", lr=cfg.pretrain_lr, betas=(0.9, 0.95), warmup_steps=20,
                     steps=cfg.pretrain_steps, batch_size=cfg.pretrain_batch_size, seed=cfg.seed,
                     eval_max_batches=20, progress=cfg.progress, label="pretrain")
    res = train(model, tc, TokenStream(train_ids, cfg.block_size), TokenStream(val_ids, cfg.block_size))
    with run_dir.results(last=("pretrain.json",)) as staged:  # each file renamed into place, pretrain.json last
        res.model.save_pretrained(staged)
        tok.save(staged)
        atomic_write_json(staged / "pretrain.json", {"config": asdict(cfg), "losses": res.losses,
                                                     "evals": res.evals, "seconds": res.seconds})
    return res


def _complete(base: Path) -> bool:
    return (base / "model.safetensors").is_file() and (base / "pretrain.json").is_file()


def get_base(cfg: DemoConfig, log=print) -> tuple[Path, bool]:
    """(directory of the base model, whether it came from the cache). Several processes may ask at once:
    the first pretrains, the others wait for it and take its result."""
    root = cache_dir(cfg)
    target = (root if root else Path(cfg.out)) / f"base-{base_key(cfg)}"
    if root and _complete(target):
        return target, True
    try:  # minilora's own directory (named by base_key): overwrite, so a half-written one is finished
        run_dir = RunDir(target, "pretrain", overwrite=True)
    except RunLockedError as e:
        log(f"{e}: waiting for it")
        run_dir = RunDir(target, "pretrain", overwrite=True, wait=True)
    with run_dir:
        if root and _complete(target):
            return target, True
        log(f"pretraining the base model ({cfg.pretrain_steps} steps) -> {target}")
        _pretrain_into(cfg, run_dir, log)
    return target, False


def _row(mode: str, res: TrainResult | None, base_eval: dict | None = None, reason: str = "") -> dict:
    if res is None:
        return {"mode": mode, "skipped": reason, **({"eval": base_eval} if base_eval else {})}
    m = res.memory
    return {"mode": mode, "trainable": res.params.trainable, "total": res.params.total,
            "weights": m.weights + m.quantized_weights + m.adapters,
            "gradients": m.gradients + m.adapter_gradients,
            "optimizer": m.optimizer_state + m.adapter_optimizer_state,
            "activations": m.activations, "memory_total": m.total,
            "eval": res.final, "seconds": res.seconds}


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def format_table(rows: list[dict]) -> str:
    """The demo's one table (a skipped row says why)."""
    head = ["mode", "trainable params", "weights", "grads", "optimizer", "activations", "total",
            "val loss", "exact match", "time"]
    lines = []
    for r in rows:
        ev = r.get("eval") or {}
        em = f"{100 * ev['exact_match']:.1f}%" if "exact_match" in ev else "-"
        loss = f"{ev['loss']:.3f}" if "loss" in ev else "-"
        if r.get("skipped") is not None and "trainable" not in r:
            lines.append([r["mode"], "-", "-", "-", "-", "-", "-", loss, em, r["skipped"]])
            continue
        pct = 100 * r["trainable"] / r["total"]
        lines.append([r["mode"], f"{r['trainable']:,} ({pct:.1f}%)", _mb(r["weights"]), _mb(r["gradients"]),
                      _mb(r["optimizer"]), _mb(r["activations"]), _mb(r["memory_total"]), loss, em,
                      f"{r['seconds']:.1f}s" if r["seconds"] < 10 else f"{r['seconds']:.0f}s"])
    widths = [max(len(head[i]), *(len(l[i]) for l in lines if i < len(l))) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [fmt(head), fmt(["-" * w for w in widths])]
    for l in lines:
        out.append(fmt(l) if len(l) == len(head) else fmt(l[:-1] + [""]) + "  " + l[-1])
    return "\n".join(out)


def run_demo(cfg: DemoConfig | None = None, log=print) -> dict:
    """Run the whole demo; returns {"rows", "answers", "png", "seconds", ...} and prints as it goes."""
    cfg = cfg or DemoConfig()
    with RunDir(cfg.out, "demo", cfg.overwrite) as run_dir:  # checked and locked before any work
        return _run_demo(cfg, run_dir.path, log)


def _run_demo(cfg: DemoConfig, out: Path, log) -> dict:
    t0 = time.perf_counter()
    base_dir, cached = get_base(replace(cfg, out=str(out)), log)
    tok = load_tokenizer(base_dir)
    base = GPT.from_pretrained(base_dir)
    log(f"base model: {base_dir}{' (cached)' if cached else ''}; {sum(p.numel() for p in base.parameters()):,} "
        f"parameters, {cfg.n_layer} layers x {cfg.n_embd} wide, {tok!r}")

    train_ex, val_ex = yoda_dataset(cfg.n_train, cfg.n_val, seed=cfg.seed)
    save_jsonl(train_ex, out / "yoda_train.jsonl")
    save_jsonl(val_ex, out / "yoda_val.jsonl")
    train_set = InstructionSet(train_ex, tok, cfg.block_size)
    val_set = InstructionSet(val_ex, tok, cfg.block_size)
    log(f"task: {len(train_ex)} training / {len(val_ex)} held-out examples "
        f"(instruction, context, output) -> {out / 'yoda_train.jsonl'}")
    shown = val_ex[:cfg.n_show]
    answers = {"context": [e.context for e in shown], "reference": [e.output for e in shown],
               "base": [respond(base, tok, e.instruction, e.context) for e in shown]}
    rows = [_row("base", None, evaluate(base, val_set), reason="no fine-tuning")]

    results: dict[str, TrainResult] = {}
    for mode in cfg.modes:
        log(f"fine-tuning: {mode} ({cfg.steps} steps)")
        tc = TrainConfig(mode=mode, r=cfg.r, alpha=cfg.alpha, targets=cfg.targets, steps=cfg.steps,
                         lr=cfg.lr_full if mode == "full" else cfg.lr_lora, warmup_steps=10,
                         batch_size=cfg.batch_size, seed=cfg.seed, out_dir=str(out / mode), progress=cfg.progress,
                         eval_every=max(1, cfg.steps // 4))
        res = train(GPT.from_pretrained(base_dir), tc, train_set, val_set, measure_memory=True)
        results[mode] = res
        rows.append(_row(mode, res))
        answers[mode] = [respond(res.model, tok, e.instruction, e.context) for e in shown]

    png = None
    if results:
        from ..plots.training import plot_loss_curves
        fig = plot_loss_curves({m: r.losses for m, r in results.items()}, {m: r.evals for m, r in results.items()},
                               title="Yoda fine-tuning: training and validation loss")
        png = atomic_write(out / "loss_curves.png", lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        import matplotlib.pyplot as plt
        plt.close(fig)
    summary = {"rows": rows, "answers": answers, "png": str(png) if png else None, "base_dir": str(base_dir),
               "base_cached": cached, "seconds": time.perf_counter() - t0, "config": asdict(cfg)}
    atomic_write_json(out / "summary.json", summary)
    return summary


def print_report(summary: dict, log=print) -> None:
    """The table, the answers before and after, where the PNG went, the total time."""
    log("")
    log(format_table(summary["rows"]))
    log("memory: bytes held in one measured training step (minilora.memory.measure: weights incl. NF4 storage "
        "and adapters, gradients, optimizer state, saved activations)")
    log("exact match: greedy answers equal to the reference, on held-out sentences")
    ans = summary["answers"]
    for i, context in enumerate(ans["context"]):
        log("")
        log(f"{'context:':<11}{context}")
        log(f"{'reference:':<11}{ans['reference'][i]}")
        for k, v in ans.items():
            if k not in ("context", "reference"):
                text = v[i].replace("\n", " / ")
                log(f"{k + ':':<11}{text[:100]}{'...' if len(text) > 100 else ''}")
    if summary["png"]:
        log(f"\nloss curves: {summary['png']}")
    log(f"total time: {summary['seconds']:.0f}s")
