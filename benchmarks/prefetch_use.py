"""How much of heat prefetch's I/O is used, and how much undoes the same plan's evictions.

Simulated (deterministic): for each model and budget, `d2moe simulate` replays one synthetic
trace (the evaluation's: V1 bits, 64 prompt tokens, 64 decode steps, seed 1) through the
given policies on a shipped profile. Per policy it prints decode tokens/s, on-demand loads,
prefetch loads, prefetches used (the prefetched expert runs at the next execution of its
layer), "bounced" prefetches (a prefetch of a key that a load of the same plan evicted or
lowered: I/O that undoes the plan's own eviction) and the bytes loaded (loads + prefetches).
The bounce count wraps `Policy.plan`; the rest reads the events the simulator writes.
`--min-prob P1,P2,...` runs every prefetching policy once per threshold, as `NAME@P` (the
preset with `prefetch_min_prob` = P, registered here only); without it, each preset's own.
The last column is tokens/s against `hebf` in the same cell, when it runs.
`--calibration` first replays each model's trace through the heat predictor alone and prints,
per bin of predicted probability (decode steps, every expert it scores), how often the next
layer needed the expert, with Brier score and log loss: the shipped estimator, two other ways
to combine its P(f | e) over a layer's experts (`_Max`, `_NoisyOr`), counting executions
(`_Executions`) and the estimator until 2026-11-24 (`_SlotShares`).

    .venv/bin/python benchmarks/prefetch_use.py [--policies hebf,hebf-prefetch,edgemoe]
        [--models mixtral-8x7b,llama-moe-3.5b] [--budgets 10%,20%,30%,50%]
        [--profile rtx3060-laptop] [--min-prob 0.3,0.5,0.7,0.9] [--calibration] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from d2moe.cli import main as d2moe
from d2moe.policies.prefetch import HeatPredictor, _tokens
from d2moe.policies.presets import POLICIES, Policy, policy_config
from d2moe.traces.schema import load_trace


class _SlotShares(HeatPredictor):
    """The estimator until 2026-11-24: f's expected share of the next layer's routed slots,
    sum_e t_e a(e, f) / n(e) / sum_e t_e (sums to 1 over f; at most 1/top-k per expert)."""

    def probabilities(self, layer, demands):
        tokens = _tokens(demands)
        score, total = defaultdict(float), sum(tokens.values())
        for e, t in tokens.items():
            n = self.tokens.get((layer, e), 0)
            for f, a in (self.counts[(layer, e)].items() if n else ()):
                score[f] += t * a / n
        return {f: v / total for f, v in score.items()} if total else {}


class _Executions(HeatPredictor):
    """Counting executions: P(f | e) = executions of e followed by f / executions of e, then
    the token-weighted mean over the layer's experts (the shipped one on one-token steps)."""

    def observe(self, layer, demands):
        now = set(_tokens(demands))
        self.layers = max(self.layers, layer + 1)
        if self._prev is not None and now and self._follows(self._prev[0], layer):
            pl, prev = self._prev
            for e in prev:
                self.tokens[(pl, e)] += 1
                for f in now:
                    self.counts[(pl, e)][f] += 1
        self._prev = (layer, dict.fromkeys(now, 1))

    def probabilities(self, layer, demands):
        tokens = _tokens(demands)
        score, total = defaultdict(float), 0
        for e, t in tokens.items():
            n = self.tokens.get((layer, e), 0)
            if n:
                total += t
                for f, c in self.counts[(layer, e)].items():
                    score[f] += t * c / n
        return {f: v / total for f, v in score.items()} if total else {}


class _Max(HeatPredictor):
    """The shipped P(f | e), combined by the most confident of the layer's experts."""

    def probabilities(self, layer, demands):
        tokens, k = _tokens(demands), self.top_k
        best = defaultdict(float)
        for e in tokens:
            n = self.tokens.get((layer, e), 0)
            for f, a in (self.counts[(layer, e)].items() if n else ()):
                best[f] = max(best[f], min(1.0, k * a / n))
        t = max(1.0, sum(tokens.values()) / k) if k else 1.0
        return {f: 1.0 - (1.0 - v) ** t for f, v in best.items()}


class _NoisyOr(HeatPredictor):
    """The shipped P(f | e), combined as independent causes above f's base rate m (per-token
    share of f): P = 1 - (1 - m)^T prod_e (1 - r_e)^t_e, r_e = (P(f | e) - m) / (1 - m)."""

    def observe(self, layer, demands):
        prev = self._prev
        super().observe(layer, demands)
        now = _tokens(demands)
        if prev is not None and now and self._follows(prev[0], layer):
            self._slots = getattr(self, "_slots", defaultdict(float))
            self._after = getattr(self, "_after", defaultdict(float))
            self._slots[prev[0]] += sum(now.values())
            for f, t in now.items():
                self._after[(prev[0], f)] += t

    def probabilities(self, layer, demands):
        tokens, k = _tokens(demands), self.top_k
        seen = [e for e in tokens if self.tokens.get((layer, e), 0)]
        if not seen:
            return {}
        t = max(1.0, sum(tokens.values()) / k)
        out = {}
        for f in {f for e in seen for f in self.counts[(layer, e)]}:
            m = min(1.0, k * self._after[(layer, f)] / self._slots[layer])
            q = (1.0 - m) ** t
            for e in seen:
                c = min(1.0, k * self.counts[(layer, e)].get(f, 0.0) / self.tokens[(layer, e)])
                q *= (1.0 - (max(0.0, (c - m) / (1.0 - m)) if m < 1.0 else 0.0)) ** tokens[e]
            out[f] = 1.0 - q
        return out


