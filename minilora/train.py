"""One trainer for full fine-tuning, LoRA and QLoRA (and for pretraining, which is full training on text).

    full    every weight trains:              W  <- W - lr · AdamW(∇W)
    lora    W0 frozen, adapters train:        W0 + (alpha/r) · B A,        add_lora(model, targets)
    qlora   W0 frozen in NF4, adapters train: deq(W0_nf4) + (alpha/r) · B A, quantize_model then add_lora
            (a target whose weight is tied to the embedding, the lm_head, keeps its weight in full precision)

The loop: draw batch_size · grad_accum examples, split them into grad_accum micro-batches, weight each
micro-batch's mean loss by its share of the target tokens (so accumulation equals one big batch), clip the
gradient norm, step AdamW (or paged AdamW) under a warmup + cosine learning rate. Evaluation reports the
validation loss over response tokens and the exact-match rate of greedy answers. With out_dir, the run
writes atomic checkpoints (minilora.train_state) and `train(..., resume=True)` continues from the last one,
bit for bit on the CPU.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapters import save_adapter
from .data import IGNORE, InstructionSet, TokenStream, Tokenizer, prompt
from .distributed import DataParallel, init_from_env
from .generate import respond  # noqa: F401  (minilora.train.respond, as before)
from .inject import add_lora, find_targets
from .params import ParamCount, count_parameters
from .train_state import fingerprint, load_train_state, save_train_state

MODES = ("full", "lora", "qlora")
# Settings that do not change the trajectory of a run; every other TrainConfig field must match on resume.
NOT_TRAJECTORY = ("eval_every", "eval_batch_size", "eval_max_batches", "save_every", "out_dir", "progress", "label")


@dataclass
class TrainConfig:
    mode: str = "lora"                    # "full" | "lora" | "qlora"
    r: int = 8                            # LoRA rank
    alpha: float = 16.0                   # LoRA scaling = alpha / r
    dropout: float = 0.0                  # dropout on the adapter input
    targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")  # every linear layer inside the blocks
    lr: float = 1e-3
    min_lr_ratio: float = 0.1             # cosine decays lr to lr · min_lr_ratio at the last step
    warmup_steps: int = 0                 # linear warmup from lr / warmup_steps
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0                # max global gradient norm (0: no clipping)
    steps: int = 100                      # optimizer steps
    batch_size: int = 16                  # examples per micro-batch
    grad_accum: int = 1                   # micro-batches per optimizer step
    gradient_checkpointing: bool = False  # recompute block activations in backward (minilora.checkpointing)
    paged: bool = False                   # PagedAdamW instead of torch.optim.AdamW
    page_size: int = 2**16                # paged AdamW: bytes per page
    device_budget: int | None = None      # paged AdamW: bytes of pages kept on the device (None: all)
    compute_dtype: str = "float32"        # qlora: dtype of the dequantized matmul and adapters
    blocksize: int = 64                   # qlora: NF4 block size
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 0                   # evaluate every n steps (0: only at the end)
    eval_batch_size: int = 64
    eval_max_batches: int | None = None
    save_every: int = 0                   # checkpoint every n steps (0: only at the end); needs out_dir
    out_dir: str | None = None
    progress: bool = True                 # tqdm bar with loss and tokens/s
    label: str | None = None              # the progress bar's name (default: mode)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets, self.betas = tuple(self.targets), tuple(self.betas)
        for name in ("r", "steps", "batch_size", "grad_accum", "page_size", "blocksize", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TrainConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.alpha <= 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("TrainConfig: alpha must be > 0, grad_clip and weight_decay >= 0")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"TrainConfig.compute_dtype must be float32, bfloat16 or float16, "
                             f"got {self.compute_dtype!r}")
        if self.save_every and not self.out_dir:
            raise ValueError("TrainConfig.save_every needs out_dir")

    def trajectory(self) -> dict:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        d = asdict(self)
        for k in NOT_TRAJECTORY:
            d.pop(k)
        return json.loads(json.dumps(d))  # tuples -> lists, as they come back from JSON


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

def quantize_available() -> bool:
    """True when minilora.qlora (NF4 base layers for QLoRA) can be imported."""
    try:
        from .qlora import quantize_model  # noqa: F401
    except ImportError:
        return False
    return True


def prepare_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Make model trainable the cfg.mode way (in place): full -> all weights; lora -> add_lora(targets);
    qlora -> quantize_model(targets) to NF4, then add_lora. Seeds torch first, so adapters start identical."""
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
        if not quantize_available():
            raise ValueError("mode='qlora' needs minilora.qlora.quantize_model, which this install lacks")
        from .qlora import quantize_model, untied_linears
        quantize_model(model, untied_linears(model, find_targets(model, cfg.targets)), blocksize=cfg.blocksize,
                       compute_dtype=getattr(torch, cfg.compute_dtype))
    return add_lora(model, list(cfg.targets), r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (PagedAdamW with cfg.paged)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    kw = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.paged:
        from .paged import PagedAdamW
        return PagedAdamW(params, page_size=cfg.page_size, device_budget=cfg.device_budget, **kw)
    return torch.optim.AdamW(params, **kw)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr down to lr · min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----- evaluation -----

def greedy_matches(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) bool: would greedy decoding reproduce each row's target tokens exactly?

    Greedy decoding emits argmax(logits) given the tokens so far. Fed the reference answer (teacher forcing),
    if argmax equals the reference at every target position (the end-of-text token included), greedy
    decoding writes the reference token by token and stops; at the first position where it differs, greedy
    decoding would have diverged there. So one forward pass decides exact match for a whole batch."""
    hit = (logits.argmax(dim=-1) == targets) | (targets == IGNORE)
    return hit.all(dim=1)


@torch.no_grad()
def evaluate(model: nn.Module, data: InstructionSet | TokenStream, batch_size: int = 64,
             max_batches: int | None = None, device: str | torch.device = "cpu") -> dict:
    """Mean cross-entropy over target tokens; for instruction data also exact_match (fraction of rows whose
    greedy answer equals the reference, see greedy_matches)."""
    was_training = model.training
    model.eval()
    loss_sum, n_tokens, hits, rows = 0.0, 0, 0, 0
    for x, y in data.batches(batch_size, max_batches):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE,
                                    reduction="sum").item()
        n_tokens += int((y != IGNORE).sum())
        hits += int(greedy_matches(logits, y).sum())
        rows += len(x)
    model.train(was_training)
    out = {"loss": loss_sum / max(1, n_tokens), "tokens": n_tokens}
    if isinstance(data, InstructionSet):
        out["exact_match"] = hits / max(1, rows)
    return out


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


def train(model: nn.Module, cfg: TrainConfig, train_data: InstructionSet | TokenStream,
          val_data: InstructionSet | TokenStream | None = None, resume: bool = False,
          measure_memory: bool = False, callback: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train model (a base model; prepare_model is applied here) for cfg.steps optimizer steps.

    resume=True restores the checkpoint in cfg.out_dir first (refusing a corrupt or mismatched one) and
    runs the remaining steps. callback(step, loss) is called after every optimizer step (and its checkpoint).
    At the end, with out_dir: a checkpoint, the adapter in PEFT layout (<out>/adapter) or the whole model
    (<out>/model, full mode), and <out>/metrics.json."""
    if resume and not cfg.out_dir:
        raise ValueError("resume=True needs TrainConfig.out_dir (where the checkpoint is)")
    init_from_env()  # under torchrun: join the process group (minilora.distributed); otherwise nothing
    model = prepare_model(model, cfg)
    optimizer = make_optimizer(model, cfg)
    par = DataParallel(model)  # one process: the model itself; several: DDP over the trainable parameters
    generator = torch.Generator().manual_seed(cfg.seed)
    frozen = fingerprint(model) if cfg.out_dir else ""
    run = cfg.trajectory()
    losses: list[float] = []
    evals: list[dict] = []
    tokens, seconds, start = 0, 0.0, 0
    if resume:
        state = load_train_state(cfg.out_dir, model=model, optimizer=optimizer, generator=generator, run=run,
                                 frozen_fingerprint=frozen)
        start = state["step"]
        h = state["history"]
        losses, evals, tokens, seconds = list(h["losses"]), list(h["evals"]), h["tokens"], h["seconds"]
    memory = None
    if measure_memory:
        batch = train_data.collate(_draw(train_data, cfg.batch_size, torch.Generator().manual_seed(cfg.seed)))
        memory = measure_step_memory(model, cfg, batch)

    def checkpoint(step: int) -> None:
        if not par.is_main:  # rank 0 alone writes
            return
        save_train_state(cfg.out_dir, model=model, optimizer=optimizer, generator=generator, step=step, run=run,
                         history=dict(losses=losses, evals=evals, tokens=tokens, seconds=seconds),
                         frozen_fingerprint=frozen)

    def run_eval(step: int) -> None:
        if val_data is not None and not any(e["step"] == step for e in evals):
            evals.append({"step": step, **evaluate(model, val_data, cfg.eval_batch_size, cfg.eval_max_batches,
                                                    cfg.device)})

    from tqdm import tqdm  # plain text bar: no widget library needed in notebooks
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and par.is_main),
               desc=cfg.label or cfg.mode, leave=False, dynamic_ncols=True)
    model.train()
    run_tokens, t_run = 0, time.perf_counter()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx = _draw(train_data, cfg.batch_size * cfg.grad_accum, generator)
        micro = [train_data.collate(par.shard(idx[i:i + cfg.batch_size]))  # this rank's part of each micro-batch
                 for i in range(0, len(idx), cfg.batch_size)]
        n_target = par.total(sum(int((y != IGNORE).sum()) for _, y in micro))  # over all ranks
        step_loss = 0.0
        for k, (x, y) in enumerate(micro):
            x, y = x.to(cfg.device), y.to(cfg.device)
            with par.sync(k == len(micro) - 1):  # ranks sum their gradients once, after the last micro-batch
                _, loss = par.model(x, y)
                share = int((y != IGNORE).sum()) / n_target  # token-weighted: accumulation == one big batch
                (loss * share).backward()
            step_loss += loss.item() * share
            run_tokens += x.numel()
        step_loss, step_tokens = par.total(step_loss, sum(x.numel() for x, _ in micro))
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        tokens += int(step_tokens)
        seconds += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{run_tokens / (time.perf_counter() - t_run):.0f}")
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            run_eval(done)
        if cfg.out_dir and cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            checkpoint(done)
        if callback is not None:
            callback(done, step_loss)
    bar.close()
    run_eval(cfg.steps)
    if cfg.out_dir and par.is_main:
        checkpoint(cfg.steps)
        out = Path(cfg.out_dir)
        if cfg.mode == "full" and hasattr(model, "save_pretrained"):
            model.save_pretrained(out / "model")
            if hasattr(train_data, "tokenizer"):  # so <out>/model is complete for generation
                train_data.tokenizer.save(out / "model")
        elif cfg.mode != "full":
            save_adapter(model, out / "adapter")
        tmp = out / "metrics.json.tmp"
        tmp.write_text(json.dumps({"config": asdict(cfg), "losses": losses, "evals": evals, "tokens": tokens,
                                   "seconds": seconds}, indent=1))
        os.replace(tmp, out / "metrics.json")
    par.barrier()  # every rank returns once rank 0 has written its files
    return TrainResult(model=model, config=cfg, losses=losses, evals=evals, params=count_parameters(model),
                       tokens=tokens, seconds=seconds, memory=memory, extra=par.report())


def config_from_dict(d: dict) -> TrainConfig:
    """A TrainConfig from a dict (e.g. metrics.json), ignoring unknown keys."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in names})
