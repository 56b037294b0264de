"""The command line's argument types (machinery): a bad value is one line `error: ...` naming what was expected."""
from __future__ import annotations

import argparse
import math
import sys

import torch


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as every other bad input: one line `error: ...`, exit status 2."""
    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _int(least: int):
    """An argparse type: an integer >= least."""
    def parse(v: str) -> int:
        if not v.strip().lstrip("+-").isdigit() or int(v) < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {v!r}")
        return int(v)
    return parse


positive, count = _int(1), _int(0)


def _number(expected: str, ok):
    """An argparse type: a finite float for which ok(x) holds (inf and nan are refused, not trained on)."""
    def parse(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and ok(x)):
            raise argparse.ArgumentTypeError(f"expected a finite number {expected}, got {v!r}")
        return x
    return parse


above_zero = _number("> 0", lambda x: x > 0)
at_least_zero = _number(">= 0", lambda x: x >= 0)
fraction = _number("in [0, 1)", lambda x: 0 <= x < 1)


def device(v: str) -> str:
    """cpu, cuda, cuda:N or mps, and only one this PyTorch build and machine have."""
    try:
        d = torch.device(v)
    except (RuntimeError, ValueError):
        d = torch.device("meta")
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    have = {"cpu": True, "cuda": (d.index or 0) < n_cuda, "mps": torch.backends.mps.is_available()}
    if not have.get(d.type, False):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, one this machine has (this PyTorch "
                                         f"sees {n_cuda} CUDA device(s){'' if have['mps'] else ', no MPS'}), got {v!r}")
    return v
