"""Plain fixed-width text tables with units in the headers, for the CLI's summaries."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from d2moe.analysis.metrics import Metrics

MIB = 2**20


def metrics_row(name: str, metrics: Metrics) -> dict[str, Any]:
    """The standard summary row: decode tok/s (prefill when there is no decode), bubbles, I/O."""
    m = metrics
    speed = m.decode_tokens_per_s if m.decode_steps else m.prefill_tokens_per_s
    return {
        "run": name,
        "tok/s": speed,
        "total ms": m.total_us / 1e3,
        "bubble io %": m.io_bubble_pct,
        "bubble compute %": m.compute_bubble_pct,
        "exposed io ms": m.exposed_io_us / 1e3,
        "hit %": 100.0 * m.hit_rate,
        "loaded MiB": m.bytes_loaded / MIB,
        "peak MiB": m.peak_resident_bytes / MIB,
        "gap to bound %": 100.0 * m.gap_to_bound,
    }


def _decimals(values: list[float]) -> int:
    """One precision per column: fewer decimals for larger magnitudes."""
    finite = [abs(v) for v in values if math.isfinite(v)]
    top = max(finite, default=0.0)
    return 0 if top >= 1000 else 1 if top >= 10 else 2 if top >= 1 or top == 0 else 3


def _cell(value: Any, decimals: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{decimals}f}" if math.isfinite(value) else str(value)
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows as a fixed-width table: numbers right-aligned with one precision per column.

    `columns` defaults to the keys of the rows in first-seen order; a missing cell is '-'.
    """
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        columns = list(seen)
    table = [list(columns)]
    numeric = []
    for col in columns:
        vals = [row.get(col) for row in rows]
        floats = [v for v in vals if isinstance(v, float)]
        dec = _decimals(floats)
        table_col = [_cell(v, dec) for v in vals]
        numeric.append(all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                           for v in vals))
        for i, cell in enumerate(table_col, start=1):
            if len(table) <= i:
                table.append([])
            table[i].append(cell)
    widths = [max(len(r[j]) for r in table) for j in range(len(columns))]

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if num else c.ljust(w)
               for c, w, num in zip(cells, widths, numeric, strict=True)]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(table[0]), rule, *(line(r) for r in table[1:])])


def files_summary(files: Sequence[str], out: str) -> str:
    """`files` named relative to `out`, those that differ only in a policy or budget
    grouped with a `*` (events-real-*.npz)."""
    groups: dict[str, None] = {}
    for f in files:
        rel = str(Path(f).relative_to(out)) if Path(f).is_relative_to(out) else f
        groups[re.sub(r"(events-(?:real|sim)-|timeline-)[^/]*?(\.\w+)$", r"\1*\2", rel)] = None
    return ", ".join(groups)
