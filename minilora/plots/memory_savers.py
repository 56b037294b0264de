"""Figures for the two memory savers: gradient checkpointing and the paged optimizer.

Checkpointing: saved-activation bytes against depth (plot_checkpointing) and against the number of segments
(plot_segment_sweep). Paging: the long-sequence demo's device bytes and page traffic (plot_paging_demo), and
the optimizer step's time and bytes moved (plot_paged_step). Each function draws numbers measured elsewhere (benchmarks/checkpointing.py, minilora.demos.paging) and
returns a matplotlib Figure; nothing here measures or computes a result.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from .common import MiB


def plot_checkpointing(n_blocks: Sequence[int], peak_bytes: Mapping[str, Sequence[float]],
                       time_ratio: Mapping[str, Sequence[float]] | None = None,
                       title: str = "Gradient checkpointing: saved activations vs depth") -> Figure:
    """Left: peak saved-activation bytes per mode against n blocks, with the √n/n·(no checkpointing) guide.
    Right (if time_ratio is given): forward+backward time of each mode relative to no checkpointing."""
    n_blocks = list(n_blocks)
    for mode, values in peak_bytes.items():
        if len(values) != len(n_blocks):
            raise ValueError(f"peak_bytes[{mode!r}] has {len(values)} values for {len(n_blocks)} block counts")
    ncols = 2 if time_ratio else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4), squeeze=False)
    ax = axes[0, 0]
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
    for k, (mode, values) in enumerate(peak_bytes.items()):
        ls, marker = styles[k % len(styles)]
        ax.plot(n_blocks, [v / MiB for v in values], ls=ls, marker=marker, markersize=7 - 1.5 * k, label=mode)
    base = next(iter(peak_bytes.values()))
    ax.plot(n_blocks, [2 * math.sqrt(n) / n * b / MiB for n, b in zip(n_blocks, base)], ls=(0, (1, 3)), color="gray",
            label=f"2√n/n × {next(iter(peak_bytes))}")
    ax.set_xlabel("transformer blocks n")
    ax.set_ylabel("peak saved activations (MiB)")
    ax.set_xticks(n_blocks)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if time_ratio:
        ax = axes[0, 1]
        width = 0.8 / len(time_ratio)
        for k, (mode, values) in enumerate(time_ratio.items()):
            xs = [i + (k - (len(time_ratio) - 1) / 2) * width for i in range(len(n_blocks))]
            bars = ax.bar(xs, values, width, label=mode)
            ax.bar_label(bars, fmt="%.2f×", fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(range(len(n_blocks)), [str(n) for n in n_blocks])
        ax.set_xlabel("transformer blocks n")
        ax.set_ylabel("time / time without checkpointing")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_segment_sweep(segments: Sequence[int], peak_bytes: Sequence[float], n_blocks: int,
                       no_checkpointing: float | None = None) -> Figure:
    """Peak saved-activation bytes of an n-block model checkpointed in s segments, against s; ⌈√n⌉ marked."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(list(segments), [b / MiB for b in peak_bytes], marker="o", label="checkpointed in s segments")
    if no_checkpointing is not None:
        ax.axhline(no_checkpointing / MiB, color="gray", ls="--", label="no checkpointing")
    root = math.ceil(math.sqrt(n_blocks))
    ax.axvline(root, color="C3", ls=":", label=f"s = ⌈√n⌉ = {root}")
    ax.set_xlabel("segments s (inputs kept)")
    ax.set_ylabel("peak saved activations (MiB)")
    ax.set_title(f"{n_blocks} blocks: memory against number of checkpoints")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_paging_demo(demo, title: str = "Paged optimizer: one long sequence, one spike") -> Figure:
    """Left: device bytes per step (weights+grads, optimizer pages resident at the spike, activation peak)
    against the capacity, with plain AdamW's need outlined. Right: pages copied out / in per step.
    `demo` is a minilora.demos.PagingDemo."""
    steps = demo.steps
    if not steps:
        raise ValueError("demo has no steps to draw")
    xs = list(range(len(steps)))
    fixed = [demo.fixed_bytes / MiB] * len(steps)
    resident = [s.resident_at_peak / MiB for s in steps]
    act = [s.activation_peak / MiB for s in steps]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax.bar(xs, fixed, label="weights + gradients", color="#999999")
    ax.bar(xs, resident, bottom=fixed, label="optimizer pages on device", color="#4c72b0")
    ax.bar(xs, act, bottom=[f + r for f, r in zip(fixed, resident)], label="saved activations", color="#dd8452")
    unpaged = [(demo.fixed_bytes + demo.state_bytes + s.activation_peak) / MiB for s in steps]
    ax.bar(xs, unpaged, fill=False, edgecolor="black", ls="--", label="plain AdamW would need")
    ax.axhline(demo.device_bytes / MiB, color="red", lw=1.2, label="device capacity")
    ax.set_xticks(xs, [f"{s.step}\nT={s.seq_len}" for s in steps])
    ax.set_xlabel("training step (sequence length)")
    ax.set_ylabel("MiB at the activation peak")
    ax.legend(fontsize=7, loc="upper left")
    w = 0.4
    ax2.bar([x - w / 2 for x in xs], [s.pages_out for s in steps], w, label="pages out (device → host)")
    ax2.bar([x + w / 2 for x in xs], [s.pages_in for s in steps], w, label="pages in (host → device)")
    ax2.set_xticks(xs, [str(s.step) for s in steps])
    ax2.set_xlabel("training step")
    ax2.set_ylabel(f"pages of {demo.page_size} bytes")
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_paged_step(labels: Sequence[str], time_ratio: Sequence[float], moved_bytes: Sequence[float],
                    title: str = "Paged AdamW: step time and page traffic") -> Figure:
    """Left: optimizer step time per configuration relative to torch.optim.AdamW. Right: bytes the pager
    copied per step (both directions)."""
    if not len(labels) == len(time_ratio) == len(moved_bytes):
        raise ValueError(f"labels, time_ratio and moved_bytes must have one value per configuration, got "
                         f"{len(labels)}, {len(time_ratio)}, {len(moved_bytes)}")
    ys = list(range(len(labels)))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 0.45 * len(labels) + 1.5), sharey=True)
    bars = ax.barh(ys, time_ratio, color="#4c72b0")
    ax.bar_label(bars, fmt="%.2f×", fontsize=7)
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("step time / torch.optim.AdamW step time")
    bars = ax2.barh(ys, [b / MiB for b in moved_bytes], color="#dd8452")
    ax2.bar_label(bars, fmt="%.0f", fontsize=7)
    ax2.set_xlabel("MiB copied per step (in + out)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
