"""The model's parameters and target layers by block: one block, built on the meta device, stands for all of them.

Every block of minilora's GPT (and every decoder layer of its Llama) has the same modules and parameter shapes,
so a model of one block on the "meta" device (shapes, no memory) names and sizes every block, and the estimate
is outside + n_layer × one block: the same bytes at any depth, in the same time. What can differ between blocks
is which of them the targets select. A target pattern (minilora.inject: the exact name, a dotted suffix, or a
regular expression over the whole name) made of dotted names that are not numbers ("c_attn", "mlp.c_fc")
selects the same modules in every block: no part of it can stand for a block's number. A regular expression
that treats all digits alike (r".*c_attn") is tried once per number of digits (minilora.memory.patterns);
one that names blocks by number ("transformer.h.3.mlp.c_fc", r".*h\\.[01]\\..*") is matched block by block.

    Layers(config).select(targets) -> Selection: the modules outside the blocks, those of every block,
                                       and those of some blocks only (block index -> names inside the block)
"""
from __future__ import annotations

import functools
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..gpt import GPT, GPTConfig
from ..inject import _matches as matches  # find_targets' rule for one name and one pattern
from ..llama import Llama, LlamaConfig
from ..qlora import untied_linears
from .patterns import digit_blind, digit_spans

_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")  # dotted names, none of them a number


class _SkipRandomInit(TorchFunctionMode):
    """Leave normal_ initialisation out: on the meta device there are no values to draw anyway."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.nn.init.normal_, torch.Tensor.normal_):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=8)
def _one_block_model(kind: str, config_json: str) -> nn.Module:
    cls, config_cls = (Llama, LlamaConfig) if kind == "llama" else (GPT, GPTConfig)
    with torch.device("meta"), _SkipRandomInit():
        return cls(config_cls(**json.loads(config_json)))


@dataclass
class Selection:
    """The modules a list of target patterns selects: `outside` (full names, outside the blocks), `every` (names
    inside a block, selected in all of them) and `some` ((start, stop, name inside a block): selected in blocks
    start … stop-1 too)."""
    outside: set[str] = field(default_factory=set)
    every: set[str] = field(default_factory=set)
    some: list[tuple[int, int, str]] = field(default_factory=list)


class Layers:
    """A GPTConfig's or LlamaConfig's model as its parts outside the blocks and one block, `depth` times."""

    def __init__(self, config: GPTConfig | LlamaConfig):
        llama = isinstance(config, LlamaConfig)
        self.depth = config.num_hidden_layers if llama else config.n_layer
        self.prefix = "model.layers" if llama else "transformer.h"
        one = replace(config, **{"num_hidden_layers" if llama else "n_layer": 1}, checkpoint_segments=None)
        self.model = _one_block_model("llama" if llama else "gpt", json.dumps(asdict(one), sort_keys=True))
        self.names = [n for n, _ in self.model.named_modules() if n]  # the model's names, block 0 standing for all
        self.block_names = [self.inside(n) for n in self.names if self.inside(n) is not None]

    def inside(self, name: str) -> str | None:
        """The name inside block 0 ('' for the block itself, 'attn.c_attn', ...), None for a name outside it."""
        head = f"{self.prefix}.0"
        return name[len(head) + 1:] if name.startswith(head + ".") else "" if name == head else None

    def name(self, i: int, inside: str) -> str:
        """The full name of module `inside` of block i."""
        return f"{self.prefix}.{i}" + (f".{inside}" if inside else "")

    def module(self, inside: str) -> nn.Module:
        """A block's module (every block has the same ones)."""
        return self.model.get_submodule(self.name(0, inside))

    def select(self, targets) -> Selection:
        """find_targets over the whole model, without building it: every pattern must select a module."""
        patterns = [targets] if isinstance(targets, str) else list(targets)
        if not patterns:
            raise ValueError("targets must name at least one module")
        chosen = Selection()
        for p in patterns:
            hits = 0
            for n in self.names:
                inside = self.inside(n)
                if inside is None and matches(n, p):
                    chosen.outside.add(n)
                    hits += 1
                elif inside and _DOTTED.fullmatch(p) and (inside == p or inside.endswith("." + p)):
                    chosen.every.add(inside)
                    hits += 1
            if not _DOTTED.fullmatch(p):
                found = self._spans(p)
                chosen.some += found
                hits += len(found)
            if not hits:
                raise ValueError(f"target {p!r} matches no module of {type(self.model).__name__} "
                                 f"(module names look like {self.names[min(5, len(self.names) - 1)]!r})")
        return chosen

    def _spans(self, p: str) -> list[tuple[int, int, str]]:
        """(start, stop, name inside a block) for the blocks whose module `name` the pattern p selects: one block
        per digit count if p treats all digits alike, else block by block (consecutive ones joined)."""
        if digit_blind(p):
            return [(a, b, n) for a, b in digit_spans(self.depth) for n in self.block_names
                    if matches(self.name(a, n), p)]
        spans: list[tuple[int, int, str]] = []
        for n in self.block_names:
            for i in range(self.depth):
                if matches(self.name(i, n), p):
                    if spans and spans[-1][1:] == (i, n):
                        spans[-1] = (spans[-1][0], i + 1, n)
                    else:
                        spans.append((i, i + 1, n))
        return spans

    def untied(self, chosen: Selection | None = None) -> Selection:
        """The nn.Linear modules of `chosen` (default: of the whole model) whose weight no other module shares."""
        if chosen is None:
            chosen = Selection(outside={n for n in self.names if self.inside(n) is None},
                               every=set(self.block_names) - {""})
        keep = set(untied_linears(self.model, sorted(chosen.outside) + [self.name(0, n) for n in chosen.every]))
        return Selection(outside=chosen.outside & keep, every={n for n in chosen.every if self.name(0, n) in keep},
                         some=chosen.some)

    def check_linear(self, chosen: Selection) -> None:
        """Every selected module must be a linear layer."""
        named = [(n, self.model.get_submodule(n)) for n in chosen.outside]
        named += [(self.name(0, n), self.module(n)) for n in chosen.every]
        named += [(self.name(a, n), self.module(n)) for a, _, n in chosen.some]
        for name, module in named:
            if not isinstance(module, nn.Linear):
                raise ValueError(f"target {name!r} is a {type(module).__name__}, not a linear layer")

    def runs(self, *selections: Selection) -> list[tuple[int, int, tuple[frozenset[str], ...]]]:
        """The blocks as runs (count, first block, what each selection selects in each of them) of blocks alike:
        a sweep over the starts and stops of every selection's spans."""
        edges: dict[int, list[tuple[int, str, int]]] = {}
        for k, s in enumerate(selections):
            for a, b, n in s.some:
                edges.setdefault(a, []).append((k, n, 1))
                edges.setdefault(b, []).append((k, n, -1))
        active = [Counter() for _ in selections]
        marks = sorted({0, self.depth} | set(edges))
        out: list[tuple[int, int, tuple[frozenset[str], ...]]] = []
        for a, b in zip(marks, marks[1:]):
            for k, n, step in edges.get(a, ()):
                active[k][n] += step
            chosen = tuple(frozenset(s.every | {n for n, c in on.items() if c}) for s, on in zip(selections, active))
            if out and out[-1][2] == chosen:
                out[-1] = (out[-1][0] + b - a, out[-1][1], chosen)
            else:
                out.append((b - a, a, chosen))
        return out
