"""Sweep speed-up: one small grid run serially (--jobs 1) and in parallel (--jobs N), same run.

Each run starts from an empty output directory (so both synthesize the trace and prepare
every workload themselves); the serial run is this process, the parallel one N worker
processes. Prints both wall times and the measured ratio.

Usage: python benchmarks/sweep.py [--jobs N] [--spec olmoe-1b-7b] [--decode-steps 96]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from d2moe.sweep.cells import prepared
from d2moe.sweep.runner import SweepConfig, run_sweep

GRID = """\
policies: [fifo, fifo-lfu, hebf, johnson]
budgets: ["20%", "35%", "50%", "65%"]
profiles: [{profile}]
traces: ["synth:{spec}:decode_steps={decode_steps},prefill_tokens=32"]
"""


def timed_sweep(grid: Path, out: Path, jobs: int) -> tuple[float, str]:
    """Wall seconds of one sweep from scratch, and its summary line."""
    prepared.cache_clear()  # nothing carried over from an earlier run in this process
    t0 = time.perf_counter()
    result = run_sweep(grid, SweepConfig(out=str(out), jobs=jobs, progress=False))
    wall = time.perf_counter() - t0
    if set(result.ran) != {"ok"}:
        raise SystemExit(f"some cells did not run: {result.ran} (see {result.table})")
    return wall, result.summary().splitlines()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="worker processes of the parallel run (default: CPU count)")
    ap.add_argument("--spec", default="olmoe-1b-7b", help="model spec of the synthetic trace")
    ap.add_argument("--profile", default="rtx3060-laptop", help="hardware profile")
    ap.add_argument("--decode-steps", type=int, default=96, help="decode steps of the trace")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="d2moe-sweep-bench-") as tmp:
        grid = Path(tmp) / "grid.yaml"
        grid.write_text(GRID.format(spec=args.spec, profile=args.profile,
                                    decode_steps=args.decode_steps))
        serial, summary = timed_sweep(grid, Path(tmp) / "serial", 1)
        parallel, _ = timed_sweep(grid, Path(tmp) / "parallel", args.jobs)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}")
    print(f"grid: 4 policies x 4 budgets, synth:{args.spec} ({args.decode_steps} decode "
          f"steps), profile {args.profile}: {summary}")
    print(f"serial (--jobs 1):          {serial:8.2f} s")
    print(f"parallel (--jobs {args.jobs:<3d}):     {parallel:8.2f} s")
    print(f"speed-up:                   {serial / parallel:8.2f}x")


if __name__ == "__main__":
    main()
