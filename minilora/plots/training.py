"""Training curves: the loss of every optimizer step per run, with the validation points on top."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over `window` steps (the first points average what exists so far)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss_curves(runs: Mapping[str, Sequence[float]], evals: Mapping[str, Sequence[Mapping]] | None = None,
                     smoothing: int = 10, title: str = "fine-tuning loss", ax=None) -> Figure:
    """runs: label -> training loss per step (drawn faintly, and smoothed over `smoothing` steps).
    evals: label -> [{"step", "loss", ...}] validation points, drawn as markers in the same colour."""
    if not runs:
        raise ValueError("plot_loss_curves needs at least one run")
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.2))
    else:
        fig = ax.figure
    for label, losses in runs.items():
        if not len(losses):
            raise ValueError(f"run {label!r} has no losses")
        steps = range(1, len(losses) + 1)
        (line,) = ax.plot(steps, smooth(list(losses), smoothing), label=f"{label} (train)", lw=1.8)
        ax.plot(steps, losses, color=line.get_color(), alpha=0.2, lw=0.8)
        points = (evals or {}).get(label) or []
        if points:
            ax.plot([p["step"] for p in points], [p["loss"] for p in points], "o--", color=line.get_color(),
                    ms=5, lw=1, label=f"{label} (validation)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
