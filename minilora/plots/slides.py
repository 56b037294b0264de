"""Figures for the lecture notebooks that no other plots module draws.

Every function takes numbers minilora computed in the same run and returns a matplotlib Figure; none of them
computes a result itself, so what a figure shows is exactly what the notebook printed beside it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = ["plot_codebooks", "plot_factorization", "plot_int8_example", "plot_lora_table", "plot_outlier_effect",
           "plot_output_drift", "plot_rank_reconstruction", "plot_segment_sweep"]


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


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


def plot_segment_sweep(segments: Sequence[int], peak_bytes: Sequence[float], n_blocks: int,
                       no_checkpointing: float | None = None) -> Figure:
    """Peak saved-activation bytes of an n-block model checkpointed in s segments, against s; ⌈√n⌉ marked."""
    MiB = 2**20
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(list(segments), [b / MiB for b in peak_bytes], marker="o", label="checkpointed in s segments")
    if no_checkpointing is not None:
        ax.axhline(no_checkpointing / MiB, color="gray", ls="--", label="no checkpointing")
    root = int(np.ceil(np.sqrt(n_blocks)))
    ax.axvline(root, color="C3", ls=":", label=f"s = ⌈√n⌉ = {root}")
    ax.set_xlabel("segments s (inputs kept)")
    ax.set_ylabel("peak saved activations (MiB)")
    ax.set_title(f"{n_blocks} blocks: memory against number of checkpoints")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_int8_example(x, scaled, q, absmax: float, slide_q: Sequence[int] | None = None) -> Figure:
    """The lecture's int8 absmax example. Left: c·x before rounding and the code round(c·x) per element (the
    slide's printed codes marked where they differ). Right: the round-trip error |x − q/c| per element against
    the bound of half a bucket, absmax/254."""
    x, scaled, q = _np(x), _np(scaled), _np(q)
    i = np.arange(len(x))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax.bar(i - 0.2, scaled, 0.4, color="#bbbbbb", label="c·x (before rounding)")
    ax.bar(i + 0.2, q, 0.4, color="C0", label="round(c·x): the int8 code")
    if slide_q is not None:
        slide_q = np.asarray(slide_q)
        bad = np.nonzero(slide_q != q)[0]
        ax.scatter(bad + 0.2, slide_q[bad], marker="x", color="C3", s=60, zorder=3, label="slide prints")
        for k in bad:
            ax.annotate(f"{scaled[k]:.2f} → {int(q[k])}\nslide: {int(slide_q[k])}", (k, q[k]),
                        xytext=(0, 12), textcoords="offset points", ha="center", fontsize=7, color="C3")
    ax.set_xticks(i, [f"{v:g}" for v in x], fontsize=8)
    ax.set_xlabel("x (fp32)")
    ax.set_ylabel("int8 code")
    ax.set_ylim(0, 127 * 1.25)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"c = 127 / absmax = 127 / {absmax:g} = {127 / absmax:.4f}")
    err = np.abs(x - q * absmax / 127)
    ax2.bar(i, err, color="C1")
    ax2.axhline(absmax / 254, color="C3", ls="--", label=f"half a bucket: absmax/254 = {absmax / 254:.4f}")
    ax2.set_xticks(i, [f"{v:g}" for v in x], fontsize=8)
    ax2.set_xlabel("x (fp32)")
    ax2.set_ylabel("|x − dequant(q)|")
    ax2.set_title("dequantization error")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_outlier_effect(x, block_errors: Mapping[str, Sequence[float]], blocksize: int) -> Figure:
    """Top: a weight vector with an outlier. Bottom: the mean round-trip error |x − dequant(quant(x))| of each
    block of `blocksize` elements, one line per scheme (e.g. one absmax for the tensor vs one per block)."""
    x = _np(x)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    ax.plot(x, lw=0.6, color="C0")
    k = int(np.argmax(np.abs(x)))
    ax.annotate(f"outlier {x[k]:.1f}", (k, x[k]), xytext=(12, -6), textcoords="offset points", fontsize=8, color="C3")
    ax.set_ylabel("x")
    for name, e in block_errors.items():
        e = _np(e)
        edges = np.arange(len(e) + 1) * blocksize
        ax2.stairs(e, edges, label=name, lw=1.2)
    ax2.set_yscale("log")
    ax2.set_ylabel("mean |error| per block")
    ax2.set_xlabel(f"element (blocks of {blocksize})")
    ax2.legend(fontsize=8, loc="upper right")
    ax2.grid(alpha=0.3, which="both", axis="y")
    fig.tight_layout()
    return fig


def plot_codebooks(codes: Mapping[str, Sequence[float]], normalized, usage: Mapping[str, Sequence[float]],
                   errors: Mapping[str, float] | None = None) -> Figure:
    """One column per 4-bit codebook. Top: the distribution of weights divided by their block's absmax, with
    the 16 code values as vertical lines (the bucket centres). Bottom: the share of weights each code receives
    (uniform would be 1/16 each). `errors` (name -> mean |error|) goes into the titles."""
    normalized = _np(normalized).ravel()
    names = list(codes)
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 5.4), squeeze=False)
    for j, name in enumerate(names):
        c = np.sort(_np(codes[name]))
        ax = axes[0, j]
        ax.hist(normalized, bins=160, range=(-1, 1), density=True, color="#cccccc")
        for v in c:
            ax.axvline(v, color=f"C{j}", lw=1)
        title = name if errors is None else f"{name}: mean |error| {errors[name]:.4f}"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("w / absmax(block)")
        ax.set_yticks([])
        ax2 = axes[1, j]
        u = _np(usage[name])
        ax2.bar(np.arange(len(u)), u, color=f"C{j}")
        ax2.axhline(1 / len(u), color="gray", ls="--", lw=1)
        ax2.set_xlabel("code index (0 … 15)")
        ax2.set_ylabel("share of weights")
        ax2.set_ylim(0, max(0.3, float(u.max()) * 1.1))
    fig.tight_layout()
    return fig
