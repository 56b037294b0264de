"""LoRA figures (notebook 01): W ≈ B·A to scale, low rank as compression, the trainable-parameter table and
the adapted layer's drift from its base during training.

Every function takes numbers minilora computed in the same run and returns a matplotlib Figure; none of them
computes a result itself, so what a figure shows is exactly what the notebook printed beside it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .common import to_numpy as _np

__all__ = ["plot_factorization", "plot_rank_reconstruction", "plot_lora_table", "plot_output_drift"]


def plot_factorization(W, B, A, title: str = "W ≈ B · A") -> Figure:
    """Heatmaps of W (m × n), B (m × r), A (r × n) and B·A, each drawn to scale, for W = B·A (slide: LoRA intuition)."""
    W, B, A = _np(W), _np(B), _np(A)
    if B.shape[1] != A.shape[0] or (B.shape[0], A.shape[1]) != W.shape:
        raise ValueError(f"shapes do not chain: W {W.shape}, B {B.shape}, A {A.shape}")
    BA = B @ A
    (m, n), r = W.shape, B.shape[1]
    tall = m > n  # a tall W gets a taller figure, so each panel keeps its true aspect ratio and stays legible
    fig, axes = plt.subplots(1, 4, figsize=(10, 5.2) if tall else (12, 3.4),
                             gridspec_kw=dict(width_ratios=[n, max(4 * r, n // 8), n, n]))
    panels = [(W, f"W  ({m}×{n})", W), (B, f"B  ({m}×{r})", B), (A, f"A  ({r}×{n})", A),
              (BA, f"B·A  (rank {r})", W)]
    for ax, (M, label, scale) in zip(axes, panels):
        lim = 3 * float(scale.std()) or 1.0  # same colour scale for W and B·A, so they compare by eye
        ax.imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto" if M is B else "equal",
                  interpolation="nearest")
        ax.set_title(label, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    rel = np.linalg.norm(W - BA) / np.linalg.norm(W)
    fig.suptitle(f"{title}:  {m * n:,} numbers vs r·(m + n) = {r * (m + n):,};  ‖W − BA‖/‖W‖ = {rel:.3f}")
    fig.tight_layout()
    return fig


def plot_rank_reconstruction(ranks: Sequence[int], errors: Mapping[str, Sequence[float]],
                             shape: tuple[int, int] | None = None,
                             spectra: Mapping[str, Sequence[float]] | None = None) -> Figure:
    """Relative error ‖W − W_r‖_F / ‖W‖_F of the best rank-r approximation (truncated SVD) against r, one curve per
    matrix; with `shape` (m, n) a top axis gives the fraction of numbers kept, r(m + n) / (m n). With `spectra`,
    a second panel shows the singular values σ_i / σ_1 on a log scale."""
    ranks = np.asarray(ranks)
    ncols = 2 if spectra else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 3.8), squeeze=False)
    ax = axes[0, 0]
    for name, err in errors.items():
        ax.plot(ranks, _np(err), marker="o", ms=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r")
    ax.set_ylabel("‖W − W_r‖ / ‖W‖")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title("low rank as compression")
    if shape is not None:
        m, n = shape
        top = ax.secondary_xaxis("top", functions=(lambda r: r * (m + n) / (m * n), lambda f: f * m * n / (m + n)))
        top.set_xlabel("fraction of the numbers of W kept")
    if spectra:
        ax2 = axes[0, 1]
        for name, s in spectra.items():
            s = _np(s)
            ax2.plot(np.arange(1, len(s) + 1), s / s[0], label=name)
        ax2.set_yscale("log")
        ax2.set_xlabel("index i")
        ax2.set_ylabel("σ_i / σ_1")
        ax2.set_title("singular values")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=9)
    fig.tight_layout()
    return fig


def plot_lora_table(table: Mapping[str, Mapping[str, float]]) -> Figure:
    """The trainable-parameter table (rank -> model -> count) as lines on log axes, full fine-tuning dashed."""
    ranks = [k for k in table if k != "Full"]
    models = list(next(iter(table.values())).keys())
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = np.array([int(r) for r in ranks])
    for i, model in enumerate(models):
        color = f"C{i}"
        ax.plot(x, [table[r][model] for r in ranks], marker="o", color=color, label=f"{model}: LoRA")
        if "Full" in table:
            ax.axhline(table["Full"][model], color=color, ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rank r")
    ax.set_ylabel("trainable parameters")
    ax.set_title("2·r·√N trainable parameters (dashed: full fine-tuning, N)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def plot_output_drift(steps: Sequence[int], drift: Sequence[float], ylabel: str = "max |LoRA(x) − W0 x|") -> Figure:
    """How far a LoRA layer's output has moved from the base layer's, step by step (0 at step 0: B starts at 0)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(list(steps), _np(drift), marker="o", ms=3)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.set_title("B = 0 at init: the adapted layer starts as the base layer")
    fig.tight_layout()
    return fig
