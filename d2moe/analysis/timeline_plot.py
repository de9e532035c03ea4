"""Bubble timelines: the I/O lane above the compute lane, one panel per timeline, one time axis.

Runs and loads are coloured by bit-width, non-expert slices grey, stalls hatched red;
prefetches are hatched in their bit-width's colour. Grey ticks between the lanes mark
layer starts, solid lines step boundaries. matplotlib is imported inside the functions (Agg canvas,
no display), so importing d2moe.analysis stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from d2moe.analysis.columns import (
    DECODE,
    LOAD,
    NON_EXPERT,
    PREFETCH,
    PREFILL,
    RUN,
    STALL,
    SUBSTITUTE,
    EventColumns,
    event_columns,
)
from d2moe.analysis.metrics import Metrics, compute_metrics
from d2moe.core.errors import UserError
from d2moe.core.events import Timeline
from d2moe.core.fileio import atomic_write
from d2moe.core.sizes import fmt_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NON_EXPERT_COLOR = "#b0b0b0"
STALL_FACE, STALL_EDGE = "#f2a7a7", "#b71c1c"
STEP_LINE, LAYER_LINE = "#222222", "#8a8a8a"
# Lane rectangles as (bottom, height) in data units; y ticks at their centres.
COMPUTE_Y, IO_Y = (0.12, 0.76), (1.12, 0.76)


def timeline_label(timeline: Timeline) -> str:
    """A default panel label from the metadata: 'backend / policy'."""
    meta = timeline.meta
    parts = [str(meta[k]) for k in ("backend", "policy") if meta.get(k) not in (None, "")]
    return " / ".join(parts) or "timeline"


def checked_labels(timelines: Sequence[Timeline],
                   labels: Sequence[str] | None) -> list[str]:
    """One label per timeline (default: `timeline_label`); a UserError if none or mismatched."""
    if not timelines:
        raise UserError("no timeline to plot", fix="pass at least one timeline")
    labels = list(labels) if labels is not None else [timeline_label(t) for t in timelines]
    if len(labels) != len(timelines):
        raise UserError(f"{len(labels)} labels for {len(timelines)} timelines", field="labels",
                        fix="give one label per timeline")
    return labels


def bit_colors(bits: Sequence[int]) -> dict[int, Any]:
    """A discrete, ordered colour per bit-width (viridis, dark = few bits, light = many)."""
    import matplotlib

    uniq = sorted(set(int(b) for b in bits))
    cmap = matplotlib.colormaps["viridis"]
    if len(uniq) == 1:
        return {uniq[0]: cmap(0.35)}
    return {b: cmap(x) for b, x in zip(uniq, np.linspace(0.0, 0.88, len(uniq)), strict=True)}


def save_png(fig: Figure, path: str | Path, *, dpi: int = 200) -> Path:
    """Render `fig` with the Agg canvas and write it atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    return path


def first_steps_window(cols: Sequence[EventColumns], n_steps: int) -> tuple[float, float]:
    """(start, end) in µs covering the first `n_steps` step rows of every timeline."""
    if n_steps < 1:
        raise UserError(f"first_steps must be >= 1, got {n_steps}", field="first_steps",
                        fix="pass a positive number of steps")
    lo, hi = np.inf, -np.inf
    for c in cols:
        rows = np.flatnonzero((c.kind == DECODE) | (c.kind == PREFILL))
        if rows.size == 0:
            continue
        rows = rows[np.argsort(c.start_us[rows], kind="stable")][:n_steps]
        lo, hi = min(lo, float(c.start_us[rows].min())), max(hi, float(c.end_us[rows].max()))
    if not np.isfinite(lo):
        return _full_window(cols)
    return lo, hi


def _full_window(cols: Sequence[EventColumns]) -> tuple[float, float]:
    spans = [c.step_span_us() for c in cols if len(c)]
    if not spans:
        return 0.0, 1.0
    return min(s for s, _ in spans), max(e for _, e in spans)


