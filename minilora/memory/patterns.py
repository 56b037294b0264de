"""Machinery: which blocks a target pattern selects, decided per number of digits instead of block by block.

A block's module names differ only in the block's number ("transformer.h.7.attn.c_attn"). A regular expression
none of whose parts tells one digit from another (no literal digit, no class such as [0-5] that holds some digits
and not others, no backreference: "." , "\\d", "\\w", "[a-z]" treat all ten alike) matches the names of block 7
exactly when it matches those of block 3: whether it matches depends only on how many digits the number has.
So such a pattern is tried on one block per digit count (0, 10, 100, ...), and selects whole spans of blocks.
Exact names and dotted suffixes without digits select the same modules in every block as well.
"""
from __future__ import annotations

import re

try:  # Python's own regular-expression parser: re._parser from 3.11, sre_parse before
    from re import _constants as sre, _parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as sre
    import sre_parse

DIGITS = range(ord("0"), ord("9") + 1)
REPEATS = {sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", sre.MAX_REPEAT)}


def _class_is_blind(items) -> bool:
    """A character class [...] holds all ten digits or none (categories such as \\d, \\w hold all or none)."""
    members = set()
    for op, av in items:
        if op is sre.LITERAL:
            members.add(av)
        elif op is sre.RANGE:
            members.update(range(av[0], av[1] + 1))
        elif op not in (sre.CATEGORY, sre.NEGATE):
            return False
    return sum(d in members for d in DIGITS) in (0, len(DIGITS))  # negated ([^...]): none or all, still


def _blind(nodes) -> bool:
    for op, av in nodes:
        if op in (sre.LITERAL, sre.NOT_LITERAL):
            if av in DIGITS:
                return False
        elif op is sre.IN:
            if not _class_is_blind(av):
                return False
        elif op in REPEATS:
            if not _blind(av[2]):
                return False
        elif op is sre.SUBPATTERN:
            if not _blind(av[-1]):
                return False
        elif op is sre.BRANCH:
            if not all(_blind(b) for b in av[1]):
                return False
        elif op in (sre.ASSERT, sre.ASSERT_NOT):
            if not _blind(av[1]):
                return False
        elif op is getattr(sre, "ATOMIC_GROUP", None):
            if not _blind(av):
                return False
        elif op not in (sre.ANY, sre.AT):  # a backreference, a conditional: they compare digits
            return False
    return True


def digit_blind(pattern: str) -> bool:
    """True if no part of the pattern tells one digit from another (the module docstring): it then matches the
    names of every block whose number has as many digits as that of a block it matches. An invalid regular
    expression is a pattern with characters no module name has, which selects no block: blind too."""
    try:
        return _blind(sre_parse.parse(pattern))
    except re.error:
        return True


def digit_spans(depth: int) -> list[tuple[int, int]]:
    """The blocks [start, stop) whose numbers have 1, 2, 3, ... digits: [0, 10), [10, 100), ... up to depth."""
    spans, start, stop = [], 0, 10
    while start < depth:
        spans.append((start, min(stop, depth)))
        start, stop = stop, stop * 10
    return spans
