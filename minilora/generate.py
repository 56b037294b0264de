"""Generation for instruction-tuned models: the prompt text in, the answer text out.

The model sees at most block_size tokens, so the prompt and the answer share them: an answer is at most
block_size − len(prompt) tokens long, and a prompt that leaves no room for one is an error, not an empty answer.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .adapters import load_adapter
from .data import Tokenizer, prompt
from .qlora import load_qlora_adapter
from .multi.switch import adapter_batch


def generate_text(model: nn.Module, tokenizer: Tokenizer, text: str, max_new_tokens: int,
                  temperature: float = 0.0, seed: int = 0) -> str:
    """The model's continuation of text, up to its end-of-text token: greedy (argmax) at temperature 0, else
    sampled from softmax(logits / temperature) with a generator seeded by seed."""
    return _generate(model, tokenizer, text, max_new_tokens, temperature, seed, rows=1)[0]


def generate_per_adapter(model: nn.Module, tokenizer: Tokenizer, text: str, names: list[str], max_new_tokens: int,
                         temperature: float = 0.0, seed: int = 0) -> dict[str, str]:
    """adapter name -> the continuation of text through that adapter, all of them in one mixed batch (one base
    matmul per layer and step; "__base__": the base model)."""
    with adapter_batch(model, names):
        return dict(zip(names, _generate(model, tokenizer, text, max_new_tokens, temperature, seed, len(names))))


@torch.no_grad()
def _generate(model: nn.Module, tokenizer: Tokenizer, text: str, max_new_tokens: int, temperature: float,
              seed: int, rows: int) -> list[str]:
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
    out = model.generate(torch.tensor([ids] * rows, device=device), max_new_tokens, greedy=temperature == 0,
                         temperature=temperature or 1.0, eos_token_id=tokenizer.eos_id,
                         generator=generator)[:, len(ids):].tolist()
    return [tokenizer.decode(o[:o.index(tokenizer.eos_id)] if tokenizer.eos_id in o else o) for o in out]


def named_adapter_dirs(values: list[str], qlora: bool = False) -> dict[str, str]:
    """Adapter name -> directory from `DIR` (one adapter, named default) or `NAME=DIR` values (several)."""
    if qlora and not values:
        raise ValueError("--qlora needs --adapter")
    if len(values) == 1 and "=" not in values[0]:
        return {"default": values[0]}
    named = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path or name in named:
            raise ValueError(f"--adapter: with several adapters each must be NAME=DIR with its own NAME, got {v!r}")
        named[name] = path
    return named


def load_named_adapters(model: nn.Module, dirs: dict[str, str], qlora: bool = False) -> nn.Module:
    """Load each adapter under its name (qlora: the first one quantizes the base to NF4 as it was trained)."""
    for i, (name, path) in enumerate(dirs.items()):
        if qlora and i == 0:
            load_qlora_adapter(model, path, compute_dtype=torch.float32, adapter_name=name)
        else:
            load_adapter(model, path, adapter_name=name)
    return model


def respond(model: nn.Module, tokenizer: Tokenizer, instruction: str, context: str = "",
            max_new_tokens: int = 80) -> str:
    """The model's greedy answer to one instruction (the text up to its end-of-text token)."""
    return generate_text(model, tokenizer, prompt(instruction, context), max_new_tokens)
