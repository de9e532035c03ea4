"""`d2moe sweep GRID.yaml` (a resumable grid of simulations) and `d2moe plot` (its figures)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2moe.analysis.sweep_plots import ABLATION_DEFAULT
from d2moe.core.cliargs import add_fields, from_args, split_list
from d2moe.sweep.runner import SweepConfig

PLOTS = ("budget", "ablation", "quality")


@dataclass(frozen=True)
class PlotConfig:
    """Options of `d2moe plot` (the CLI is built from these fields)."""

    out: str = field(default="", metadata={
        "help": "output directory (empty: the table's directory)", "metavar": "DIR"})
    policies: str = field(default="", metadata={
        "help": "the policies to draw, in order, each in the table (empty: budget and quality "
                "draw every policy, ablation those of the chain " + ",".join(ABLATION_DEFAULT)
                + " the table has)", "metavar": "P1,P2"})
    budgets: str = field(default="", metadata={
        "help": "only these budgets, as written in the grid, each in the table (empty: all)",
        "metavar": "B1,B2"})
    linear: bool = field(default=False, metadata={
        "help": "budget: a linear tokens/s axis (default: logarithmic, so low budgets show)"})
    label: str = field(default="", metadata={
        "help": "where the numbers come from, when the table does not say (e.g. measured); "
                "empty: from the table's profile_source or run_kind columns"})


def register(subparsers: Any) -> None:
    """Add the `sweep` and `plot` verbs."""
    p = subparsers.add_parser(
        "sweep", help="simulate a grid of policies x budgets x profiles x traces (resumable)",
        description="Simulate every cell (trace, profile, budget, policy) of GRID.yaml in "
                    "parallel and append one row per finished cell to OUT/table.jsonl; "
                    "rerunning skips the cells already there. Writes OUT/table.csv at the end. "
                    "Grid format: docs/sweep.md.")
    p.add_argument("grid", metavar="GRID.yaml", help="the grid file (docs/sweep.md)")
    add_fields(p, SweepConfig)
    p.set_defaults(func=_sweep, sigterm_unwinds=False)  # SIGTERM ends it at once (cli.py)

    q = subparsers.add_parser(
        "plot", help="figures from a sweep table: budget curves, ablation bars, latency vs ppl",
        description="budget: decode tokens/s against memory budget per policy, one PNG per "
                    "(model, profile), with hit rates against Belady's oracle when present; "
                    "ablation: bars of decode tokens/s for --policies in order; quality: "
                    "latency against perplexity from a table with columns policy, budget, "
                    "decode_tokens_per_s, ppl.")
    q.add_argument("kind", choices=PLOTS, help="which figure")
    q.add_argument("table", metavar="TABLE", help="table.jsonl or table.csv")
    add_fields(q, PlotConfig)
    q.set_defaults(func=_plot)


def _sweep(args: argparse.Namespace) -> int:
    """Run the grid; exit 2 (a UserError: every error row is one) when every cell that ran
    failed, and name the first failure whenever any did."""
    import sys

    from d2moe.core.errors import UserError
    from d2moe.sweep.runner import run_sweep

    result = run_sweep(args.grid, from_args(SweepConfig, args))
    print(result.summary())
    if result.all_failed:
        raise UserError(f"every cell that ran failed ({sum(result.ran.values())}); the first: "
                        f"{result.first_error}", path=args.grid)
    if result.error_note():
        print(f"note: {result.error_note()}", file=sys.stderr)
    return 0


def _plot(args: argparse.Namespace) -> int:
    files = make_plots(args.kind, args.table, from_args(PlotConfig, args))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def make_plots(kind: str, table: str | Path, cfg: PlotConfig) -> list[Path]:
    """Draw one kind of figure from a table; the PNGs written."""
    from d2moe.analysis.sweep_plots import (
        keep_budgets,
        load_table,
        plot_ablation,
        plot_budget,
        plot_quality,
        require_policies,
    )

    keep = split_list(cfg.budgets, "budgets", example="--budgets 20%,40%", allow_none=True)
    names = split_list(cfg.policies, "policies", example="--policies fifo,hebf",
                       allow_none=True)
    rows = keep_budgets(load_table(table), keep, table)
    require_policies(rows, names, table)  # named ones must be there, for every kind
    out = Path(cfg.out) if cfg.out else Path(table).parent
    if kind == "budget":
        return plot_budget(rows, out, label=cfg.label, policies=names, log_y=not cfg.linear,
                           table=table)
    if kind == "ablation":
        return [plot_ablation(rows, out, policies=names or ABLATION_DEFAULT, label=cfg.label,
                              table=table)]
    return [plot_quality(rows, out, label=cfg.label, policies=names, table=table)]
