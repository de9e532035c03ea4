"""How much of heat prefetch's I/O is used, and how much undoes the same plan's evictions.

Simulated (deterministic): for each model and budget, `d2moe simulate` replays one synthetic
trace (the evaluation's: V1 bits, 64 prompt tokens, 64 decode steps, seed 1) through the
given policies on a shipped profile. Per policy it prints decode tokens/s, on-demand loads,
prefetch loads, prefetches used (the prefetched expert runs at the next execution of its
layer), "bounced" prefetches (a prefetch of a key that a load of the same plan evicted or
lowered: I/O that undoes the plan's own eviction) and the bytes loaded (loads + prefetches).
The bounce count wraps `Policy.plan`; the rest reads the events the simulator writes.

    .venv/bin/python benchmarks/prefetch_use.py [--policies hebf,hebf-prefetch,edgemoe]
        [--models mixtral-8x7b,llama-moe-3.5b] [--budgets 10%,20%,30%,50%]
        [--profile rtx3060-laptop] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from d2moe.cli import main as d2moe
from d2moe.policies.presets import Policy


def _count_bounces(counts: dict[str, int]):
    """Wrap Policy.plan: count prefetch loads of keys evicted earlier in the same plan."""
    orig = Policy.plan

    def plan(self, layer, demands, resident, costs):
        p = orig(self, layer, demands, resident, costs)
        evicted = set()
        for ld in p.loads:
            if ld.prefetch and ld.key in evicted:
                counts[self.name] += 1
            evicted.update(ev.key for ev in ld.evict)
        return p

    Policy.plan = plan  # type: ignore[method-assign]
    return orig


def _prefetch_use(events: Path) -> tuple[int, int]:
    """(prefetches, used): a prefetch row of (step s, layer L, expert e) is used when e runs
    at L's next execution (step s, or s + 1 for a layer-0 prefetch issued at the last
    layer)."""
    z = np.load(events)
    kind, step, layer, expert = z["kind"], z["step"], z["layer"], z["expert"]
    ran = defaultdict(set)
    for i in np.nonzero(kind == "run")[0]:
        ran[(int(step[i]), int(layer[i]))].add(int(expert[i]))
    pf = np.nonzero(kind == "prefetch")[0]
    used = 0
    for i in pf:
        s, li = int(step[i]), int(layer[i])
        if int(expert[i]) in ran[(s + 1 if li == 0 else s, li)]:
            used += 1
    return len(pf), used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default="hebf,hebf-prefetch,edgemoe")
    ap.add_argument("--models", default="mixtral-8x7b,llama-moe-3.5b")
    ap.add_argument("--budgets", default="10%,20%,30%,50%")
    ap.add_argument("--profile", default="rtx3060-laptop")
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args()
    policies = args.policies.split(",")
    bounces: dict[str, int] = defaultdict(int)
    _count_bounces(bounces)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            trace = Path(tmp) / f"{model}.npz"
            d2moe(["trace", "synth", "--model-spec", model, "--seed", "1",
                   "--decode-steps", "64", "--out", str(trace), "--no-progress"])
            for budget in args.budgets.split(","):
                out = Path(tmp) / f"{model}-{budget.rstrip('%')}"
                bounces.clear()
                d2moe(["simulate", "--model-spec", model, "--profile", args.profile,
                       "--trace", str(trace), "--policy", args.policies, "--budget", budget,
                       "--out", str(out), "--plot-steps", "1"])
                metrics = json.loads((out / "metrics.json").read_text())["policies"]
                for name in policies:
                    m = metrics[name]
                    n, used = _prefetch_use(out / f"events-{name}.npz")
                    rows.append({"model": model, "budget": budget, "policy": name,
                                 "decode_tokens_per_s": m["decode_tokens_per_s"],
                                 "loads": m["loads"], "prefetches": n, "prefetches_used": used,
                                 "bounced": bounces[name], "bytes_loaded": m["bytes_loaded"],
                                 "hit_rate": m["hit_rate"]})
    print(f"\n{'model':15} {'budget':>6} {'policy':14} {'tok/s':>7} {'loads':>6} "
          f"{'prefetch':>8} {'used':>5} {'bounced':>7} {'hit %':>5} {'GiB loaded':>10}")
    for r in rows:
        print(f"{r['model']:15} {r['budget']:>6} {r['policy']:14} "
              f"{r['decode_tokens_per_s']:7.3f} {r['loads']:6d} {r['prefetches']:8d} "
              f"{r['prefetches_used']:5d} {r['bounced']:7d} {100 * r['hit_rate']:5.1f} "
              f"{r['bytes_loaded'] / 2**30:10.1f}")
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
