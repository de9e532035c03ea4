"""Figures from a sweep table (`d2moe plot`): budget curves, ablation bars, latency vs quality.

Each figure says where its numbers come from: `simulated (profile X, estimated|measured)` or
`measured`, read from the rows (`run_kind`, `profile`, `profile_source`). matplotlib is
imported inside the plotting functions only.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from d2moe.core.errors import UserError, bare

ABLATION_DEFAULT = ("ablate-base", "ablate+router", "ablate+mwq", "ablate+hebf", "d2moe")
QUALITY_COLUMNS = ("policy", "budget", "decode_tokens_per_s", "ppl")
BUDGET_COLUMNS = ("policy", "budget_bytes", "decode_tokens_per_s")
ABLATION_COLUMNS = ("policy", "budget", "decode_tokens_per_s")
NUMBER_COLUMNS = ("decode_tokens_per_s", "budget_bytes", "hit_rate", "oracle_hit_rate", "ppl")
_TABLE_FIX = "give table.jsonl or table.csv as `d2moe sweep` (or a benchmark) wrote it"
GIB = 2**30
MIB = 2**20


def load_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a table: JSON lines or CSV (numbers parsed).

    JSON lines are read by the sweep's own reader (`d2moe.sweep.table.read_rows`), a
    benchmark's rows too: a torn last line is skipped, a bad line elsewhere or a row that
    fails its `row_sha256` is an error. With a `cell_id` column, the last row per cell id
    wins (a resumed sweep's rerun)."""
    from d2moe.core.fileio import require_file
    from d2moe.sweep.table import read_rows

    path = require_file(path, fix="give table.jsonl or table.csv", what="a table")
    if path.suffix == ".csv":
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise UserError("not UTF-8 text, so not a CSV table", path=str(path),
                            fix=_TABLE_FIX) from None
        reader = csv.DictReader(text.splitlines())
        rows = []
        for r in reader:
            if None in r or None in r.values():  # DictReader's keys for extra/missing fields
                got = len(r) - (None in r) + len(r.get(None) or ()) - sum(
                    v is None for v in r.values())
                raise UserError(f"line {reader.line_num} has {got} fields, the header "
                                f"{len(reader.fieldnames or ())}", path=str(path),
                                fix="one value per column on every line (quote a value "
                                    "that holds a comma)")
            row = {k: _number(v) for k, v in r.items()}
            _check_row(row, path, f"line {reader.line_num}")
            rows.append(row)
    else:
        _check_json_lines(path)
        rows = read_rows(path, any_rows=True)[0]
        for i, row in enumerate(rows):
            _check_row(row, path, f"row {i + 1}")
    if any("cell_id" in r for r in rows):
        rows = list({str(r.get("cell_id", i)): r for i, r in enumerate(rows)}.values())
    if not rows:
        raise UserError("the table has no rows", path=str(path), fix="run `d2moe sweep` first")
    return rows


def _check_json_lines(path: Path) -> None:
    """A file whose first line is complete and no JSON object (an .npz, a YAML, a JSON
    document) is named as no table at all, not by that line (whose fix would be a repair).
    A first line cut short is left to `read_rows` (a torn row)."""
    with open(path, "rb") as f:
        head = f.readline(1 << 20)
    if not head.strip() or not head.endswith(b"\n") and head.lstrip().startswith(b"{"):
        return
    try:
        ok = isinstance(json.loads(head), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise UserError("not a JSON-lines or CSV table (line 1 is not a JSON object)",
                        path=str(path), fix=_TABLE_FIX)


def _check_row(row: dict[str, Any], path: Path, where: str) -> None:
    """Values the plots read must mean what they say: rates, sizes and rates of hits are
    numbers (or empty), a budget is one `--budget` would take (not negative)."""
    from d2moe.core.sizes import parse_budget

    for column in NUMBER_COLUMNS:
        value = row.get(column)
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, (int, float))):
            raise UserError(f"{where}: {value!r} is not a number", path=str(path),
                            field=column, fix="write a number there, or leave it empty")
        if column == "budget_bytes" and value is not None and value < 0:
            raise UserError(f"{where}: {value!r} is negative", path=str(path), field=column,
                            fix="write the budget in bytes, >= 0")
    budget = row.get("budget")
    if budget is not None:
        try:
            parse_budget(str(budget), 1)
        except UserError as exc:
            raise UserError(f"{where}: {bare(exc)}", path=str(path), field="budget",
                            fix="write the budget as --budget takes it: 6GiB, 40% or 0.4"
                            ) from None


