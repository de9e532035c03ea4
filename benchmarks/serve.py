"""Continuous batching against serving one request at a time (FCFS, batch 1), at the same
arrival process: output throughput and latency percentiles of both, and their ratios
(batching / one at a time), simulated and real. Everything printed is measured or simulated
in this run; nothing is hard-coded.

- sim: each case SPEC:PROFILE[:RATE] (RATE: requests per second, default --rate; the rest of
  the arrival process is the command line's), synthetic routing, `d2moe serve --backend sim`.
  The default includes tiny on the measured cpu-2core profile at --rate: the real run's twin.
- real: the built-in tiny model with its experts streamed from the nested store (O_DIRECT),
  `d2moe serve --backend real` at --rate; each configuration `--repeats` times (the two
  alternate which goes first); the medians with the range.

Usage: python benchmarks/serve.py [--requests 12] [--rate 8] [--prompt-tokens 8:24]
           [--output-tokens 8:16] [--max-batch 8] [--policy hebf] [--budget 50%]
           [--sim-cases tiny:cpu-2core,mixtral-8x7b:rtx3060-laptop:0.5]
           [--repeats 3] [--threads 1] [--skip-real] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from d2moe.core.cliargs import split_list
from d2moe.serve.arrivals import ArrivalConfig
from d2moe.serve.cmd import ServeConfig, serve
from d2moe.serve.metrics import ServeMetrics

KEYS = ("output_tok_s", "latency_p50_ms", "latency_p99_ms", "ttft_p99_ms", "tpot_p50_ms")


def one(cfg: ServeConfig, arrivals: ArrivalConfig) -> ServeMetrics:
    """The metrics of one serving run (one policy)."""
    res = serve(cfg, arrivals)
    return next(iter(res["metrics"].values()))


def compare(cfg: ServeConfig, arrivals: ArrivalConfig, repeats: int) -> dict[str, list]:
    """{"batch": [ServeMetrics per repeat], "one": [...]}: max batch vs batch 1."""
    out: dict[str, list] = {"batch": [], "one": []}
    for r in range(repeats):
        order = ("batch", "one") if r % 2 == 0 else ("one", "batch")
        for name in order:
            mb = cfg.max_batch if name == "batch" else 1
            out[name].append(one(replace(cfg, max_batch=mb), arrivals))
    return out


def _med(ms: list[ServeMetrics], key: str) -> tuple[float, float, float]:
    vals = [getattr(m, key) for m in ms]
    return statistics.median(vals), min(vals), max(vals)


def report(label: str, runs: dict[str, list], max_batch: int) -> tuple[list[str], dict]:
    """Table lines and a JSON record of one comparison."""
    lines, rec = [], {"label": label}
    for name, mb in (("batch", max_batch), ("one", 1)):
        ms = runs[name]
        cells = []
        for key in KEYS:
            med, lo, hi = _med(ms, key)
            cells.append(f"{med:>9.1f}" + (f" [{lo:.1f}-{hi:.1f}]" if len(ms) > 1 else ""))
            rec[f"{name}_{key}"] = [getattr(m, key) for m in ms]
        lines.append(f"{label:<44} {mb:>5} " + " ".join(cells))
    thr = _med(runs["batch"], "output_tok_s")[0] / _med(runs["one"], "output_tok_s")[0]
    p99 = _med(runs["one"], "latency_p99_ms")[0] / _med(runs["batch"], "latency_p99_ms")[0]
    rec.update(throughput_ratio=thr, p99_latency_ratio_one_over_batch=p99)
    lines.append(f"{'':<44} ratio: throughput x{thr:.2f} with batching; p99 latency one-at-a-"
                 f"time / batching = {p99:.2f}")
    return lines, rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--rate", type=float, default=8.0, help="arrivals per second (real)")
    ap.add_argument("--prompt-tokens", default="8:24")
    ap.add_argument("--output-tokens", default="8:16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--policy", default="hebf")
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--sim-cases", default="tiny:cpu-2core,mixtral-8x7b:rtx3060-laptop:0.5")
    ap.add_argument("--repeats", type=int, default=3, help="real runs per configuration")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the real runs (1: two threads thrash on a busy "
                         "2-core machine; 0: torch's default)")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--out", default="", help="write results.json here")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="d2moe-serve-bench-")
    base = ServeConfig(policy=args.policy, budget=args.budget, max_batch=args.max_batch,
                       out=tmp, progress=False)
    arrivals = ArrivalConfig(rate=args.rate, requests=args.requests,
                             prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                             seed=args.seed)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python "
          f"{platform.python_version()}; load average {os.getloadavg()[0]:.2f}")
    print(f"arrivals: {args.requests} requests, prompts {args.prompt_tokens}, outputs "
          f"{args.output_tokens}, seed {args.seed}; policy {args.policy}, budget {args.budget}")
    head = (f"{'case':<44} {'batch':>5} " + " ".join(f"{k:>9}" for k in
            ("out tok/s", "p50 lat", "p99 lat", "p99 TTFT", "p50 TPOT")) + "   (ms)")
    print(head)
    records = []
    for case in split_list(args.sim_cases, "sim-cases", example="--sim-cases tiny:cpu-2core",
                           allow_none=True):
        spec, profile, *rest = case.split(":")
        rate = rest[0] if rest else str(args.rate)
        cfg = replace(base, backend="sim", model_spec=spec, profile=profile)
        runs = compare(cfg, replace(arrivals, rate=float(rate)), 1)
        lines, rec = report(f"sim {spec} on {profile} @{rate}/s", runs, args.max_batch)
        print("\n".join(lines))
        records.append(rec)
    if not args.skip_real:
        cfg = replace(base, backend="real", threads=args.threads)
        t0 = time.perf_counter()
        runs = compare(cfg, arrivals, args.repeats)
        lines, rec = report(f"real tiny (this machine) @{args.rate}/s", runs, args.max_batch)
        print("\n".join(lines))
        rec["wall_s"] = time.perf_counter() - t0
        records.append(rec)
        print(f"real: {args.repeats} repeats per configuration in {rec['wall_s']:.0f} s; "
              f"load average now {os.getloadavg()[0]:.2f}")
    if args.out:
        path = Path(args.out) / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"args": vars(args), "results": records}, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
