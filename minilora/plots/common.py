"""What every figure module shares: numbers in as numpy arrays, the byte unit of the memory figures, and
saving a figure without ever leaving half a file behind."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from ..runs.files import atomic_write

MiB = 2**20


def to_numpy(x) -> np.ndarray:
    """A tensor (any dtype or device) or a sequence of numbers as a float numpy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write `fig` to `path` (format from its suffix: .png, .pdf, .svg, ...), creating its folder, atomically."""
    path = Path(path)
    fmt = path.suffix[1:].lower()
    if not fmt:
        raise ValueError(f"path {str(path)!r} needs a suffix naming the image format (.png, .pdf, .svg)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))