def _number(text: str | None) -> Any:
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def source_label(row: dict[str, Any]) -> str | None:
    """`measured`, `simulated (profile X, estimated|measured)`, or None when unknown."""
    kind = row.get("run_kind") or row.get("source")
    if kind == "measured":
        return "measured"
    profile = row.get("profile")
    if not profile:
        return None
    source = row.get("profile_source") or "source unknown"
    return f"simulated (profile {Path(str(profile)).stem}, {source})"


def _where(table: str | Path | None) -> str | None:
    """The table's path for an error message (None: rows not read from a file)."""
    return str(table) if table else None


def _label(rows: Sequence[dict[str, Any]], override: str = "",
           table: str | Path | None = None) -> str:
    if override:
        return override
    labels = sorted({lab for r in rows if (lab := source_label(r))})
    if not labels:
        raise UserError("the rows do not say whether they are simulated or measured",
                        path=_where(table), field="label",
                        fix="add profile + profile_source (or run_kind: measured) columns, "
                            "or pass --label")
    return "; ".join(labels)


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _require_all(asked: Sequence[str], have: Sequence[str], says: str, *,
                 table: str | Path | None, field: str, fix: str) -> None:
    """A UserError naming what was `asked` for that the table lacks (`says`, its `{}` the
    names), and what it has."""
    missing = [a for a in asked if a not in have]
    if missing:
        raise UserError(says.format(", ".join(missing)) + f" (it has: {', '.join(have) or 'none'})",
                        path=_where(table), field=field, fix=fix)


def _require_columns(rows: Sequence[dict[str, Any]], needed: Sequence[str],
                     table: str | Path | None) -> None:
    """The columns a figure needs must be in the table."""
    have = _columns(rows)
    _require_all(needed, have, "the table lacks column(s) {}", table=table,
                 field=next((c for c in needed if c not in have), ""),
                 fix=f"give a table with columns {', '.join(needed)}")


def require_policies(rows: Sequence[dict[str, Any]], policies: Sequence[str],
                     table: str | Path | None) -> None:
    """Every policy asked for by name must be in the table."""
    _require_all(policies, _policies(rows), "policy {} is not in the table", table=table,
                 field="policies", fix="pass --policies naming policies the table holds")


def keep_budgets(rows: Sequence[dict[str, Any]], budgets: Sequence[str],
                 table: str | Path | None = None) -> list[dict[str, Any]]:
    """The rows of `budgets` (as written in the grid; empty: all rows). A budget the table
    does not hold is a UserError that lists the ones it does."""
    if not budgets:
        return list(rows)
    have = list(dict.fromkeys(str(r.get("budget")) for r in rows if "budget" in r))
    _require_all(budgets, have, "budget {} is not in the table", table=table, field="budgets",
                 fix="pass --budgets as the table writes them (the grid's text)")
    return [r for r in rows if str(r.get("budget")) in budgets]


