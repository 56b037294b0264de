"""Token ids a model can embed: integers of shape (batch, time), each with a row in the embedding, [0, vocab_size).

GPT and Llama check their input with check_token_ids before the embedding lookup: an id out of range is a
device-side assert on CUDA and an IndexError far from its cause on the CPU; here it is a ValueError naming the
range given and the range allowed (one transfer of the min and max from the device).
"""
from __future__ import annotations

import torch


def check_token_ids(idx: torch.Tensor, vocab_size: int) -> None:
    """idx: integer token ids of shape (batch, time), each in [0, vocab_size) (an embedding row exists for it)."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
        raise ValueError(f"idx must have shape (batch, time), got {tuple(getattr(idx, 'shape', ()))}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"idx must hold integer token ids, got dtype {idx.dtype}")
    if idx.numel() and not idx.is_meta and not torch.compiler.is_compiling():
        lo, hi = torch.stack(idx.aminmax()).tolist()  # one transfer from the device
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"idx holds token ids in [{lo}, {hi}]; this model's vocab_size is {vocab_size}, "
                             f"so ids must be in [0, {vocab_size - 1}]")
