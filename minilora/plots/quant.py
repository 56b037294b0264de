"""Quantization figures (notebook 02): the lecture's int8 absmax example, what one outlier does to a tensor's
absmax versus per-block absmax, and 4-bit codebooks (NF4 and others) against the weights they encode.

Every function takes numbers minilora computed in the same run and returns a matplotlib Figure; none of them
computes a result itself, so what a figure shows is exactly what the notebook printed beside it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .common import to_numpy as _np

__all__ = ["plot_int8_example", "plot_outlier_effect", "plot_codebooks"]


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