def _ok(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that ran (no status column counts as ran) and have a decode rate."""
    return [r for r in rows if r.get("status", "ok") == "ok"
            and _finite(r.get("decode_tokens_per_s"))]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def _style(ax: Any) -> None:
    ax.grid(alpha=0.3, linewidth=0.5)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _budget_unit(rows: Sequence[dict[str, Any]]) -> tuple[str, int]:
    """GiB, or MiB when every budget is under 0.1 GiB (a small model stays readable)."""
    top = max((r["budget_bytes"] for r in rows if _finite(r.get("budget_bytes"))), default=0)
    return ("GiB", GIB) if top >= 0.1 * GIB else ("MiB", MIB)


def _groups(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[(str(r.get("model") or "model"), str(r.get("profile") or "measured"))].append(r)
    return dict(sorted(out.items()))


def _mean_by(rows: Sequence[dict[str, Any]], xkey: str, ykey: str) -> tuple[list, list]:
    """(x, mean y) per distinct x, sorted: traces of one model averaged."""
    acc: dict[float, list[float]] = defaultdict(list)
    for r in rows:
        if _finite(r.get(xkey)) and _finite(r.get(ykey)):
            acc[float(r[xkey])].append(float(r[ykey]))
    xs = sorted(acc)
    return xs, [sum(acc[x]) / len(acc[x]) for x in xs]


def _policies(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(r.get("policy")) for r in rows))


# 20 distinguishable colours: matplotlib's default ten, then ten darker ones
COLORS = tuple(f"C{i}" for i in range(10)) + (
    "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#31a354", "#e6550d",
    "#756bb1", "#636363")


def line_style(i: int) -> dict[str, Any]:
    """A distinct (colour, marker, dash) per line index."""
    markers = "osD^vP*Xh<>"
    return {"color": COLORS[i % len(COLORS)], "marker": markers[i % len(markers)],
            "linestyle": ("-", "--", ":", "-.")[(i // len(COLORS)) % 4]}


def _kind(row: dict[str, Any]) -> str:
    """`measured` or `simulated` (rows without run_kind are simulated sweep rows)."""
    return "measured" if (row.get("run_kind") or row.get("source")) == "measured" \
        else "simulated"


def plot_budget(rows: Sequence[dict[str, Any]], out: str | Path, *, label: str = "",
                policies: Sequence[str] = (), log_y: bool = True, dpi: int = 150,
                table: str | Path | None = None) -> list[Path]:
    """Decode tokens/s against the memory budget per policy: one PNG per (model, profile),
    plus a hit-rate panel (each policy against Belady's oracle) where the table has it.
    `policies` picks and orders the lines (empty: all). A table with measured and simulated
    rows gets one column of panels each, a policy in the same style in both. `table`, the
    file the rows came from, is named in errors."""
    from matplotlib.figure import Figure

    from d2moe.analysis.timeline_plot import save_png

    _require_columns(rows, BUDGET_COLUMNS, table)
    require_policies(rows, policies, table)
    ok = [r for r in _ok(rows) if _finite(r.get("budget_bytes"))
          and (not policies or r.get("policy") in policies)]
    if not ok:
        raise UserError("no finished cell with a budget and a decode rate to plot",
                        path=_where(table), field="status",
                        fix="check the table's status and message columns (and --policies)")
    paths = []
    for (model, profile), group in _groups(ok).items():
        unit, scale = _budget_unit(group)
        kinds = sorted({_kind(r) for r in group})  # measured before simulated
        names = _policies(group)
        order = {p: i for i, p in enumerate(policies)}
        names.sort(key=lambda n: (order.get(n, len(order)), n))
        styles = {n: line_style(i) for i, n in enumerate(names)}
        oracle = any(_finite(r.get("oracle_hit_rate")) for r in group)
        fig = Figure(figsize=(5.0 * len(kinds) + 2.5, 6.4 if oracle else 3.8),
                     layout="constrained")
        grid = fig.subplots(2 if oracle else 1, len(kinds), squeeze=False, sharey="row")
        for col, kind in enumerate(kinds):
            mine = [r for r in group if _kind(r) == kind]
            _budget_panels(grid[:, col], mine, names, styles, scale, unit, log_y,
                           label=col == 0)
            if len(kinds) > 1:
                grid[0, col].set_title(_label(mine, label, table), fontsize=9)
        fig.legend(loc="outside right upper", fontsize=8, frameon=False)
        traces = len({r.get("trace") for r in group})
        note = f", mean over {traces} traces" if traces > 1 else ""
        fig.suptitle(f"{model}: decode tokens/s against memory budget{note}"
                     + ("" if len(kinds) > 1 else f"\n{_label(group, label, table)}"),
                     fontsize=10)
        name = f"budget-{_slug(model)}-{_slug(Path(profile).stem)}.png"
        paths.append(save_png(fig, Path(out) / name, dpi=dpi))
    return paths


def _budget_panels(axes: Any, rows: Sequence[dict[str, Any]], names: Sequence[str],
                   styles: dict[str, dict[str, Any]], scale: int, unit: str, log_y: bool, *,
                   label: bool) -> None:
    """tokens/s (and hit rate against the oracle, when a second axis is given) per policy;
    a policy whose curve equals an earlier one's is labelled so (its line lies under it)."""
    drawn: dict[tuple, str] = {}  # (xs, ys) of each curve drawn -> its policy
    for name in names:
        mine = [r for r in rows if r.get("policy") == name]
        if not mine:
            continue
        xs, ys = _mean_by(mine, "budget_bytes", "decode_tokens_per_s")
        same = drawn.setdefault((tuple(xs), tuple(ys)), name)
        shown = name if same == name else f"{name} (= {same})"
        axes[0].plot([x / scale for x in xs], ys, linewidth=1.3, markersize=4,
                     label=shown if label else None, **styles[name])
        if len(axes) > 1:
            xs, ys = _mean_by(mine, "budget_bytes", "hit_rate")
            axes[1].plot([x / scale for x in xs], [100 * y for y in ys], linewidth=1.3,
                         markersize=4, **styles[name])
    axes[0].set_ylabel("decode tokens/s" + (" (log)" if log_y else ""))
    if log_y:
        axes[0].set_yscale("log")
    else:
        axes[0].set_ylim(bottom=0)
    if len(axes) > 1:
        oracle = [r for r in rows if _finite(r.get("oracle_hit_rate"))]
        xs, ys = _mean_by(oracle, "budget_bytes", "oracle_hit_rate")
        axes[1].plot([x / scale for x in xs], [100 * y for y in ys], color="black",
                     linestyle="--", marker="s", linewidth=1.6,
                     label="Belady oracle" if label else None)
        axes[1].set_ylabel("expert hit rate (%)")
        axes[1].set_ylim(0, 101)
    for ax in axes:
        ax.set_xlabel(f"expert memory budget ({unit})")
        ax.set_xlim(left=0)
        _style(ax)


def plot_ablation(rows: Sequence[dict[str, Any]], out: str | Path, *,
                  policies: Sequence[str] = ABLATION_DEFAULT, label: str = "",
                  dpi: int = 150, table: str | Path | None = None) -> Path:
    """Bars of decode tokens/s for `policies` in order, grouped by budget; one panel per
    (model, profile), all in one figure (ablation.png). Missing policies are left out.
    `table`, the file the rows came from, is named in errors."""
    from matplotlib.figure import Figure

    from d2moe.analysis.timeline_plot import save_png

    _require_columns(rows, ABLATION_COLUMNS, table)
    wanted = [p for p in policies if p]
    present = [p for p in wanted if any(r.get("policy") == p for r in rows)]
    if not present:
        raise UserError(f"none of {', '.join(wanted)} is in the table (it has: "
                        f"{', '.join(_policies(rows))})", path=_where(table), field="policies",
                        fix="pass --policies naming policies the sweep ran")
    rows = [r for r in rows if r.get("policy") in present]
    groups = {k: g for k, g in _groups(rows).items() if _ok(g)}
    if not groups:
        raise UserError(f"no cell of {', '.join(present)} finished with a decode rate",
                        path=_where(table), field="status",
                        fix="check the table's status and message columns")
    fig = Figure(figsize=(max(6.0, 1.2 + 0.45 * len(present) * _max_budgets(groups)),
                          3.4 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
    colors = {p: COLORS[i % len(COLORS)] for i, p in enumerate(present)}
    width = 0.8 / len(present)
    for ax, ((model, _profile), group) in zip(axes, groups.items(), strict=True):
        budgets = sorted({r.get("budget") for r in group},
                         key=lambda b: _budget_key(group, b))
        labelled: set[str] = set()
        for j, policy in enumerate(present):
            for i, budget in enumerate(budgets):
                cell = [r for r in group if r.get("policy") == policy and r.get("budget") == budget]
                x = i + (j - (len(present) - 1) / 2) * width
                ran = _ok(cell)
                if ran:
                    y = sum(r["decode_tokens_per_s"] for r in ran) / len(ran)
                    ax.bar(x, y, width, color=colors[policy],
                           label=None if policy in labelled else policy)
                    labelled.add(policy)
                    ax.annotate(f"{y:,.3g}", (x, y), ha="center", va="bottom", fontsize=7)
                elif cell:
                    fit = any(r.get("status") == "does-not-fit" for r in cell)
                    ax.annotate("n/f" if fit else "err", (x, 0), ha="center", va="bottom",
                                fontsize=7, color="#c62828")
        ax.set_xticks(range(len(budgets)), [f"budget {b}" for b in budgets])
        ax.set_xlim(-0.5, len(budgets) - 0.5)
        ax.set_ylabel("decode tokens/s")
        ax.set_ylim(bottom=0)
        _style(ax)
        ax.legend(fontsize=8, frameon=False, ncols=min(len(present), 5))
        ax.set_title(f"{model}: ablation (n/f: did not fit, err: error)\n"
                     f"{_label(group, label, table)}",
                     fontsize=10)
    return save_png(fig, Path(out) / "ablation.png", dpi=dpi)


def _max_budgets(groups: dict[tuple[str, str], list[dict[str, Any]]]) -> int:
    return max(len({r.get("budget") for r in g}) for g in groups.values())


def _budget_key(rows: Sequence[dict[str, Any]], budget: Any) -> tuple[float, str]:
    sizes = [r["budget_bytes"] for r in rows
             if r.get("budget") == budget and _finite(r.get("budget_bytes"))]
    return (min(sizes) if sizes else math.inf, str(budget))


def plot_quality(rows: Sequence[dict[str, Any]], out: str | Path, *, label: str = "",
                 policies: Sequence[str] = (), dpi: int = 150,
                 table: str | Path | None = None) -> Path:
    """Latency (ms per decode token) against perplexity, one line per policy (`policies`,
    in order; empty: all), each point marked with its budget (quality.png). `table`, the
    file the rows came from, is named in errors."""
    from matplotlib.figure import Figure

    from d2moe.analysis.timeline_plot import save_png

    _require_columns(rows, QUALITY_COLUMNS, table)
    require_policies(rows, policies, table)
    if policies:
        rows = sorted((r for r in rows if r.get("policy") in policies),
                      key=lambda r: list(policies).index(r["policy"]))
    good = [r for r in _ok(rows) if r["decode_tokens_per_s"] > 0 and _finite(r.get("ppl"))]
    if not good:
        raise UserError("no row has a positive decode rate and a perplexity",
                        path=_where(table), field="ppl",
                        fix="check the table's values")
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.subplots()
    for policy in _policies(good):
        pts = sorted((1e3 / r["decode_tokens_per_s"], float(r["ppl"]), r.get("budget"))
                     for r in good if r.get("policy") == policy)
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linewidth=1.2,
                       label=policy)[0]
        for x, y, budget in pts:
            ax.annotate(str(budget), (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=line.get_color())
    ax.set_xlabel("latency (ms per decode token)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_xlim(left=0)
    _style(ax)
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(f"latency against quality (points: budget)\n{_label(good, label, table)}",
                 fontsize=10)
    return save_png(fig, Path(out) / "quality.png", dpi=dpi)
