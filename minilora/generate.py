"""Generation for instruction-tuned models: the prompt text in, the answer text out.

The model sees at most block_size tokens, so the prompt and the answer share them: an answer is at most
block_size − len(prompt) tokens long, and a prompt that leaves no room for one is an error, not an empty answer.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .data import Tokenizer, prompt


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer: Tokenizer, text: str, max_new_tokens: int,
                  temperature: float = 0.0, seed: int = 0) -> str:
    """The model's continuation of text, up to its end-of-text token: greedy (argmax) at temperature 0, else
    sampled from softmax(logits / temperature) with a generator seeded by seed."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:  # also refuses nan
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("the prompt is empty: nothing to continue")
    block = getattr(getattr(model, "config", None), "block_size", None)
    if block is not None:
        if len(ids) > block or (len(ids) == block and max_new_tokens > 0):
            raise ValueError(f"the prompt is {len(ids)} tokens; the model's block_size {block} leaves no room "
                             f"for an answer (shorten the prompt to under {block} tokens)")
        max_new_tokens = min(max_new_tokens, block - len(ids))
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, greedy=temperature == 0,
                         temperature=temperature or 1.0, eos_token_id=tokenizer.eos_id,
                         generator=generator)[0, len(ids):].tolist()
    if tokenizer.eos_id in out:
        out = out[:out.index(tokenizer.eos_id)]
    return tokenizer.decode(out)


def respond(model: nn.Module, tokenizer: Tokenizer, instruction: str, context: str = "",
            max_new_tokens: int = 80) -> str:
    """The model's greedy answer to one instruction (the text up to its end-of-text token)."""
    return generate_text(model, tokenizer, prompt(instruction, context), max_new_tokens)
