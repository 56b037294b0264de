"""What training refuses before it starts: checked before any work and before the run directory exists.

train() runs check_plan first; the command line runs check_batch before it reads the data and check_plan once
the base model is loaded, so a refusal never leaves a run directory or a half-done step behind:

    check_batch   under torchrun, a micro-batch gives every process at least one example
    check_plan    + no inf / NaN in the base weights (a damaged checkpoint, named by tensor, not reported later
                  as a diverged run), every LoRA target exists and is at least r wide
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..inject import find_targets
from ..parallel import world_size
from ..train_config import TrainConfig


def check_batch(cfg: TrainConfig) -> None:
    """Under torchrun every process needs at least one example of each micro-batch."""
    if world_size() > 1 and cfg.batch_size < world_size():
        raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} (--batch-size) is smaller than the {world_size()} "
                         f"processes: every rank needs at least one example per micro-batch")


def check_plan(model: nn.Module, cfg: TrainConfig, source: str = "the model") -> None:
    """What training would refuse once under way, refused before any work and before the run directory exists:
    a batch that cannot give every process an example, weights that are already inf / NaN (named: a damaged
    checkpoint, not a learning rate), and LoRA targets that match nothing or are narrower than the rank r."""
    check_batch(cfg)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{source} holds inf/NaN weights: {name} has {bad} non-finite value(s) of {t.numel()}; "
                             f"the checkpoint is damaged, training cannot start from it")
    if cfg.mode == "full":
        return
    for name in find_targets(model, list(cfg.targets)):
        layer = model.get_submodule(name)
        width = min(getattr(layer, "in_features", cfg.r), getattr(layer, "out_features", cfg.r))
        if cfg.r > width:
            raise ValueError(f"r (LoRA rank) = {cfg.r} exceeds min(in_features, out_features) = {width} of the target "
                             f"{name!r}: the update would not be low-rank; choose r <= {width}")
