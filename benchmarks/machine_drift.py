"""How much this machine's speed moves: the same work timed once a second for a while.

Each sample (every `--every` seconds, `--window` seconds long) times, alternately, the
profile's expert run body (tiny expert shape, 4 bits, one token), the I/O lane's whole load
of one such expert from a random probe store (O_DIRECT) and a 512 x 512 float32 matrix
product, and keeps each one's mean. Prints the spread of the samples (min, median, max, and
max / min) and, with --series, every sample. On a quiet machine max / min stays near 1; the
simulator can be no truer than this (docs/profiling.md).

Usage: python benchmarks/machine_drift.py [--seconds 120] [--series]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from decode_ab import print_machine

from d2moe.core.jobs import ExpertKey, Load
from d2moe.core.sizes import QuantLayout, all_experts_bytes
from d2moe.core.spec import load_spec
from d2moe.executor.pool import ExpertPool
from d2moe.profiles.load_probes import drop_expert, load_into
from d2moe.profiles.probe_store import write_random_store
from d2moe.profiles.run_probes import run_bodies
from d2moe.quant.store import StoreReader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--every", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--window", type=float, default=0.2, help="seconds of work per sample")
    ap.add_argument("--series", action="store_true", help="print every sample")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print_machine(f"{args.seconds:.0f} s, a {args.window} s sample every {args.every} s")
    layout, cpu = QuantLayout(), torch.device("cpu")
    probe = dataclasses.replace(load_spec("tiny"), layers=1, experts=4, top_k=2)
    run = run_bodies(probe, layout, cpu, [(4, 1)])[0]
    a = torch.randn(512, 512)
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:  # on the disk the store uses
        reader = StoreReader(write_random_store(Path(tmp) / "s", probe, layout), direct=True)
        pool = ExpertPool(probe, layout, all_experts_bytes(probe, layout.bK, layout), cpu)

        def load(i: int) -> None:
            key = ExpertKey(0, i % probe.experts)
            drop_expert(pool, key)
            load_into(reader, pool, Load(key, 0, 4))

        work = {"expert run": run, "load": load, "matmul 512": lambda i: a @ a}
        samples: dict[str, list[float]] = {name: [] for name in work}
        end = time.perf_counter() + args.seconds
        while time.perf_counter() < end:
            t_sample = time.perf_counter()
            spent: dict[str, list[float]] = {name: [] for name in work}
            i = 0
            while time.perf_counter() - t_sample < args.window:
                for name, fn in work.items():
                    t0 = time.perf_counter()
                    fn(i)
                    spent[name].append((time.perf_counter() - t0) * 1e6)
                i += 1
            for name, xs in spent.items():
                samples[name].append(statistics.fmean(xs))
            if args.series:
                print(f"{time.strftime('%H:%M:%S')} " + "  ".join(
                    f"{name} {samples[name][-1]:.0f} us" for name in work), flush=True)
            time.sleep(max(0.0, args.every - (time.perf_counter() - t_sample)))
        reader.close()
    print(f"{'work':<12} {'samples':>7} {'min us':>8} {'median us':>9} {'max us':>8} "
          f"{'max/min':>7}")
    for name, xs in samples.items():
        print(f"{name:<12} {len(xs):>7} {min(xs):8.0f} {statistics.median(xs):9.0f} "
              f"{max(xs):8.0f} {max(xs) / min(xs):7.2f}x")


if __name__ == "__main__":
    main()
