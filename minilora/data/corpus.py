"""A pretraining corpus of real English that every Python install already has, so nothing is downloaded.

Two sources, both shipped with CPython's standard library:
  "topics"     pydoc_data/topics.py: the language reference pages `help("if")` prints (~465 KB on 3.11)
  "docstrings" module, class and function docstrings (longer than 200 characters) of the top-level
               stdlib modules, read with `ast` from the source files, never imported (~690 KB on 3.11)
The exact size depends on the Python version; `corpus_stats` reports it.
"""
from __future__ import annotations

import ast
import functools
import sysconfig
from pathlib import Path

SOURCES = ("topics", "docstrings")


@functools.lru_cache(maxsize=None)
def _topics() -> tuple[str, ...]:
    from pydoc_data.topics import topics
    return tuple(topics[k] for k in sorted(topics))


@functools.lru_cache(maxsize=None)
def _docstrings(min_chars: int = 200) -> tuple[str, ...]:
    docs = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    return tuple(docs)


def english_documents(sources: tuple[str, ...] = SOURCES) -> list[str]:
    """The corpus as a list of documents, in a fixed order (sorted topics, then files in name order)."""
    if isinstance(sources, str):
        sources = (sources,)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise ValueError(f"sources must be a non-empty subset of {SOURCES}, got {sources!r}")
    docs: list[str] = []
    for s in sources:
        docs += list(_topics() if s == "topics" else _docstrings())
    return docs


def split_documents(docs: list[str], val_fraction: float = 0.05) -> tuple[str, str]:
    """(train text, validation text): every round(1/val_fraction)-th document goes to validation."""
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    every = round(1 / val_fraction)
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    val = [d for i, d in enumerate(docs) if i % every == every - 1]
    return "\n\n".join(train), "\n\n".join(val)


def corpus_stats(sources: tuple[str, ...] = SOURCES) -> dict[str, int]:
    """Documents and characters per source, as measured on this Python."""
    out = {}
    for s in (sources,) if isinstance(sources, str) else sources:
        docs = english_documents((s,))
        out[s] = {"documents": len(docs), "chars": sum(map(len, docs))}
    return out
