"""Budget curves of the tiny model on this machine, real and simulated: decode tokens/s and hit
rate against the memory budget for the baseline presets, each real run's recorded trace
replayed by the simulator on the shipped measured `cpu-2core` profile.

Writes rows in the sweep table's format (`run_kind` measured or simulated), so
`d2moe plot budget TABLE` draws both on one figure; prints the real/simulated pairs and,
per budget, each policy's real tokens/s as a ratio of fifo's (the LRU-cached baseline)
measured in the same run. Experts run at --bits (no bit-width router on this path). Real runs
are interleaved across all cells, each repeat from a rotating start, median kept.

Usage:
  python benchmarks/budget_curves.py [--tokens 32] [--repeats 1]
      [--policies fifo,hebf,...] [--budgets 15%,25%,...] [--out docs/results/data/x.jsonl]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from d2moe.analysis import compute_metrics
from d2moe.core.cliargs import split_list
from d2moe.core.errors import UserError
from d2moe.core.fileio import atomic_write
from d2moe.core.sizes import QuantLayout, all_experts_bytes, parse_budget
from d2moe.executor.setup import expert_stats, store_layout, tiny_store
from d2moe.executor.validate import record_run, simulate_trace
from d2moe.model.load import load_model
from d2moe.model.tokenizer import encode
from d2moe.policies import policy_config
from d2moe.profiles import load_profile
from d2moe.profiles.measure import torch_threads
from d2moe.quant.store import StoreReader
from d2moe.sweep.table import table_line

POLICIES = ("fifo,fifo-lfu,hebf,d2moe,hold-in-memory,hold-in-memory-int4,matryoshka-free,"
            "edgemoe,moqe-dynaio,sub-similar,sub-lower,hebf-prefetch")
BUDGETS = "15%,25%,50%,75%,100%,200%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default=POLICIES)
    ap.add_argument("--budgets", default=BUDGETS, help="of every expert at --bits")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per run")
    ap.add_argument("--repeats", type=int, default=1, help="real runs per cell (median kept)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--profile", default="cpu-2core")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--prompt", default="def fib(n):\n    return")
    ap.add_argument("--out", default="out/budget_curves/table.jsonl")
    args = ap.parse_args()
    t0 = time.perf_counter()
    model, spec = load_model("tiny", with_experts=False)
    profile = load_profile(args.profile)
    prompt = list(encode(args.prompt))
    total = all_experts_bytes(spec, args.bits, QuantLayout())
    cells = []  # (policy, budget text, bytes, store, stats)
    budgets = split_list(args.budgets, "budgets", example="--budgets 25%,50%")
    for name in split_list(args.policies, "policies", example="--policies fifo,hebf"):
        pcfg = policy_config(name)
        path = tiny_store(store_layout(pcfg, QuantLayout()))
        store = StoreReader(path, direct=True)
        stats = expert_stats(pcfg, "auto", "tiny", path)
        for budget in budgets:
            cells.append((name, budget, parse_budget(budget, total), store, stats))
    runs: dict[int, list] = {i: [] for i in range(len(cells))}
    refused: dict[int, str] = {}
    with torch_threads(args.threads):
        record_run(model, spec, cells[0][3], "fifo", total, args.bits, prompt, 4)  # warm-up
        for r in range(args.repeats):
            # interleaved, each repeat from a rotating start: this VM's speed drifts by up to
            # a third within minutes, which must not line up with the policies
            order = list(range(len(cells)))
            order = order[r * len(order) // args.repeats:] + order[:r * len(order) //
                                                                   args.repeats]
            for i in order:
                if i in refused:
                    continue
                name, _, nbytes, store, stats = cells[i]
                try:
                    runs[i].append(record_run(model, spec, store, name, nbytes, args.bits,
                                              prompt, args.tokens, stats))
                except UserError as exc:  # a pinned preset over budget
                    if exc.field != "budget":
                        raise
                    refused[i] = str(exc)
    rows: list[dict] = []
    for i, (name, budget, nbytes, store, stats) in enumerate(cells):
        rows += _rows(spec, store, profile, name, budget, nbytes, args, runs[i],
                      refused.get(i), stats)
    header = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs, {args.threads} torch "
                         f"thread(s), torch {torch.__version__}",
              "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "python benchmarks/budget_curves.py " + " ".join(
                  f"--{k} {v!r}" for k, v in vars(args).items() if k != "out"),
              "wall_s": round(time.perf_counter() - t0, 1)}
    with atomic_write(Path(args.out)) as f:
        for row in rows:
            f.write(table_line({**row, **header}) + "\n")
    _report(rows)
    print(f"wrote {args.out} ({header['wall_s']} s); plot: d2moe plot budget {args.out}")


def _rows(spec, store, profile, name, budget, nbytes, args, runs, refused, stats
          ) -> list[dict]:
    """The measured and simulated rows of one (policy, budget): the median real run, and
    the simulation of its recorded trace."""
    base = {"model": spec.name, "profile": profile.name,
            "profile_source": profile.source.kind, "budget": budget, "budget_bytes": nbytes,
            "policy": name, "bits": args.bits, "tokens": args.tokens}
    if refused is not None:  # a row saying so, as the sweep does
        return [{**base, "status": "does-not-fit", "message": refused, "run_kind": kind}
                for kind in ("measured", "simulated")]
    speeds = [compute_metrics(tl).decode_tokens_per_s for tl, _ in runs]
    real, trace = runs[speeds.index(statistics.median_low(speeds))]
    sim = simulate_trace(trace, spec, store.layout, profile, name, nbytes, args.bits, stats)
    out = []
    for kind, tl in (("measured", real), ("simulated", sim)):
        m = compute_metrics(tl)
        out.append({**base, "status": "ok", "run_kind": kind,
                    "decode_tokens_per_s": m.decode_tokens_per_s, "hit_rate": m.hit_rate,
                    "bytes_loaded": m.bytes_loaded, "mean_run_bits": m.mean_run_bits,
                    "degraded_runs": m.degraded_runs, "substituted_runs": m.substituted_runs,
                    "peak_resident_bytes": m.peak_resident_bytes,
                    "spread": (max(speeds) - min(speeds)) / statistics.median(speeds)
                    if kind == "measured" else 0.0})
    return out


def _report(rows: list[dict]) -> None:
    ok = [r for r in rows if r["status"] == "ok"]
    fifo = {r["budget"]: r["decode_tokens_per_s"] for r in ok
            if r["policy"] == "fifo" and r["run_kind"] == "measured"}
    print(f"{'policy':20s} {'budget':>7s} {'real tok/s':>10s} {'sim tok/s':>9s} {'err %':>6s} "
          f"{'real/fifo':>9s} {'hit real':>8s} {'hit sim':>7s}")
    for r in ok:
        if r["run_kind"] != "measured":
            continue
        s = next(x for x in ok if x["run_kind"] == "simulated" and x["policy"] == r["policy"]
                 and x["budget"] == r["budget"])
        real, sim = r["decode_tokens_per_s"], s["decode_tokens_per_s"]
        ratio = real / fifo[r["budget"]] if r["budget"] in fifo else float("nan")
        print(f"{r['policy']:20s} {r['budget']:>7s} {real:10.1f} {sim:9.1f} "
              f"{100 * (sim - real) / real:6.1f} {ratio:9.2f} {r['hit_rate']:8.3f} "
              f"{s['hit_rate']:7.3f}")
    for r in rows:
        if r["status"] != "ok" and r["run_kind"] == "measured":
            print(f"{r['policy']:20s} {r['budget']:>7s} does not fit")


if __name__ == "__main__":
    main()
