"""Saved activations of a deep model as runs of identical blocks: every total in time independent of depth.

A block saves the same tensors as its neighbour whenever both are trained the same way and both inputs do (or
do not) require grad, so n_layer blocks are a few runs (count, what one block saves). Sums over blocks are
count × bytes; the checkpointed peak (minilora.memory.activations states it) is

    max( pre + s·input + post ,  max_j  pre + j·input + [input unless block a_j saves it] + saved(a_j … b_j) )

over segments j = 0 … s-1 of blocks [a_j, b_j). Segments are of ⌈n/s⌉ blocks, then ⌊n/s⌋ (as
minilora.checkpointing cuts them). Between two run boundaries, same-size segments hold the same blocks, so
the later one (one more input kept) is larger: only the segments next to a boundary can be the peak.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from ..checkpointing import segment_bounds


@dataclass
class BlockRun:
    """`count` consecutive blocks, each saving `local` (names inside the block: 'x' is its input, 'ln_1.stats',
    ...) and `shared` (tensors every block that needs them shares: Llama's rotary cos and sin, kept once)."""
    count: int
    local: dict[str, int]
    shared: dict[str, int]


def walk_runs(block, runs: list[tuple[int, dict]], x_rg: bool) -> tuple[list[BlockRun], bool]:
    """block(kinds, x_rg) -> (local, shared, output requires grad) for every run of blocks trained alike: the
    first block of a run may differ (its input starts to require grad inside it), then the rest repeat."""
    out = []
    for count, kinds in runs:
        while count:
            local, shared, x_out = block(kinds, x_rg)
            n = count if x_out == x_rg else 1
            out.append(BlockRun(n, local, shared))
            count, x_rg = count - n, x_out
    return out, x_rg


def segment_count(n: int, segments: int | None) -> int:
    """s for n blocks (None: ⌈√n⌉), checked as minilora.checkpointing.segment_bounds checks it."""
    s = math.isqrt(n - 1) + 1 if segments is None else segments
    if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= n:
        raise ValueError(f"segments must be None (⌈√n⌉) or an int in [1, {n}] for {n} blocks, got {segments!r}")
    return s


@dataclass
class SavedActivations:
    """The analytic saved-for-backward tensors of one forward: name -> bytes, by where they are saved."""
    pre: dict[str, int]                 # embeddings (+ dropout)
    runs: list[BlockRun]                # the transformer blocks, in order, as runs of identical blocks
    post: dict[str, int]                # the final norm, lm_head, loss
    n_segments: int | None = None       # checkpointed segments; None: no checkpointing
    tokens: int = 0
    input_bytes: int = 0                # bytes of one block input, (B, T, C): what a segment keeps

    def __post_init__(self):
        self.n_blocks = sum(r.count for r in self.runs)
        self._starts = [0]
        self._bytes = [0]               # Σ local bytes of the blocks before each run
        for r in self.runs:
            self._starts.append(self._starts[-1] + r.count)
            self._bytes.append(self._bytes[-1] + r.count * sum(r.local.values()))

    def _run(self, i: int) -> int:
        return bisect.bisect_right(self._starts, i) - 1

    def _local_before(self, i: int) -> int:
        """Σ local bytes of blocks 0 … i-1."""
        k = self._run(i)
        if k == len(self.runs):
            return self._bytes[k]
        return self._bytes[k] + (i - self._starts[k]) * sum(self.runs[k].local.values())

    def saved(self, a: int, b: int) -> int:
        """Bytes blocks a … b-1 save together (shared tensors once)."""
        shared: dict[str, int] = {}
        for k in range(self._run(a), self._run(b - 1) + 1):
            shared.update(self.runs[k].shared)
        return self._local_before(b) - self._local_before(a) + sum(shared.values())

    def block(self, i: int) -> dict[str, int]:
        """What block i saves, by name ('h3.x', 'h3.attn.qkv', shared names as they are)."""
        run = self.runs[self._run(i % self.n_blocks)]
        return {**{f"h{i % self.n_blocks}.{k}": v for k, v in run.local.items()}, **run.shared}

    @property
    def segments(self) -> list[tuple[int, int]] | None:
        """The checkpointed segments [start, end) of blocks, as minilora.checkpointing cuts them (None: none)."""
        return None if self.n_segments is None else segment_bounds(self.n_blocks, self.n_segments)

    @property
    def blocks(self) -> list[dict[str, int]]:
        """Every block's saved tensors (one dict per block: for small models and for reading)."""
        return [self.block(i) for i in range(self.n_blocks)]

    @property
    def forward_end(self) -> int:
        """Bytes alive when the forward has finished (the backward can only free from here, or recompute)."""
        edges = sum(self.pre.values()) + sum(self.post.values())
        if self.n_segments is None:
            return edges + self.saved(0, self.n_blocks)
        return edges + self.n_segments * self.input_bytes

    def _segment_start(self, j: int) -> int:
        size, extra = divmod(self.n_blocks, self.n_segments)
        return j * (size + 1) if j < extra else extra * (size + 1) + (j - extra) * size

    def _segment_of(self, i: int) -> int:
        size, extra = divmod(self.n_blocks, self.n_segments)
        return i // (size + 1) if i < extra * (size + 1) else extra + (i - extra * (size + 1)) // size

    def replay(self, j: int) -> int:
        """Saved bytes alive while segment j is recomputed: pre, the inputs kept so far, its blocks' tensors."""
        a, b = self._segment_start(j), self._segment_start(j + 1)
        kept = j * self.input_bytes + (0 if "x" in self.runs[self._run(a)].local else self.input_bytes)
        return sum(self.pre.values()) + kept + self.saved(a, b)

    @property
    def peak(self) -> int:
        """max over time of the saved bytes alive: the forward's end, or a checkpointed segment's replay."""
        if self.n_segments is None:
            return self.forward_end
        size, extra = divmod(self.n_blocks, self.n_segments)
        edges = set(self._starts[1:]) | {extra * (size + 1)}
        near = {self.n_segments - 1}
        for e in edges:
            if 0 < e <= self.n_blocks:
                j = self._segment_of(e - 1)
                near |= {j - 1, j, j + 1}
        return max([self.forward_end] + [self.replay(j) for j in near if 0 <= j < self.n_segments])

    def per_token_per_block(self, i: int | None = None) -> float:
        """Bytes block i saves per token (default: the last block, which every mode trains through)."""
        return sum(self.block(-1 if i is None else i).values()) / self.tokens
