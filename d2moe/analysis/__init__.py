"""Metrics, bubble timelines, budget curves, tables and Chrome/Perfetto export of timelines.

These read `d2moe.core.events.Event` rows only; besides them, the oracle residency bound
(`oracle.py`) reads a trace's steps and the sweep figures (`sweep_plots.py`) a sweep table's
rows. Plotting imports matplotlib lazily, inside the plotting functions.
"""

from d2moe.analysis.budget_plot import plot_resident
from d2moe.analysis.chrome import export_chrome
from d2moe.analysis.metrics import Metrics, compare, compute_metrics, resident_curve
from d2moe.analysis.tables import format_table, metrics_row
from d2moe.analysis.timeline_plot import plot_bubbles

__all__ = [
    "Metrics", "compare", "compute_metrics", "export_chrome", "format_table", "metrics_row",
    "plot_bubbles", "plot_resident", "resident_curve",
]