def caption(label: str, m: Metrics, timeline: Timeline) -> str:
    """One line under which a panel reads: policy, tokens/s, bubbles, exposed I/O, hit rate."""
    if m.decode_steps:
        speed = f"decode {m.decode_tokens_per_s:,.1f} tok/s"
    else:
        speed = f"prefill {m.prefill_tokens_per_s:,.1f} tok/s"
    bubbles = f"bubble I/O {m.io_bubble_pct:.0f}% · compute {m.compute_bubble_pct:.0f}%"
    parts = [label, speed, bubbles,
             f"exposed I/O {m.exposed_io_us / 1e3:,.2f} ms", f"hit {100 * m.hit_rate:.0f}%"]
    if m.bound_us > 0:
        parts.append(f"gap to bound {100 * m.gap_to_bound:.0f}%")
    budget = timeline.meta.get("budget_bytes")
    if isinstance(budget, (int, float)) and budget > 0:
        parts.append(f"budget {fmt_bytes(budget)}")
    return "  |  ".join(parts)


def _bars(c: EventColumns, rows: np.ndarray) -> list[tuple[float, float]]:
    s = c.start_us[rows] / 1e3
    return list(zip(s.tolist(), (c.end_us[rows] / 1e3 - s).tolist(), strict=True))


def _draw_panel(ax: Any, c: EventColumns, colors: dict[int, Any], lw: float,
                hatch_stalls: bool, max_ticks: int) -> None:
    """Draw one timeline's two lanes on `ax` (times already windowed, in ms on the axis)."""
    kind = c.kind
    edge = {"edgecolor": "white", "linewidth": lw}
    ax.broken_barh(_bars(c, kind == NON_EXPERT), COMPUTE_Y, facecolors=NON_EXPERT_COLOR, **edge)
    for bits, color in colors.items():
        has = c.bits_to == bits
        ax.broken_barh(_bars(c, (kind == RUN) & has), COMPUTE_Y, facecolors=color, **edge)
        ax.broken_barh(_bars(c, (kind == SUBSTITUTE) & has), COMPUTE_Y, facecolors=color,
                       hatch="xx", edgecolor="white", linewidth=lw)
        ax.broken_barh(_bars(c, (kind == LOAD) & has), IO_Y, facecolors=color, **edge)
        ax.broken_barh(_bars(c, (kind == PREFETCH) & has), IO_Y, facecolors=color,
                       hatch="....", edgecolor="white", linewidth=lw)
    # Hatching reads as noise on bars a few pixels wide: dense views get a solid fill.
    ax.broken_barh(_bars(c, kind == STALL), COMPUTE_Y, facecolors=STALL_FACE,
                   hatch="///" if hatch_stalls else None, edgecolor=STALL_EDGE, linewidth=0.0)
    ne_start = np.unique(c.start_us[kind == NON_EXPERT]) / 1e3
    steps = (kind == DECODE) | (kind == PREFILL)
    step_edges = np.unique(np.r_[c.start_us[steps], c.end_us[steps]]) / 1e3
    layer_starts = np.setdiff1d(ne_start, step_edges)
    # Layer starts: ticks in the gap between the lanes, where they hide no job; left out
    # when they would be closer than a few pixels (they would merge into a grey band).
    if layer_starts.size <= max_ticks:
        gap = (COMPUTE_Y[0] + COMPUTE_Y[1], IO_Y[0])
        ax.vlines(layer_starts, *gap, colors=LAYER_LINE, linewidth=0.6, zorder=3)
    ax.vlines(step_edges, 0.0, 2.0, colors=STEP_LINE, linewidth=1.1, alpha=0.85, zorder=3)
    ax.set_ylim(0.0, 2.0)
    ax.set_yticks([COMPUTE_Y[0] + COMPUTE_Y[1] / 2, IO_Y[0] + IO_Y[1] / 2], ["compute", "I/O"])
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)


