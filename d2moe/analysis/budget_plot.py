"""Resident bytes over time against the memory budget, one curve per timeline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from d2moe.analysis.metrics import resident_curve
from d2moe.analysis.timeline_plot import checked_labels, save_png
from d2moe.core.events import Timeline

UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


def _unit(top_bytes: float) -> tuple[str, int]:
    """The largest binary unit in which `top_bytes` is at least 1."""
    return next(((n, s) for n, s in UNITS if top_bytes >= s), UNITS[-1])


def plot_resident(timelines: Sequence[Timeline], path: str | Path, *,
                  labels: Sequence[str] | None = None, budget_bytes: int | None = None,
                  title: str | None = None, width_in: float = 9.0, dpi: int = 200) -> Path:
    """Write a PNG of resident bytes over time (ms) with the budget as a dashed line.

    The budget is `budget_bytes` or else the first timeline's `meta["budget_bytes"]`.
    """
    from matplotlib.figure import Figure

    labels = checked_labels(timelines, labels)
    if budget_bytes is None:
        meta_budget = timelines[0].meta.get("budget_bytes")
        budget_bytes = int(meta_budget) if isinstance(meta_budget, (int, float)) else None

    curves = [resident_curve(t) for t in timelines]
    top = max([float(level.max()) for _, level in curves] + [float(budget_bytes or 0)])
    unit, scale = _unit(top)
    fig = Figure(figsize=(width_in, 3.2), layout="constrained")
    ax = fig.subplots()
    for (t_us, level), label in zip(curves, labels, strict=True):
        ax.step(t_us / 1e3, level / scale, where="post", linewidth=1.2,
                label=f"{label} (peak {level.max() / scale:,.1f} {unit})")
    if budget_bytes:
        ax.axhline(budget_bytes / scale, color="#c62828", linestyle="--", linewidth=1.0,
                   label=f"budget {budget_bytes / scale:,.1f} {unit}")
    ax.set_xlabel("time (ms)")
    ax.set_ylabel(f"resident expert weights ({unit})")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3, linewidth=0.5)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    return save_png(fig, path, dpi=dpi)
