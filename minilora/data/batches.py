"""Batches for training: random windows of a token stream (pretraining) and padded instruction examples.

Both draw their random choices from a torch.Generator the trainer owns, so a resumed run, given the saved
generator state, draws exactly the batches the uninterrupted run would have drawn.

Instruction example -> (x, y):   tokens = prompt + output + [eos]
    x = tokens[:-1]
    y = tokens[1:], with the prompt positions set to -100 (IGNORE): the loss covers only the response.
"""
from __future__ import annotations

import torch

from .instructions import Example, prompt
from .tokenizer import Tokenizer

IGNORE = -100  # targets F.cross_entropy skips


class TokenStream:
    """Random (block_size + 1)-token windows of one long token sequence: x = w[:-1], y = w[1:]."""

    def __init__(self, tokens: torch.Tensor | list[int], block_size: int):
        self.tokens = torch.as_tensor(tokens, dtype=torch.long)
        if self.tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(self.tokens.shape)}")
        if len(self.tokens) <= block_size:
            raise ValueError(f"need more than block_size={block_size} tokens, got {len(self.tokens)}")
        self.block_size = block_size

    def __len__(self) -> int:
        """Number of window start positions."""
        return len(self.tokens) - self.block_size

    def collate(self, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.stack([self.tokens[s:s + self.block_size + 1] for s in starts])  # (B, T+1)
        return w[:, :-1], w[:, 1:]

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.collate(torch.randint(len(self), (batch_size,), generator=generator).tolist())

    def batches(self, batch_size: int, max_batches: int | None = None):
        """Consecutive non-overlapping windows, in order (for a deterministic validation loss)."""
        T, n = self.block_size, (len(self.tokens) - 1) // self.block_size
        starts = list(range(0, n * T, T))
        for b, i in enumerate(range(0, len(starts), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self.collate(starts[i:i + batch_size])


def encode_example(tok: Tokenizer, ex: Example) -> tuple[list[int], int]:
    """(prompt + output + [eos] token ids, number of prompt tokens)."""
    p = tok.encode(prompt(ex.instruction, ex.context))
    return p + tok.encode(ex.output) + [tok.eos_id], len(p)


class InstructionSet:
    """Instruction examples as (x, y) pairs with the loss masked to the response, padded per batch."""

    def __init__(self, examples: list[Example], tokenizer: Tokenizer, block_size: int):
        if not examples:
            raise ValueError("examples must not be empty")
        self.examples, self.tokenizer, self.block_size = list(examples), tokenizer, block_size
        self.encoded = [encode_example(tokenizer, e) for e in self.examples]
        too_long = [(i, len(ids) - 1) for i, (ids, _) in enumerate(self.encoded) if len(ids) - 1 > block_size]
        if too_long:
            i, n = too_long[0]
            where = self.examples[i].source or f"example {i}"
            raise ValueError(f"{where}: the example has {n} tokens, more than block_size={block_size}"
                             + (f" ({len(too_long)} examples are too long)" if len(too_long) > 1 else ""))

    def __len__(self) -> int:
        return len(self.examples)

    def collate(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T) padded with eos, y (B, T) with IGNORE on prompt and padding positions."""
        T = max(len(self.encoded[i][0]) - 1 for i in indices)
        x = torch.full((len(indices), T), self.tokenizer.eos_id, dtype=torch.long)
        y = torch.full((len(indices), T), IGNORE, dtype=torch.long)
        for row, i in enumerate(indices):
            ids, n_prompt = self.encoded[i]
            ids = torch.tensor(ids)
            x[row, :len(ids) - 1] = ids[:-1]
            y[row, n_prompt - 1:len(ids) - 1] = ids[n_prompt:]
        return x, y

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.collate(torch.randint(len(self), (batch_size,), generator=generator).tolist())

    def batches(self, batch_size: int, max_batches: int | None = None):
        """All examples in order, batch_size at a time."""
        for b, i in enumerate(range(0, len(self), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self.collate(list(range(i, min(i + batch_size, len(self)))))
