"""Evaluation of a language model on instruction data: loss over the response tokens, and exact match.

    loss          mean cross-entropy over the target tokens (the response and its end-of-text token; the
                  prompt and padding positions carry IGNORE and do not count)
    exact_match   the fraction of examples whose greedy answer equals the reference, decided for a whole
                  batch in one forward pass (greedy_matches)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import IGNORE, InstructionSet, TokenStream


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
