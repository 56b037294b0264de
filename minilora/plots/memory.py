"""Training memory as stacked bars: one bar per MemoryBreakdown, one colour per part (weights, NF4 storage,
gradients, optimizer state, adapters, activations), drawn from numbers minilora.memory computed."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from ..memory.breakdown import PARTS, MemoryBreakdown

_UNITS = {"GB": 1e9, "MB": 1e6, "kB": 1e3, "B": 1.0}
_COLOURS = {"weights": "#4c72b0", "quantized_weights": "#64b5cd", "master_weights": "#8172b2",
            "gradients": "#dd8452", "optimizer_state": "#c44e52", "adapters": "#55a868",
            "adapter_gradients": "#8de5a1", "adapter_optimizer_state": "#2f7d43", "gathered": "#da8bc3",
            "activations": "#937860"}


def plot_memory_breakdown(breakdowns: Sequence[MemoryBreakdown], unit: str = "GB", title: str | None = None,
                          reference_lines: Mapping[str, float] | None = None, ax=None) -> Figure:
    """Stacked bars of device memory, labelled with each bar's total. reference_lines: name -> value in `unit`
    drawn as dashed horizontal lines (e.g. {"slide: 120 GB": 120, "slide: ~40 GB": 40})."""
    if not breakdowns:
        raise ValueError("plot_memory_breakdown needs at least one MemoryBreakdown")
    if unit not in _UNITS:
        raise ValueError(f"unit must be one of {sorted(_UNITS)}, got {unit!r}")
    scale = _UNITS[unit]
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(breakdowns) + 2.5), 4.5))
    else:
        fig = ax.figure
    xs = range(len(breakdowns))
    bottom = [0.0] * len(breakdowns)
    for f, label in PARTS:
        values = [getattr(b, f) / scale for b in breakdowns]
        if not any(values):
            continue
        ax.bar(xs, values, bottom=bottom, color=_COLOURS[f], label=label, width=0.6)
        bottom = [a + v for a, v in zip(bottom, values)]
    for x, b, top in zip(xs, breakdowns, bottom):
        ax.text(x, top, f"{top:.3g} {unit}", ha="center", va="bottom", fontsize=8)
    for i, (name, value) in enumerate((reference_lines or {}).items()):
        ax.axhline(value, ls="--", lw=1, color=f"C{i + 3}", label=name)
    ax.set_xticks(list(xs), [b.label for b in breakdowns], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"device memory ({unit})")
    ax.set_ylim(0, max(bottom + [v for v in (reference_lines or {}).values()]) * 1.12 or 1)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig
