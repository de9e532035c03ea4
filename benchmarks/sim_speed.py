"""Simulator speed: simulated Mixtral-8x7B decode tokens per wall second, and expert jobs/s.

Baseline, measured in the same run: a plain SimPy model of the same jobs (per layer, an I/O
process with one timeout per load and a compute process with one timeout per run, each run
waiting on its load's event), with no policy, no accounting and no event rows. The ratio
says what d2moe's policies, budget bookkeeping and event recording cost on top of (or save
below) bare SimPy. Target (issue 3): >= 500 simulated decode tokens/s on a 2-core machine.

Each figure is the median of --repeats timings, after one short untimed simulation (the
first simulation in a process ran 10-20% slower than the next ones on this project's CPU:
2026-11-23 17:56 UTC, fifo 434 then 518 and 498 tok/s).

Usage: python benchmarks/sim_speed.py [--tokens N] [--budget 2.5GiB] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections import defaultdict

import simpy

from d2moe.core.cliargs import split_list
from d2moe.core.sizes import QuantLayout
from d2moe.core.spec import load_spec
from d2moe.policies import make_policy
from d2moe.profiles import load_profile
from d2moe.sim import SimSetup, simulate
from d2moe.sim.workload import budget_bytes, steps_from_trace
from d2moe.traces import SynthConfig, synth_trace


def plain_simpy(jobs: list[list[tuple[list[float], list[tuple[int, float]]]]]) -> float:
    """Replay per-layer (load durations, [(load index or -1, run duration)]) in bare SimPy."""
    env = simpy.Environment()

    def layer(loads: list[float], runs: list[tuple[int, float]]):
        done = [env.event() for _ in loads]

        def io():
            for i, d in enumerate(loads):
                yield env.timeout(d)
                done[i].succeed()

        env.process(io())
        for i, d in runs:
            if i >= 0 and not done[i].triggered:
                yield done[i]
            yield env.timeout(d)

    def driver():
        for step in jobs:
            for loads, runs in step:
                yield env.process(layer(loads, runs))

    t0 = time.perf_counter()
    env.process(driver())
    env.run()
    return time.perf_counter() - t0


def jobs_of(tl) -> list[list[tuple[list[float], list[tuple[int, float]]]]]:
    """The simulated run's loads and runs per (step, layer), for the SimPy baseline."""
    loads, runs = defaultdict(list), defaultdict(list)
    for e in tl.events:
        if e.kind == "load":
            loads[(e.step, e.layer)].append((e.expert, e.dur_us))
        elif e.kind == "run":
            runs[(e.step, e.layer)].append((e.expert, e.dur_us))
    steps = 1 + max(s for s, _ in runs)
    layers = 1 + max(layer for _, layer in runs)
    out = []
    for s in range(steps):
        row = []
        for layer in range(layers):
            ld = loads[(s, layer)]
            index = {x: i for i, (x, _) in enumerate(ld)}
            row.append(([d for _, d in ld], [(index.get(x, -1), d) for x, d in runs[(s, layer)]]))
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1000, help="decode tokens to simulate")
    ap.add_argument("--budget", default="2.5GiB", help="expert budget (bytes or %%)")
    ap.add_argument("--repeats", type=int, default=3, help="timings per figure (median kept)")
    ap.add_argument("--policies", default="fifo,hebf,johnson", help="registered policy names")
    args = ap.parse_args()

    spec = load_spec("mixtral-8x7b")
    profile = load_profile("rtx3060-laptop")
    trace = synth_trace(spec, SynthConfig(prefill_tokens=0, decode_steps=args.tokens))
    t0 = time.perf_counter()
    steps = steps_from_trace(trace, 4)
    prep = time.perf_counter() - t0
    budget = budget_bytes(args.budget, spec, QuantLayout(), 4)
    print(f"machine: {platform.machine()}, {platform.python_implementation()} "
          f"{platform.python_version()}; Mixtral-8x7B decode, {args.tokens} tokens, "
          f"budget {args.budget}, rtx3060-laptop profile; trace -> demands {prep:.2f} s")
    print(f"{'policy':13s} {'engine':6s} {'sim tok/s':>10s} {'jobs/s':>10s} "
          f"{'plain SimPy tok/s':>18s} {'ratio':>6s}")
    simulate(SimSetup(spec, profile, QuantLayout(), budget), steps[:50], make_policy("fifo"))
    for name in split_list(args.policies, "policies", example="--policies fifo,hebf"):
        for engine in ("fast", "simpy"):
            setup = SimSetup(spec, profile, QuantLayout(), budget, engine=engine)
            walls = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                tl = simulate(setup, steps, make_policy(name))
                walls.append(time.perf_counter() - t0)
            wall = statistics.median(walls)
            n_jobs = sum(1 for e in tl.events if e.kind in ("load", "run"))
            jobs = jobs_of(tl)
            base = statistics.median(plain_simpy(jobs) for _ in range(args.repeats))
            print(f"{name:13s} {engine:6s} {args.tokens / wall:10.0f} {n_jobs / wall:10.0f} "
                  f"{args.tokens / base:18.0f} {base / wall:5.2f}x")
    print("ratio = d2moe tokens/s over plain SimPy tokens/s for the same jobs "
          "(> 1: faster than bare SimPy); target: sim tok/s >= 500")


if __name__ == "__main__":
    main()
