"""PNG charts of an evaluation: retention per metric, and per-turn FLOPs and latency per serving mode.

Figures are drawn on matplotlib's Agg canvas through the object API (no pyplot, no global
backend or figure state), so plotting is safe in any process and thread. Each function returns
the PNG bytes; the caller stores them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

MODE_LABELS = {
    "recompute": "recompute (with prompt)",
    "kv_reuse": "KV reuse (with prompt)",
    "adapter": "adapter (no prompt)",
}
_PASS, _FAIL, _NONE = "#2a9d8f", "#e76f51", "#bbbbbb"


def retention_plot(prompt_name: str, rows: Sequence[Mapping[str, Any]], threshold: float) -> bytes:
    """Horizontal bars of each metric's retention (adapter / teacher) with the publish threshold.

    ``rows`` hold ``metric``, ``retention`` (None is drawn as "n/a") and ``n`` (sample size).
    """
    fig = Figure(figsize=(7, 1.6 + 0.45 * max(1, len(rows))), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [f"{row['metric']} (n={row.get('n', 0)})" for row in rows]
    values = [row.get("retention") for row in rows]
    positions = list(range(len(rows)))
    ax.barh(positions, [v or 0.0 for v in values], color=[_bar_color(v, threshold) for v in values])
    for y, v in zip(positions, values):
        ax.text(max(v or 0.0, 0.0) + 0.01, y, "n/a" if v is None else f"{v:.2f}", va="center", fontsize=8)
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_yticks(positions, labels)
    ax.invert_yaxis()
    known = [v for v in values if v is not None]
    ax.set_xlim(min([0.0] + known), max([1.1, threshold + 0.1] + [v + 0.15 for v in known]))
    ax.set_xlabel("retention (adapter / teacher)")
    ax.set_title(f"{prompt_name}: retention")
    if not rows:
        ax.text(0.5, 0.5, "no metrics", transform=ax.transAxes, ha="center", va="center")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def efficiency_plot(
    prompt_name: str,
    flops_per_turn: Mapping[str, Sequence[float | None]],
    latency_per_turn: Mapping[str, Sequence[float | None]],
) -> bytes:
    """Two panels, one line per serving mode: prefill FLOPs per turn and measured seconds per turn."""
    fig = Figure(figsize=(11, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    _mode_lines(left, flops_per_turn, "prefill FLOPs", log=True)
    _mode_lines(right, latency_per_turn, "seconds", log=False)
    left.set_title("prefill FLOPs per turn")
    right.set_title("latency per turn")
    fig.suptitle(f"{prompt_name}: serving with and without the prompt")
    return _png(fig)


def _mode_lines(ax: Any, series: Mapping[str, Sequence[float | None]], ylabel: str, log: bool) -> None:
    """One line per mode over turns 1..n; None values leave gaps. ``log`` applies when every value is positive."""
    drawn: list[float] = []
    for mode, values in series.items():
        ys = [math.nan if v is None else float(v) for v in values]
        if not ys or all(math.isnan(y) for y in ys):
            continue
        ax.plot(range(1, len(ys) + 1), ys, marker="o", label=MODE_LABELS.get(mode, mode))
        drawn += [y for y in ys if not math.isnan(y)]
    ax.set_xlabel("turn")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log and drawn and min(drawn) > 0:
        ax.set_yscale("log")
        ylabel += " (log scale)"
    ax.set_ylabel(ylabel)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")


def _bar_color(value: float | None, threshold: float) -> str:
    if value is None:
        return _NONE
    return _PASS if value >= threshold else _FAIL


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
