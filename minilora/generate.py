"""Greedy generation for instruction-tuned models: the prompt in, the answer text out."""
from __future__ import annotations

import torch
import torch.nn as nn

from .data import Tokenizer, prompt


@torch.no_grad()
def respond(model: nn.Module, tokenizer: Tokenizer, instruction: str, context: str = "",
            max_new_tokens: int = 80) -> str:
    """The model's greedy answer to one instruction (the text up to its end-of-text token)."""
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt(instruction, context))
    block = getattr(getattr(model, "config", None), "block_size", None)
    if block is not None:
        max_new_tokens = max(0, min(max_new_tokens, block - len(ids)))
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, greedy=True,
                         eos_token_id=tokenizer.eos_id)[0, len(ids):].tolist()
    if tokenizer.eos_id in out:
        out = out[:out.index(tokenizer.eos_id)]
    return tokenizer.decode(out)
