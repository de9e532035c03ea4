"""System 2 substitution on the tiny model, both sides of the trade in one run (issue #8).

Per budget (a share of all experts at 4 bits) and policy (fifo, hebf, sub-similar,
sub-lower: those registered), all measured in this invocation on this machine:
- quality: held-out perplexity with the experts served by StreamingExperts under the policy
  (`d2moe.eval.policy_ppl`, teacher-forced decoding, one token per step, so per-token router
  weights decide substitutions as in serving);
- real speed: `d2moe.executor.cmd.run` (what `d2moe run` does): decode tokens/s and hit rate
  from its timeline, the median of --repeats runs (interleaved across rows, min-max shown);
- simulated speed: the simulator on the routing trace recorded from a fully resident run of
  the same prompt and length, on the measured `cpu-2core` profile, same budget in bytes.
Policies that use expert statistics get the output-similarity statistics of the store
(`d2moe experts stats`, <store>/expert_stats.json, computed once when missing). Ratios are
against fifo at the same budget. Writes --json (everything) and --quality (one JSON line per
row: policy, budget, decode_tokens_per_s, ppl, hit_rate).

`--sources` instead compares the two similarity sources on the tiny model: the output
similarity above against the routing proxy (`d2moe experts stats --trace`) from a trace the
model records on held-out text (one prefill step, then one token per step): per layer the
Pearson correlation of their off-diagonal entries and how often both pick the same most
similar expert; writes --sources-json.

`--controls` scores sub-similar with other similarity matrices in place of the output
similarity, at the same budgets and held-out text: the routing proxy from a trace recorded on
calibration text (the training split), the reverse order (least similar first:
(1 - s) / 2 off the diagonal) and a random symmetric matrix (uniform [0, 1], seed 0);
writes --controls-json. Does picking by output similarity matter?

    python benchmarks/substitution.py --heldout-kib 4 --repeats 5
    python benchmarks/substitution.py --sources --trace-tokens 2048
    python benchmarks/substitution.py --controls --heldout-kib 4
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from d2moe.analysis import compute_metrics
from d2moe.core.cliargs import split_list
from d2moe.core.errors import UserError
from d2moe.core.fileio import atomic_write
from d2moe.core.sizes import QuantLayout
from d2moe.eval.policy_ppl import (
    PolicyPplConfig,
    budget_bytes,
    open_scoring_inputs,
    score,
    stats_for,
)
from d2moe.executor.cmd import RunConfig, run
from d2moe.executor.setup import store_layout, tiny_store
from d2moe.executor.validate import record_run, simulate_trace
from d2moe.experts.cmd import summarize
from d2moe.model.tokenizer import encode
from d2moe.policies import POLICIES, policy_config
from d2moe.profiles import load_profile
from d2moe.profiles.measure import torch_threads
from d2moe.sweep.table import table_line

BITS = 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="25%,50%")
    ap.add_argument("--policies", default="fifo,hebf,sub-similar,sub-lower",
                    help="comma list; names not registered are skipped")
    ap.add_argument("--heldout-kib", type=int, default=4, help="held-out KiB scored")
    ap.add_argument("--ctx", type=int, default=256, help="tokens per scoring window")
    ap.add_argument("--prompt", default="def fib(n):\n    return")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per real run")
    ap.add_argument("--repeats", type=int, default=5,
                    help="real runs per row, interleaved across rows (median kept)")
    ap.add_argument("--profile", default="cpu-2core")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    ap.add_argument("--json", default="docs/results/data/substitution.json")
    ap.add_argument("--quality", default="docs/results/data/substitution-quality.jsonl")
    ap.add_argument("--sources", action="store_true", help="compare the similarity sources")
    ap.add_argument("--trace-tokens", type=int, default=2048, help="--sources: trace length")
    ap.add_argument("--sources-json", default="docs/results/data/substitution-sources.json")
    ap.add_argument("--controls", action="store_true",
                    help="sub-similar with other similarity matrices")
    ap.add_argument("--controls-json", default="docs/results/data/substitution-controls.json")
    args = ap.parse_args()
    if args.sources:
        compare_sources(args)
        return
    if args.controls:
        controls(args)
        return
    t0 = time.perf_counter()
    asked = split_list(args.policies, "policies", example="--policies hebf,d2moe")
    names = [n for n in asked if n in POLICIES.names()]
    skipped = [n for n in asked if n not in names]
    budgets = split_list(args.budgets, "budgets", example="--budgets 25%,50%")
    inputs = open_scoring_inputs(PolicyPplConfig(heldout_kib=args.heldout_kib))
    store_path = tiny_store(store_layout(policy_config("fifo"), QuantLayout()))
    assert inputs.store_path == store_path, "every policy here runs on the same store"
    stats = {n: stats_for(inputs, n) for n in names}
    used = next((s for s in stats.values() if s is not None), None)
    profile = load_profile(args.profile)
    prompt = list(encode(args.prompt))
    with torch_threads(args.threads):
        full = budget_bytes(inputs.spec, inputs.store, "100%", BITS)
        _, trace = record_run(inputs.model, inputs.spec, inputs.store, "fifo", full, BITS,
                              prompt, args.tokens)
    cells = [(budget, name) for budget in budgets for name in names]
    quality, simulated, refused = {}, {}, []
    for budget, name in list(cells):
        print(f"[{time.perf_counter() - t0:6.0f}s] perplexity: {name} at {budget}",
              file=sys.stderr)
        try:
            q = score(inputs, name, budget, bits=BITS, stats=stats[name], ctx=args.ctx,
                      threads=args.threads)
        except UserError as exc:  # a pinned preset over budget: left out, and said so
            if exc.field != "budget":
                raise
            cells.remove((budget, name))
            refused.append(f"{name} at {budget}: {exc}")
            continue
        quality[(budget, name)] = q
        simulated[(budget, name)] = _simulated(inputs, trace, profile, name, q.budget_bytes,
                                               stats[name])
    # real runs interleaved: repeat r runs every cell once, starting at a rotating cell, so a
    # change of load on the shared machine spreads over all cells instead of a block of them
    real: dict[tuple[str, str], list[Any]] = {c: [] for c in cells}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            print(f"[{time.perf_counter() - t0:6.0f}s] real runs, repeat {r + 1}",
                  file=sys.stderr)
            for i in range(len(cells)):
                budget, name = cells[(i + r) % len(cells)]
                real[(budget, name)].append(_real(name, budget, args, Path(tmp) / f"{r}-{i}"))
    rows = []
    for budget, name in cells:
        q = quality[(budget, name)]
        runs = real[(budget, name)]
        speeds = [m.decode_tokens_per_s for m in runs]
        m = runs[speeds.index(statistics.median_low(speeds))]
        rows.append({"policy": name, "budget": budget, "budget_bytes": q.budget_bytes,
                     "decode_tokens_per_s": m.decode_tokens_per_s, "ppl": q.ppl,
                     "hit_rate": m.hit_rate,
                     "real": {"decode_tokens_per_s": m.decode_tokens_per_s,
                              "hit_rate": m.hit_rate, "exposed_io_us": m.exposed_io_us,
                              "bytes_loaded": m.bytes_loaded, "all_decode_tokens_per_s": speeds},
                     "sim": simulated[(budget, name)], "quality_run": q.as_dict()})
    inputs.store.close()
    table = _table(rows)
    print(table)
    record = {
        "what": "System 2 substitution on the tiny model: perplexity, real and simulated "
                "decode speed per (policy, budget), measured in one run",
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpu_count": _cpus(),
                    "python": platform.python_version(), "torch_threads": args.threads,
                    "git": _git()},
        "config": vars(args), "skipped_policies": skipped, "does_not_fit": refused,
        "profile": profile.name,
        "stats": None if used is None else {"source": used.source, "meta": used.meta,
                                            "summary": summarize(used)},
        "trace": {"source": "record_run, fifo at 100%", "steps": trace.num_steps,
                  "tokens": trace.num_tokens},
        "rows": rows, "table": table, "wall_s": time.perf_counter() - t0}
    with atomic_write(Path(args.json)) as f:
        json.dump(record, f, indent=1, default=float)
        f.write("\n")
    with atomic_write(Path(args.quality)) as f:
        for r in rows:
            f.write(table_line({k: r[k] for k in ("policy", "budget", "decode_tokens_per_s",
                                                  "ppl", "hit_rate")}) + "\n")
    print(f"wrote {args.json}, {args.quality} in {time.perf_counter() - t0:.0f} s")


def _real(name: str, budget: str, args: argparse.Namespace, out: Path) -> Any:
    """One `d2moe run` (generation of --tokens after --prompt): its timeline's metrics."""
    cfg = RunConfig(policy=name, budget=budget, bits=BITS, prompt=args.prompt,
                    max_new_tokens=args.tokens, device="cpu", threads=args.threads,
                    out=str(out), progress=False)  # one table, not a bar per run
    return run(cfg)["metrics"]


