"""One trainer for full fine-tuning, LoRA and QLoRA (and for pretraining, which is full training on text).

    full    every weight trains:              W  <- W - lr · AdamW(∇W)
    lora    W0 frozen, adapters train:        W0 + (alpha/r) · B A,        add_lora(model, targets)
    qlora   W0 frozen in NF4, adapters train: deq(W0_nf4) + (alpha/r) · B A, add_qlora(model, targets)
            (a target whose weight is tied to the embedding, the lm_head, keeps its weight in full precision)

The loop: draw batch_size · grad_accum examples, split them into grad_accum micro-batches, weight each
micro-batch's mean loss by its share of the target tokens (so accumulation equals one big batch), clip the
gradient norm, step the optimizer (AdamW, paged or 8-bit: TrainConfig.optimizer) under a warmup + cosine
learning rate. Evaluation reports the validation loss over response tokens and the exact-match rate of greedy
answers. With out_dir, the run
writes atomic checkpoints (minilora.runs.train_state) and `train(..., resume=True)` continues from the last one,
bit for bit on the CPU.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .adapters import save_adapter
from .data import IGNORE, InstructionSet, TokenStream
from .parallel import SingleProcess, decide, init_from_env, is_main, replicas, world_size
from .evaluate import evaluate
from .runs.files import atomic_write_json
from .inject import add_lora
from .optim import AdamW8bit, PagedAdamW, PagedAdamW8bit
from .params import ParamCount, count_parameters
from .runs import RunDir, identity
from .train_config import TrainConfig
from .runs import RunCheckpoints, TrainingDiverged

@dataclass
class TrainResult:
    model: nn.Module
    config: TrainConfig
    losses: list[float]                   # training loss of every optimizer step
    evals: list[dict]                     # {"step", "loss", "exact_match"} per evaluation
    params: ParamCount
    tokens: int                           # tokens seen (inputs, padding included)
    seconds: float                        # wall time of the training steps (this process and resumed ones)
    memory: object | None = None          # minilora.memory.MemoryBreakdown of one measured step
    extra: dict = field(default_factory=dict)

    @property
    def final(self) -> dict:
        return self.evals[-1] if self.evals else {}


# ----- the model for each mode -----

def prepare_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Make model trainable the cfg.mode way (in place): full -> all weights; lora -> add_lora(targets);
    qlora -> add_qlora(targets): NF4 base, then adapters. Seeds torch first, so adapters start identical."""
    torch.manual_seed(cfg.seed)
    model.to(cfg.device)
    if hasattr(model, "config") and hasattr(model.config, "gradient_checkpointing"):
        model.config.gradient_checkpointing = cfg.gradient_checkpointing
    elif cfg.gradient_checkpointing:
        raise ValueError("gradient_checkpointing needs a minilora GPT (its config switches it on)")
    if cfg.mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.mode == "qlora":
        from .qlora import add_qlora
        return add_qlora(model, list(cfg.targets), r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                         blocksize=cfg.blocksize, compute_dtype=getattr(torch, cfg.compute_dtype),
                         use_dora=cfg.use_dora, init=cfg.init, loftq_iter=cfg.loftq_iter, bits=cfg.bits)
    return add_lora(model, list(cfg.targets), r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, use_dora=cfg.use_dora,
                    init=cfg.init)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """cfg.optimizer over the trainable parameters: torch.optim.AdamW, PagedAdamW, AdamW8bit or PagedAdamW8bit."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    kw = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer.startswith("paged"):
        kw.update(page_size=cfg.page_size, device_budget=cfg.device_budget)
    return {"adamw": torch.optim.AdamW, "paged": PagedAdamW, "adamw8bit": AdamW8bit,
            "paged8bit": PagedAdamW8bit}[cfg.optimizer](params, **kw)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr down to lr · min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def measure_step_memory(model: nn.Module, cfg: TrainConfig, batch: tuple[torch.Tensor, torch.Tensor]):
    """minilora.memory.measure of one training step on a copy of model, leaving model and RNG untouched."""
    from .memory import measure

    with torch.random.fork_rng(devices=[]):
        twin = copy.deepcopy(model)
        return measure(twin, make_optimizer(twin, cfg), tuple(t.to(cfg.device) for t in batch), label=cfg.mode)


# ----- the loop -----

def _draw(data: InstructionSet | TokenStream, n: int, generator: torch.Generator) -> list[int]:
    """n random example indices (window starts for a TokenStream)."""
    return torch.randint(len(data), (n,), generator=generator).tolist()


def _accumulate(rep: SingleProcess, micro: list[tuple[torch.Tensor, torch.Tensor]], device: str) -> tuple[float, float]:
    """Forward and backward of one step's micro-batches; each one's mean loss is weighted by its share of the
    step's target tokens, so accumulating equals one big batch. Returns (the step's loss, its input tokens)."""
    n_target = rep.total(sum(int((y != IGNORE).sum()) for _, y in micro))
    step_loss = 0.0
    for k, (x, y) in enumerate(micro):
        x, y = x.to(device), y.to(device)
        with rep.sync(k == len(micro) - 1):  # gradients are combined once, after the last micro-batch
            _, loss = rep.model(x, y)
            share = int((y != IGNORE).sum()) / n_target
            (loss * share).backward()
        step_loss += loss.item() * share
    return rep.total(step_loss, sum(x.numel() for x, _ in micro))


def _check_finite(what: str, value: float, step: int, cfg: TrainConfig) -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(f"training diverged at step {step}: the {what} is {value} (lr {lr_at(step - 1, cfg):g});"
                               f" stopped, the last checkpoint is kept. Lower the learning rate or add warmup")


def train(model: nn.Module, cfg: TrainConfig, train_data: InstructionSet | TokenStream,
          val_data: InstructionSet | TokenStream | None = None, resume: bool = False,
          measure_memory: bool = False, callback: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train model (a base model; prepare_model is applied here) for cfg.steps optimizer steps.

    With cfg.out_dir the run works in a locked run directory (minilora.runs; another's files refused unless
    cfg.overwrite) and checkpoints there; resume=True restores the last checkpoint first (refusing a corrupt
    one or another run's) and runs the remaining steps. callback(step, loss) is called after every step (and
    its checkpoint). A loss, gradient or weight that becomes inf / NaN raises TrainingDiverged. At the end:
    a checkpoint, <out>/adapter (PEFT layout) or <out>/model (full mode), and <out>/metrics.json. Under
    torchrun with cfg.fsdp the returned model is sharded (minilora.parallel.fsdp); the files hold whole tensors."""
    init_from_env()  # under torchrun: join the process group (minilora.parallel); otherwise nothing

    def open_run_dir() -> RunDir | None:  # rank 0 alone checks, creates and locks; the others take its verdict
        if resume and not cfg.out_dir:
            raise ValueError("resume=True needs TrainConfig.out_dir (where the checkpoint is)")
        if measure_memory and cfg.fsdp and world_size() > 1:  # it measures a step on a copy of the whole model
            raise ValueError("measure_memory: a sharded run is measured per rank by FullyShardedDataParallel.measure")
        if not (cfg.out_dir and is_main()):
            return None
        if resume and not Path(cfg.out_dir).is_dir():
            raise FileNotFoundError(f"no checkpoint to resume from: {cfg.out_dir} does not exist")
        return RunDir(cfg.out_dir, "finetune", cfg.overwrite, resume=resume)
    run_dir = decide(open_run_dir)
    if cfg.out_dir and run_dir is None:
        run_dir = RunDir(cfg.out_dir, "finetune", lock=False)
    with run_dir or nullcontext():
        return _train(model, cfg, train_data, val_data, resume, measure_memory, callback, run_dir)