_ESTIMATORS = {"shipped": HeatPredictor, "max": _Max, "noisy-or": _NoisyOr,
               "executions": _Executions, "slot-shares": _SlotShares}


def _calibration(trace: Path) -> None:
    """Per estimator: Brier score and log loss of every decode-step prediction, then, per bin
    of predicted probability, the predictions, their mean and how often the expert was
    needed."""
    steps = load_trace(trace).demands(4)
    flat = [(s, layer, d) for s, per in enumerate(steps) for layer, d in enumerate(per)]
    for name, cls in _ESTIMATORS.items():
        p = cls(min_prob=0.0)
        n, pred, hit = np.zeros(10, int), np.zeros(10), np.zeros(10, int)
        brier = logloss = 0.0
        for i, (s, layer, d) in enumerate(flat[:-1]):
            p.observe(layer, d)
            if s == 0 or p.layers < 2:
                continue
            needed = {x.key.expert for x in flat[i + 1][2]}
            for f, pr in p.probabilities(layer, d).items():
                b, y = min(int(pr * 10), 9), f in needed
                n[b] += 1
                pred[b] += pr
                hit[b] += y
                brier += (pr - y) ** 2
                c = min(max(pr, 1e-4), 1 - 1e-4)
                logloss -= np.log(c if y else 1 - c)
        total = int(n.sum())
        print(f"{name}: {total} predictions, Brier {brier / total:.4f}, "
              f"log loss {logloss / total:.4f}; per bin: predictions, mean p, needed")
        print("  " + "  ".join(f"{b / 10:.1f}+ {n[b]} {pred[b] / n[b]:.2f} {hit[b] / n[b]:.2f}"
                               for b in np.nonzero(n)[0]))


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


def _variants(policies: list[str], probs: list[float]) -> list[str]:
    """Each prefetching policy once per threshold, registered as NAME@P; the others as given."""
    out = []
    for name in policies:
        cfg = policy_config(name)
        if not probs or cfg.prefetch == "none":
            out.append(name)
            continue
        for p in probs:
            vname, vcfg = f"{name}@{p:g}", replace(cfg, prefetch_min_prob=p)
            if vname not in POLICIES.names():

                def factory(stats=None, vname=vname, vcfg=vcfg) -> Policy:
                    return Policy(vname, vcfg, stats)

                factory.config = vcfg  # type: ignore[attr-defined]
                POLICIES.register(vname, f"{name} at prefetch_min_prob={p:g}")(factory)
            out.append(vname)
    return out


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
    ap.add_argument("--min-prob", default="",
                    help="thresholds to run each prefetching policy at (default: its own)")
    ap.add_argument("--calibration", action="store_true",
                    help="first print the predictor's calibration on each model's trace")
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args()
    probs = [float(p) for p in args.min_prob.split(",")] if args.min_prob else []
    policies = _variants(args.policies.split(","), probs)
    bounces: dict[str, int] = defaultdict(int)
    _count_bounces(bounces)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            trace = Path(tmp) / f"{model}.npz"
            d2moe(["trace", "synth", "--model-spec", model, "--seed", "1",
                   "--decode-steps", "64", "--out", str(trace), "--no-progress"])
            if args.calibration:
                print(f"\ncalibration, {model} (decode steps):")
                _calibration(trace)
            for budget in args.budgets.split(","):
                out = Path(tmp) / f"{model}-{budget.rstrip('%')}"
                bounces.clear()
                d2moe(["simulate", "--model-spec", model, "--profile", args.profile,
                       "--trace", str(trace), "--policy", ",".join(policies), "--budget", budget,
                       "--out", str(out), "--plot-steps", "1"])
                metrics = json.loads((out / "metrics.json").read_text())["policies"]
                base = metrics.get("hebf", {}).get("decode_tokens_per_s")
                for name in policies:
                    m = metrics[name]
                    n, used = _prefetch_use(out / f"events-{name}.npz")
                    rows.append({"model": model, "budget": budget, "policy": name,
                                 "decode_tokens_per_s": m["decode_tokens_per_s"],
                                 "prefill_tokens_per_s": m["prefill_tokens_per_s"],
                                 "loads": m["loads"], "prefetches": n, "prefetches_used": used,
                                 "bounced": bounces[name], "bytes_loaded": m["bytes_loaded"],
                                 "hit_rate": m["hit_rate"],
                                 "vs_hebf": m["decode_tokens_per_s"] / base if base else None})
    print(f"\n{'model':15} {'budget':>6} {'policy':18} {'tok/s':>7} {'loads':>6} "
          f"{'prefetch':>8} {'used':>5} {'bounced':>7} {'hit %':>5} {'GiB loaded':>10} "
          f"{'vs hebf':>7}")
    for r in rows:
        vs = f"{r['vs_hebf']:7.3f}" if r["vs_hebf"] else f"{'-':>7}"
        print(f"{r['model']:15} {r['budget']:>6} {r['policy']:18} "
              f"{r['decode_tokens_per_s']:7.3f} {r['loads']:6d} {r['prefetches']:8d} "
              f"{r['prefetches_used']:5d} {r['bounced']:7d} {100 * r['hit_rate']:5.1f} "
              f"{r['bytes_loaded'] / 2**30:10.1f} {vs}")
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