def _step_labels(ax: Any, c: EventColumns, lo_ms: float, hi_ms: float) -> None:
    """Name the visible steps ('decode 3') above the panel when there are few of them."""
    steps = np.flatnonzero((c.kind == DECODE) | (c.kind == PREFILL))
    if steps.size == 0 or steps.size > 24:
        return
    for i in steps:
        s = max(c.start_us[i] / 1e3, lo_ms)
        e = min(c.end_us[i] / 1e3, hi_ms)
        if e <= s:
            continue
        name = "decode" if c.kind[i] == DECODE else "prefill"
        ax.text((s + e) / 2, 2.0, f"{name} {int(c.step[i])}", ha="center", va="bottom",
                fontsize=7, color="#444444", clip_on=False)


def plot_bubbles(timelines: Sequence[Timeline], path: str | Path, *,
                 labels: Sequence[str] | None = None, title: str | None = None,
                 window: tuple[float, float] | None = None, first_steps: int | None = None,
                 width_in: float = 14.0, dpi: int = 200) -> Path:
    """Write the bubble-timeline PNG of `timelines`, stacked on one shared time axis.

    `window` = (start_us, end_us) zooms in; `first_steps` = N shows the first N steps of
    every timeline. Captions report metrics of each whole timeline. Returns the path.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    labels = checked_labels(timelines, labels)
    cols = [event_columns(t) for t in timelines]
    metrics = [compute_metrics(t) for t in timelines]
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
        if not hi > lo:
            raise UserError(f"empty window {window}", field="window", fix="use start < end")
    elif first_steps is not None:
        lo, hi = first_steps_window(cols, first_steps)
    else:
        lo, hi = _full_window(cols)
    shown = [c.select((c.end_us >= lo) & (c.start_us <= hi)) for c in cols]
    jobs = (RUN, LOAD, PREFETCH)
    colors = bit_colors(np.concatenate([c.bits_to[np.isin(c.kind, jobs)] for c in shown]))
    # Thin white separators between jobs while a job is wide enough to afford one.
    n_jobs = max([int(np.isin(c.kind, (RUN, NON_EXPERT, STALL)).sum()) for c in shown] + [1])
    lw = 0.5 if n_jobs <= 150 else (0.25 if n_jobs <= 400 else 0.0)

    n = len(timelines)
    fig = Figure(figsize=(width_in, 0.9 + 1.45 * n), layout="constrained")
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    for ax, c, m, t, label in zip(axes, shown, metrics, timelines, labels, strict=True):
        _draw_panel(ax, c, colors, lw, hatch_stalls=n_jobs <= 400,
                    max_ticks=int(width_in * dpi / 6))
        _step_labels(ax, c, lo / 1e3, hi / 1e3)
        ax.set_title(caption(label, m, t), loc="left", fontsize=8.5, pad=11)
    pad = 0.004 * (hi - lo) / 1e3
    axes[-1].set_xlim(lo / 1e3 - pad, hi / 1e3 + pad)
    axes[-1].set_xlabel("time (ms)")
    handles = [Patch(facecolor=color, edgecolor="none", label=f"{b}-bit")
               for b, color in colors.items()]
    handles += [Patch(facecolor=NON_EXPERT_COLOR, label="non-expert"),
                Patch(facecolor=STALL_FACE, edgecolor=STALL_EDGE, hatch="////",
                      label="stall (compute waits on I/O)")]
    if any((c.kind == PREFETCH).any() for c in shown):
        handles.append(Patch(facecolor="#9e9e9e", edgecolor="white", hatch="....",
                             label="prefetch"))
    handles += [Line2D([], [], color=STEP_LINE, linewidth=1.1, label="step boundary"),
                Line2D([], [], color=LAYER_LINE, linewidth=0.8, marker="|", linestyle="none",
                       markersize=7, label="layer start")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 9),
               fontsize=8, frameon=False, handlelength=1.6)
    if window is not None or first_steps is not None:
        note = f"{lo / 1e3:,.2f}-{hi / 1e3:,.2f} ms shown; captions give whole-run metrics"
        title = f"{title}  ({note})" if title else note
    if title:
        fig.suptitle(title, fontsize=10.5)
    return save_png(fig, path, dpi=dpi)