def _train(model, cfg, train_data, val_data, resume, measure_memory, callback, run_dir: RunDir | None):
    model = prepare_model(model, cfg)
    ident = identity(model, train_data, val_data) if run_dir else {}  # of the whole model, before any sharding
    params = count_parameters(model)
    # one process: the model itself; several: DDP over the trainable parameters, or FSDP's shards of every tensor
    if cfg.fsdp:
        from .parallel.fsdp import FullyShardedDataParallel  # torch.distributed.fsdp: imported only when asked for
        rep = FullyShardedDataParallel(model)
    else:
        rep = replicas(model)
    optimizer = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    ckpt = RunCheckpoints(run_dir, model=model, optimizer=optimizer, generator=generator, run=cfg.trajectory(),
                          identity=ident, replica=rep)
    h = dict(losses=[], evals=[], tokens=0, seconds=0.0)  # the run's history, saved with every checkpoint
    start, h = ckpt.resume() if resume else (0, h)
    losses, evals = h["losses"], h["evals"]
    one_batch = lambda: train_data.collate(_draw(train_data, cfg.batch_size, torch.Generator().manual_seed(cfg.seed)))
    memory = measure_step_memory(model, cfg, one_batch()) if measure_memory else None
    trainable = [p for p in model.parameters() if p.requires_grad]

    def run_eval(step: int) -> None:
        if val_data is not None and not any(e["step"] == step for e in evals):
            evals.append({"step": step, **evaluate(model, val_data, cfg.eval_batch_size, cfg.eval_max_batches,
                                                    cfg.device)})

    from tqdm import tqdm  # plain text bar: no widget library needed in notebooks
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and rep.is_main),
               desc=cfg.label or cfg.mode, leave=False, dynamic_ncols=True)
    model.train()
    run_tokens, t_run = 0, time.perf_counter()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx = _draw(train_data, cfg.batch_size * cfg.grad_accum, generator)
        micro = [train_data.collate(rep.shard(idx[i:i + cfg.batch_size])) for i in range(0, len(idx), cfg.batch_size)]
        step_loss, step_tokens = _accumulate(rep, micro, cfg.device)
        _check_finite("loss", step_loss, step + 1, cfg)
        norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or math.inf)
        _check_finite("gradient norm", norm.item(), step + 1, cfg)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        h["tokens"] += int(step_tokens)
        run_tokens += int(step_tokens)
        h["seconds"] += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{run_tokens / (time.perf_counter() - t_run):.0f}")
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            run_eval(done)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            ckpt.save(done, h)
        if callback is not None:
            callback(done, step_loss)
    bar.close()
    run_eval(cfg.steps)
    ckpt.finish(cfg.steps, h, lambda staged: _write_results(staged, model, cfg, train_data, h))
    rep.barrier()  # every rank returns once rank 0 has written its files
    return TrainResult(model=model, config=cfg, losses=losses, evals=evals, params=params,
                       tokens=h["tokens"], seconds=h["seconds"], memory=memory, extra=rep.report())


def _write_results(staged: Path, model: nn.Module, cfg: TrainConfig, train_data, history: dict) -> None:
    """The adapter in PEFT layout (<out>/adapter) or the whole model (<out>/model, full mode), metrics.json."""
    if cfg.mode == "full" and hasattr(model, "save_pretrained"):
        model.save_pretrained(staged / "model")
        if hasattr(train_data, "tokenizer"):  # so <out>/model is complete for generation
            train_data.tokenizer.save(staged / "model")
    elif cfg.mode != "full":
        save_adapter(model, staged / "adapter")
    atomic_write_json(staged / "metrics.json", {"config": asdict(cfg), **history})
