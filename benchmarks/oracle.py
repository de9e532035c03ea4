"""Each policy's distance to the oracle (Belady / MIN) residency bound, and the bound's cost.

For the tiny and Mixtral-8x7B specs, a synthetic trace with one bit-width (4) and the
`copies` layout (whole-expert loads of one size: the oracle's model, so the bound is
exact), budgets 25/50/75% of all experts: every registered policy is simulated on the
rtx3060-laptop profile; its hit rate and its fetches (loads + prefetches + experts preloaded
before the first step) are printed as ratios of the oracle's: fetch ratio >= 1 always; hit
ratio <= 1 unless flagged P (prefetched or preloaded experts count as hits though fetched)
or S (substituted demands have no run: fewer demands, and no fetch), and not comparable when
flagged X (the policy holds experts at other bits, so in other slots). Policies needing expert
statistics get them from the trace. Per budget: the oracle's compute time against one
simulation of `fifo` (FIFO + LRU) on the same trace.

Usage: python benchmarks/oracle.py [--decode 2000] [--prefill 64]
"""

from __future__ import annotations

import argparse
import platform
import time

from d2moe.analysis import compute_metrics
from d2moe.analysis.oracle import belady
from d2moe.core.errors import UserError
from d2moe.core.sizes import QuantLayout, all_experts_bytes
from d2moe.core.spec import load_spec
from d2moe.experts import stats_from_trace
from d2moe.policies import POLICIES, Sizes, make_policy
from d2moe.policies.presets import policy_config
from d2moe.profiles import load_profile
from d2moe.sim import SimSetup, simulate
from d2moe.sim.simulator import policy_setup
from d2moe.sim.workload import steps_from_trace
from d2moe.traces import SynthConfig, synth_trace

LAYOUT = QuantLayout(kind="copies", b1=4, bK=4)
BUDGETS = (0.25, 0.50, 0.75)


def bench_spec(name: str, decode: int, prefill: int) -> None:
    """One spec: per budget, each policy against the oracle; then the timing comparison."""
    spec, profile = load_spec(name), load_profile("rtx3060-laptop")
    cfg = SynthConfig(prefill_tokens=prefill, decode_steps=decode, bits="")
    trace = synth_trace(spec, cfg)
    steps, stats = steps_from_trace(trace, 4), stats_from_trace(trace)
    sizes, total = Sizes.of(spec, LAYOUT), all_experts_bytes(spec, 4, LAYOUT)
    print(f"\n{spec.name}: {len(steps)} steps ({prefill} prefill tokens, {decode} decode), "
          f"copies layout at 4 bits, all experts {total / 2**30:.3f} GiB")
    print(f"{'budget':>6s} {'policy':19s} {'hit rate':>8s} {'oracle':>7s} {'hit/or':>7s} "
          f"{'fetches':>8s} {'oracle':>8s} {'fetch/or':>8s} flags")
    for frac in BUDGETS:
        budget = int(frac * total)
        t0 = time.perf_counter()
        try:
            oracle = belady(steps, sizes, budget)
        except ValueError as err:
            print(f"{frac:6.0%} oracle: {err}")
            continue
        t_oracle = time.perf_counter() - t0
        t_lru = 0.0
        for policy in POLICIES.names():
            p = make_policy(policy, stats if policy_config(policy).needs_stats else None)
            t0 = time.perf_counter()
            try:
                tl = simulate(SimSetup(spec, profile, LAYOUT, budget), steps, p)
            except UserError as err:
                print(f"{frac:6.0%} {policy:19s} skipped: {err}")
                continue
            if policy == "fifo":
                t_lru = time.perf_counter() - t0
            m = compute_metrics(tl)
            kinds = {e.kind for e in tl.events}
            own = policy_setup(SimSetup(spec, profile, LAYOUT, budget), p, 4)
            slot = Sizes.of(spec, own.layout).by_bits[p.max_bits(4)]
            preloaded = m.initial_resident_bytes // slot
            fetches = m.loads + m.prefetches + preloaded
            flags = ("P" if preloaded or "prefetch" in kinds else "") + \
                ("S" if "substitute" in kinds else "") + ("X" if slot != oracle.slot_bytes else "")
            print(f"{frac:6.0%} {policy:19s} {m.hit_rate:8.4f} {oracle.hit_rate:7.4f} "
                  f"{m.hit_rate / oracle.hit_rate:7.3f} {fetches:8d} {oracle.fetches:8d} "
                  f"{fetches / max(oracle.fetches, 1):8.3f} {flags}")
        print(f"{frac:6.0%} oracle capacity {oracle.capacity_experts} experts; oracle "
              f"{t_oracle * 1e3:.1f} ms vs fifo (LRU) simulation {t_lru * 1e3:.1f} ms "
              f"({t_oracle / t_lru if t_lru else float('nan'):.3f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decode", type=int, default=2000, help="decode steps of each trace")
    ap.add_argument("--prefill", type=int, default=64, help="prompt tokens (0: no prefill)")
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}; profile rtx3060-laptop; fetches = loads + prefetches "
          "+ preloaded experts")
    for name in ("tiny", "mixtral-8x7b"):
        bench_spec(name, args.decode, args.prefill)


if __name__ == "__main__":
    main()