def _simulated(inputs: Any, trace: Any, profile: Any, name: str, nbytes: int,
               stats: Any) -> dict[str, Any]:
    """The simulator on the recorded trace at the same budget in bytes."""
    layout = policy_config(name).quant_layout(inputs.store.layout)
    tl = simulate_trace(trace, inputs.spec, layout, profile, name, nbytes, BITS, stats=stats)
    m = compute_metrics(tl)
    subs = sum(1 for e in tl.events if e.kind == "substitute")
    return {"decode_tokens_per_s": m.decode_tokens_per_s, "hit_rate": m.hit_rate,
            "substitutes": subs, "degraded_runs": m.degraded_runs}


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("| budget | policy | ppl | x fifo | decode tok/s (real, min-max) | x fifo | "
            "hit % (real) | decode tok/s (sim) | x fifo | hit % (sim) | hit % (ppl run) | "
            "substituted runs | lower-bit runs |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        base = next(b for b in rows if b["budget"] == r["budget"] and b["policy"] == "fifo")
        q = r["quality_run"]
        all_s = r["real"]["all_decode_tokens_per_s"]
        lines.append(
            f"| {r['budget']} | {r['policy']} | {r['ppl']:.4f} | "
            f"{r['ppl'] / base['ppl']:.4f} | {r['decode_tokens_per_s']:.1f} "
            f"({min(all_s):.0f}-{max(all_s):.0f}) | "
            f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f} | "
            f"{100 * r['hit_rate']:.1f} | {r['sim']['decode_tokens_per_s']:.1f} | "
            f"{r['sim']['decode_tokens_per_s'] / base['sim']['decode_tokens_per_s']:.2f} | "
            f"{100 * r['sim']['hit_rate']:.1f} | {100 * q['hit_rate']:.1f} | "
            f"{100 * q['substitutes'] / max(q['runs'] + q['substitutes'], 1):.1f}% | "
            f"{q['degraded_runs']} |")
    return "\n".join(lines)


