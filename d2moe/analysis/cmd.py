"""`d2moe timeline`: summarize, plot and export saved timelines (`events.npz` / `.jsonl` from
`simulate`, `run`, `validate`, `serve`), so timelines of different runs (a real one and a
simulated one, two policies, two machines) can be compared after the fact. Reads Event rows
only, as every metric and plot does."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2moe.core.cliargs import add_fields, check_at_least, from_args, split_list
from d2moe.core.errors import UserError
from d2moe.core.events import Timeline, load_timeline
from d2moe.core.sizes import fmt_bytes

META_SHOWN = ("backend", "policy", "model", "budget_bytes", "device", "profile", "engine",
              "sync_rows")  # per file, in `info`, when present


@dataclass(frozen=True)
class TimelinePlotConfig:
    """Options of `d2moe timeline plot` (the CLI is built from these fields)."""

    labels: str = field(default="", metadata={
        "help": "one label per file, comma-separated (empty: each file's backend / policy)",
        "metavar": "L1,L2"})
    first_step: int = field(default=1, metadata={
        "help": "the first step shown (0: the prefill; 1: the first decode step)"})
    steps: int = field(default=2, metadata={
        "help": "steps shown from --first-step, each timeline shifted to start them at 0 on "
                "one time axis (0: every step, on each timeline's own clock)"})
    title: str = field(default="", metadata={
        "help": "figure title (empty: which steps are shown and what the captions measure)"})
    out: str = field(default="out/timeline.png", metadata={"help": "PNG to write"})


@dataclass(frozen=True)
class TimelineChromeConfig:
    """Options of `d2moe timeline chrome`."""

    labels: str = field(default="", metadata={
        "help": "one label per file, comma-separated (empty: each file's backend / policy)",
        "metavar": "L1,L2"})
    out: str = field(default="out/chrome.json", metadata={
        "help": "Chrome/Perfetto trace JSON to write (open at ui.perfetto.dev)"})


def register(subparsers: Any) -> None:
    """Add the `timeline` verb with its `info`, `plot` and `chrome` actions."""
    parser = subparsers.add_parser(
        "timeline", help="summarize, plot or export saved timelines",
        description="Timelines saved by simulate, run, validate and serve (events.npz or "
                    ".jsonl; docs/formats.md): their metrics, their bubble timelines stacked "
                    "on one time axis, or a Chrome/Perfetto trace of them.")
    actions = parser.add_subparsers(dest="timeline_action", metavar="ACTION")
    parser.set_defaults(func=lambda _args: (parser.print_help(), 2)[1])
    files = {"nargs": "+", "metavar": "FILE", "help": "timeline files (.npz or .jsonl)"}

    info = actions.add_parser("info", help="metrics of each timeline, one row per file",
                              description="Print each file's metadata and one row of "
                                          "metrics per file: tokens/s, lane bubbles, exposed "
                                          "I/O, hit rate, bytes loaded, peak residency.")
    info.add_argument("files", **files)
    info.set_defaults(func=_info)

    plot = actions.add_parser("plot", help="bubble timelines of the files on one time axis",
                              description="Stacked bubble timelines (I/O lane above, compute "
                                          "below, coloured by bit-width; hatched: compute "
                                          "waiting on I/O), by default the first two decode "
                                          "steps of each file from 0.")
    plot.add_argument("files", **files)
    add_fields(plot, TimelinePlotConfig)
    plot.set_defaults(func=_plot)

    chrome = actions.add_parser("chrome", help="a Chrome/Perfetto trace of the files",
                                description="One process per file, one thread per lane, "
                                            "evictions as instant events, a counter track of "
                                            "resident bytes.")
    chrome.add_argument("files", **files)
    add_fields(chrome, TimelineChromeConfig)
    chrome.set_defaults(func=_chrome)


def _load(paths: list[str]) -> list[Timeline]:
    return [load_timeline(p) for p in paths]


def _labels(text: str, timelines: list[Timeline]) -> list[str] | None:
    """--labels, one per file (None: the default labels)."""
    labels = split_list(text, "labels", example="--labels real,sim", allow_none=True)
    if labels and len(labels) != len(timelines):
        raise UserError(f"{len(labels)} labels for {len(timelines)} files", field="labels",
                        fix="give one label per file, or none")
    return labels or None


def info_text(paths: list[str], timelines: list[Timeline]) -> str:
    """Each file's metadata line, then the metrics table (one row per file; a serving run's
    in a table of request latencies)."""
    from d2moe.analysis import compute_metrics, format_table, metrics_row
    from d2moe.analysis.timeline_plot import timeline_label

    lines = []
    for path, t in zip(paths, timelines, strict=True):
        shown = ", ".join(f"{k} {fmt_bytes(t.meta[k]) if k == 'budget_bytes' else t.meta[k]}"
                          for k in META_SHOWN if k in t.meta)
        steps = len({e.step for e in t.events if e.lane == "step"})
        lines.append(f"{path}: {len(t.events)} events, {steps} steps" +
                     (f"; {shown}" if shown else ""))
    # a serving run's lanes idle while requests have yet to arrive: its figures are the
    # requests' latencies (d2moe serve's table), not bubbles
    served = [any(e.lane == "request" for e in t.events) for t in timelines]
    rows = [metrics_row(f"{i + 1}: {timeline_label(t)}", compute_metrics(t))
            for i, t in enumerate(timelines) if not served[i]]
    text = "\n".join(lines) + ("\n\n" + format_table(rows) if rows else "")
    if any(served):
        from d2moe.serve.metrics import format_serve_table, serve_metrics

        text += "\n\nserved requests:\n" + format_serve_table(
            [(f"{i + 1}: {timeline_label(t)}", serve_metrics(t))
             for i, t in enumerate(timelines) if served[i]])
    return text


def _info(args: argparse.Namespace) -> int:
    print(info_text(args.files, _load(args.files)))
    return 0


def plot_timelines(paths: list[str], cfg: TimelinePlotConfig) -> Path:
    """The PNG of `cfg` for the timeline files `paths`."""
    from d2moe.analysis.fidelity import from_step
    from d2moe.analysis.timeline_plot import plot_bubbles

    check_at_least(cfg.first_step, 0, "first_step")
    check_at_least(cfg.steps, 0, "steps", note="0: every step")
    timelines = _load(paths)
    labels = _labels(cfg.labels, timelines)
    if cfg.steps:
        cropped = []
        for path, t in zip(paths, timelines, strict=True):
            part = from_step(t, cfg.first_step, cfg.steps)
            if not part.events:
                last = max((e.step for e in t.events), default=-1)
                if last < 0:
                    raise UserError("no steps here: an empty timeline", path=path,
                                    fix="pass the timeline of a run that took steps")
                raise UserError(f"no step {cfg.first_step} here (its last step is {last})",
                                path=path, field="first-step",
                                fix=f"pass --first-step 0..{last}, or --steps 0")
            cropped.append(part)
        timelines = cropped
    title = cfg.title or (f"steps {cfg.first_step}-{cfg.first_step + cfg.steps - 1} of each "
                          "file, from 0; captions: the metrics of those steps"
                          if cfg.steps else "whole timelines; captions: whole-run metrics")
    return plot_bubbles(timelines, cfg.out, labels=labels, title=title)


def _plot(args: argparse.Namespace) -> int:
    print(f"wrote {plot_timelines(args.files, from_args(TimelinePlotConfig, args))}")
    return 0


def _chrome(args: argparse.Namespace) -> int:
    from d2moe.analysis import export_chrome

    cfg = from_args(TimelineChromeConfig, args)
    timelines = _load(args.files)
    print(f"wrote {export_chrome(timelines, cfg.out, labels=_labels(cfg.labels, timelines))}")
    return 0
