"""`d2moe experts stats`: offline expert importance and similarity for System 2 policies.

With a model (default `tiny`): calibration text through the model, similarity of the experts'
outputs (`calibration.py`), written beside the store. With `--trace FILE`: the routing proxy
for models without weights (`from_trace.py`). Prints per layer the most and least important
expert and the mean off-diagonal similarity.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2moe.core.cliargs import add_fields, from_args, model_field
from d2moe.core.errors import UserError
from d2moe.core.fileio import check_outside_store
from d2moe.experts.measures import off_diagonal_mean
from d2moe.experts.store import STATS_FILE, resolve, save_stats
from d2moe.policies.stats import ExpertStats

WEIGHTS = ("store", "model")


@dataclass(frozen=True)
class StatsConfig:
    """Options of `d2moe experts stats` (the CLI is built from these fields)."""

    model: str = model_field()
    store: str = field(default="", metadata={
        "help": "nested store whose experts (at its highest bits) are compared, and beside "
                "which the statistics are written; empty: for tiny, the store `d2moe run` "
                "builds into the cache directory"})
    weights: str = field(default="store", metadata={
        "help": "store (dequantized at the store's highest bits, what the executor serves) "
                "or model (the checkpoint's own float experts)"})
    trace: str = field(default="", metadata={
        "help": "a trace .npz instead of a model: importance from its routing and the "
                "routing proxy of similarity (for specs without weights); empty: from --model",
        "metavar": "FILE"})
    calib_kib: int = field(default=32, metadata={
        "help": "KiB of the corpus's training split to calibrate on"})
    sample_tokens: int = field(default=1024, metadata={
        "help": "tokens per layer every expert runs on to compare outputs"})
    ctx: int = field(default=256, metadata={"help": "tokens per calibration window"})
    batch: int = field(default=8, metadata={"help": "windows per forward"})
    out: str = field(default="", metadata={
        "help": "output file; empty: <store>/expert_stats.json (with --trace: beside the "
                "trace, t.npz -> t.expert_stats.json)", "metavar": "FILE"})
    progress: bool = field(default=True, metadata={"help": "progress bar on a terminal"})


def register(subparsers: Any) -> None:
    """Add the `experts` verb with its `stats` action."""
    parser = subparsers.add_parser(
        "experts", help="offline expert statistics (importance, similarity)",
        description="Offline knowledge about experts that System 2 policies use.")
    actions = parser.add_subparsers(dest="experts_action", metavar="ACTION")
    parser.set_defaults(func=lambda _args: (parser.print_help(), 2)[1])
    p = actions.add_parser(
        "stats", help="compute expert importance and similarity",
        description="Importance (routed-token share x mean router weight, per layer max 1) "
                    "and similarity (mean per-token cosine of the experts' outputs on "
                    "calibration text from the corpus's training split; with --trace, the "
                    "cosine of the experts' router-weight columns, a proxy). Writes "
                    "expert_stats.json (checksummed) and prints a per-layer summary.")
    add_fields(p, StatsConfig)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    stats, path = compute_stats(from_args(StatsConfig, args))
    print(summary_table(stats))
    print(f"wrote {path}")
    return 0


def compute_stats(cfg: StatsConfig) -> tuple[ExpertStats, Path]:
    """Compute the statistics `cfg` asks for and write them; returns them and the file."""
    if cfg.trace:
        from d2moe.experts.from_trace import stats_from_trace
        from d2moe.traces import load_trace

        trace = Path(cfg.trace)
        out = Path(cfg.out) if cfg.out else trace.with_name(f"{trace.stem}.{STATS_FILE}")
        check_outside_store(resolve(out), field="out")  # before the work
        stats = stats_from_trace(load_trace(cfg.trace))
        return stats, save_stats(out, stats)
    if cfg.weights not in WEIGHTS:
        raise UserError(f"unknown weights {cfg.weights!r}", field="weights",
                        fix=f"use {' or '.join(WEIGHTS)}")
    store = _store_path(cfg)
    if not cfg.out and store is None:
        raise UserError("nowhere to write: no store to write beside", field="out",
                        fix="pass --out FILE or --store DIR")
    out = Path(cfg.out) if cfg.out else store / STATS_FILE
    check_outside_store(resolve(out), field="out")  # before minutes of calibration
    stats = _from_model(cfg, store)
    return stats, save_stats(out, stats)


def _store_path(cfg: StatsConfig) -> Path | None:
    from d2moe.model.load import check_model_ref

    check_model_ref(cfg.model)  # a bad --model is named before a missing store
    if cfg.store:
        return Path(cfg.store)
    if cfg.model == "tiny":
        from d2moe.core.sizes import QuantLayout
        from d2moe.executor.setup import tiny_store

        return tiny_store(QuantLayout())
    if cfg.weights == "store":
        raise UserError("no store given for this model", field="store",
                        fix=f"d2moe quantize --model {cfg.model} --out STORE, then --store "
                            "STORE (or --weights model --out FILE)")
    return None


def _from_model(cfg: StatsConfig, store: Path | None) -> ExpertStats:
    from d2moe.experts.calibration import calibration_ids, stats_from_model
    from d2moe.model.load import load_model

    model, spec = load_model(cfg.model, with_experts=cfg.weights == "model")
    ids = calibration_ids(cfg.model, spec, cfg.calib_kib)
    meta: dict[str, Any] = {"model": cfg.model, "calib_kib": cfg.calib_kib,
                            "weights": cfg.weights}
    from d2moe.executor.setup import check_match
    from d2moe.quant.store import StoreReader

    if cfg.weights == "model":
        from d2moe.model.load import checkpoint_dir
        from d2moe.quant.source import expert_sha256

        experts = model.experts
        meta["expert_sha256"] = expert_sha256(checkpoint_dir(cfg.model))
        if store is not None and not cfg.out:  # written beside a store: it must be this model's
            with StoreReader(store) as reader:
                check_match(spec, reader, store, cfg.model)
    else:
        from d2moe.eval.ppl import dense_backend, store_matrices
        from d2moe.quant.reference import dequantize

        assert store is not None
        with StoreReader(store) as reader:
            check_match(spec, reader, store, cfg.model)
            nested = store_matrices(reader)
            top = reader.bits_stored
            meta.update({"store": str(store), "bits": top, "layout": reader.layout.kind})
            if reader.source is not None:
                meta["expert_sha256"] = reader.source["expert_sha256"]
        experts = dense_backend(spec, lambda key: dequantize(nested[key], top))
    return stats_from_model(model, spec, ids, experts, ctx=cfg.ctx, batch=cfg.batch,
                            sample_tokens=cfg.sample_tokens, progress=cfg.progress, meta=meta)


SIMILARITY = "mean similarity (off-diagonal)"
COLUMNS = ("layer", "most important", "least important", SIMILARITY, "most similar pair")


def summary_rows(stats: ExpertStats) -> list[dict[str, Any]]:
    """Per layer: the most and least important expert and the mean off-diagonal similarity,
    as the cells both tables print (the layer an int)."""
    rows = []
    for layer in range(stats.layers):
        imp = np.asarray(stats.importance[layer])
        sim = np.asarray(stats.similarity[layer])
        hi, lo = int(imp.argmax()), int(imp.argmin())
        off = sim - 2 * np.eye(len(imp))  # the diagonal can never be the largest
        e, f = np.unravel_index(int(off.argmax()), off.shape)
        rows.append({"layer": layer, "most important": f"{hi} ({imp[hi]:.3f})",
                     "least important": f"{lo} ({imp[lo]:.3f})",
                     SIMILARITY: f"{off_diagonal_mean(sim):.3f}",
                     "most similar pair": f"{e}~{f} ({sim[e, f]:.3f})" if len(imp) > 1 else "-"})
    return rows


def _title(stats: ExpertStats) -> str:
    return f"expert statistics ({stats.source}): {stats.layers} layers x {stats.experts} experts"


def summary_table(stats: ExpertStats) -> str:
    """The per-layer summary for the terminal, laid out by `analysis.tables.format_table`."""
    from d2moe.analysis.tables import format_table

    rows = summary_rows(stats)
    width = max((len(r[SIMILARITY]) for r in rows), default=0)
    for r in rows:  # '-0.078' and '0.320' with their decimal points in line
        r[SIMILARITY] = r[SIMILARITY].rjust(width)
    return _title(stats) + "\n" + format_table(rows, COLUMNS)


def summarize(stats: ExpertStats) -> str:
    """The per-layer summary as a Markdown table, for the records and docs that
    `benchmarks/substitution.py` writes (the terminal gets `summary_table`)."""
    lines = [_title(stats), "| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in summary_rows(stats)]
    return "\n".join(lines)