def compare_sources(args: argparse.Namespace) -> None:
    """Output similarity against the routing proxy on a trace recorded on held-out text."""
    import numpy as np

    from d2moe.eval.ppl import heldout_ids
    from d2moe.experts import stats_from_trace
    from d2moe.model.load import load_tiny
    from d2moe.traces.record import record_trace

    t0 = time.perf_counter()
    inputs = open_scoring_inputs(PolicyPplConfig(heldout_kib=1))
    output = stats_for(inputs, "sub-similar")
    inputs.store.close()
    model, spec = load_tiny()
    ids = heldout_ids("tiny", spec, -(-args.trace_tokens // 1024))
    with torch_threads(args.threads):
        trace = record_trace(model, spec, ids, prefill_tokens=64,
                             decode_steps=args.trace_tokens - 64)
    proxy = stats_from_trace(trace)
    E = spec.experts
    off = ~np.eye(E, dtype=bool)
    layers = []
    for layer in range(spec.layers):
        a = np.asarray(output.similarity[layer])
        b = np.asarray(proxy.similarity[layer])
        pick_a = np.where(off, a, -2).argmax(axis=1)
        pick_b = np.where(off, b, -2).argmax(axis=1)
        imp_a = np.asarray(output.importance[layer])
        imp_b = np.asarray(proxy.importance[layer])
        layers.append({"layer": layer,
                       "pearson_off_diagonal": float(np.corrcoef(a[off], b[off])[0, 1]),
                       "same_most_similar": int((pick_a == pick_b).sum()), "experts": E,
                       "output_mean_off_diagonal": float(a[off].mean()),
                       "proxy_mean_off_diagonal": float(b[off].mean()),
                       "importance_pearson": float(np.corrcoef(imp_a, imp_b)[0, 1])})
    lines = ["| layer | Pearson r (off-diagonal similarity) | same most-similar expert | "
             "mean off-diag. output | mean off-diag. proxy | importance r |",
             "|---|---|---|---|---|---|"]
    for r in layers:
        lines.append(f"| {r['layer']} | {r['pearson_off_diagonal']:+.3f} | "
                     f"{r['same_most_similar']} of {E} | {r['output_mean_off_diagonal']:.3f} | "
                     f"{r['proxy_mean_off_diagonal']:.3f} | {r['importance_pearson']:+.3f} |")
    table = "\n".join(lines)
    print(table)
    record = {"what": "output similarity (calibration text, train split) against the routing "
                      "proxy (trace on held-out text) on the tiny model",
              "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "output_stats": {"source": output.source, "meta": output.meta},
              "proxy_stats": {"source": proxy.source, "meta": proxy.meta},
              "layers": layers, "table": table, "wall_s": time.perf_counter() - t0}
    with atomic_write(Path(args.sources_json)) as f:
        json.dump(record, f, indent=1, default=float)
        f.write("\n")
    print(f"wrote {args.sources_json}")


def controls(args: argparse.Namespace) -> None:
    """sub-similar's perplexity and hit rate with each similarity matrix (see the docstring)."""
    import numpy as np

    from d2moe.experts import stats_from_trace
    from d2moe.experts.calibration import calibration_ids
    from d2moe.model.load import load_tiny
    from d2moe.policies.stats import ExpertStats
    from d2moe.traces.record import record_trace

    t0 = time.perf_counter()
    inputs = open_scoring_inputs(PolicyPplConfig(heldout_kib=args.heldout_kib))
    output = stats_for(inputs, "sub-similar")
    model, spec = load_tiny()
    with torch_threads(args.threads):
        trace = record_trace(model, spec, calibration_ids("tiny", spec, 2), prefill_tokens=64,
                             decode_steps=2048 - 64)
    sim = np.asarray(output.similarity)
    eye = np.eye(spec.experts, dtype=bool)[None]
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, 1, size=sim.shape)
    variants = {
        "output similarity": output,
        "routing proxy (train-text trace)": stats_from_trace(trace),
        "reversed (least similar first)": ExpertStats.from_lists(
            output.importance, np.where(eye, 1.0, (1 - sim) / 2), source="reversed"),
        "random (seed 0)": ExpertStats.from_lists(
            output.importance, np.where(eye, 1.0, (noise + noise.transpose(0, 2, 1)) / 2),
            source="random"),
    }
    rows = []
    for budget in split_list(args.budgets, "budgets", example="--budgets 25%,50%"):
        base = score(inputs, "hebf", budget, bits=BITS, ctx=args.ctx, threads=args.threads)
        rows.append({"budget": budget, "similarity": "(hebf, no substitution)", **_brief(base)})
        for label, stats in variants.items():
            print(f"[{time.perf_counter() - t0:6.0f}s] {label} at {budget}", file=sys.stderr)
            q = score(inputs, "sub-similar", budget, bits=BITS, stats=stats, ctx=args.ctx,
                      threads=args.threads)
            rows.append({"budget": budget, "similarity": label, **_brief(q)})
    inputs.store.close()
    lines = ["| budget | similarity | ppl | x hebf | hit % | substituted runs |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        base = next(b for b in rows if b["budget"] == r["budget"])
        lines.append(f"| {r['budget']} | {r['similarity']} | {r['ppl']:.4f} | "
                     f"{r['ppl'] / base['ppl']:.4f} | {100 * r['hit_rate']:.1f} | "
                     f"{100 * r['substituted_share']:.1f}% |")
    table = "\n".join(lines)
    print(table)
    record = {"what": "sub-similar with other similarity matrices on the tiny model",
              "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "rows": rows, "table": table, "wall_s": time.perf_counter() - t0}
    with atomic_write(Path(args.controls_json)) as f:
        json.dump(record, f, indent=1, default=float)
        f.write("\n")
    print(f"wrote {args.controls_json}")


def _brief(q: Any) -> dict[str, Any]:
    return {"ppl": q.ppl, "hit_rate": q.hit_rate, "substitutes": q.substitutes,
            "substituted_share": q.substitutes / max(q.runs + q.substitutes, 1),
            "tokens_scored": q.tokens_scored}


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    main()
