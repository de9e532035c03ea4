"""Policy decision cost: wall time of `Policy.plan` per layer, in the simulator (the same
policy objects the executor calls on its compute lane), as a ratio to FIFO's in the same run.

A policy that plans slower costs a real run that much more per layer (negligible beside a
Mixtral-sized layer, visible beside the tiny model's). `d2moe profile` measures the same
figure per policy (`executor.plan_us`, at one budget), and the simulator charges the
difference to the probe's policy.

Usage: python benchmarks/plan_cost.py [--policies fifo,hebf,hebf-adaptive,hebf-ghost]
           [--specs tiny:cpu-2core-xeon:40%,mixtral-8x7b:rtx3060-laptop:2.5GiB] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from d2moe.core.cliargs import split_list
from d2moe.policies import make_policy
from d2moe.sim.cmd import SimulateConfig, prepare, simulate_policy

BASELINE = "fifo"


def plan_us(prep, name: str) -> tuple[float, int]:
    """Mean wall microseconds of one `plan` call of policy `name` over a simulated run."""
    policy = make_policy(name)
    inner, spent = policy.plan, [0.0, 0]

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        plan = inner(*args, **kwargs)
        spent[0] += time.perf_counter() - t0
        spent[1] += 1
        return plan

    policy.plan = timed
    simulate_policy(prep, policy)
    return spent[0] / spent[1] * 1e6, spent[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default="fifo,hebf,hebf-adaptive,hebf-ghost",
                    help=f"registered policy names ({BASELINE} is always timed too)")
    ap.add_argument("--specs", default="tiny:cpu-2core-xeon:40%,mixtral-8x7b:rtx3060-laptop:2.5GiB",
                    help="SPEC:PROFILE:BUDGET, comma-separated (synthetic routing)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per figure (median kept)")
    args = ap.parse_args()
    names = split_list(args.policies, "policies", example="--policies fifo,hebf")
    names = names if BASELINE in names else [BASELINE, *names]
    print(f"machine: {platform.machine()}, {platform.node()}; CPython "
          f"{platform.python_version()}; Policy.plan wall time per layer, median of "
          f"{args.repeats} simulated runs")
    print(f"{'spec':14s}{'policy':16s}{'plan us':>9s}{'layers':>8s}{'x ' + BASELINE:>9s}")
    for item in split_list(args.specs, "specs", example="--specs tiny:cpu-2core-xeon:40%"):
        spec, profile, budget = item.split(":")
        prep = prepare(SimulateConfig(model_spec=spec, profile=profile, policy=BASELINE,
                                      budget=budget))
        base = None
        for name in names:
            runs = [plan_us(prep, name) for _ in range(args.repeats)]
            us, layers = statistics.median(r[0] for r in runs), runs[0][1]
            base = base or us
            print(f"{spec:14s}{name:16s}{us:9.1f}{layers:8d}{us / base:9.2f}")


if __name__ == "__main__":
    main()
