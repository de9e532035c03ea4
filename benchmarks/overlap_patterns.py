"""How the two lanes share the CPU depends on who is running first: the lanes' speeds while
both are busy, in the executor's pattern against the profile's overlap probe (the baseline,
measured in the same run).

On the CPU the I/O lane's thread and the compute lane share the cores and the interpreter
lock. The profile's probe (`profiles.executor_probes.measure_overlap`) has the compute lane
run experts back to back and hand a load to the I/O thread every two runs. A real layer with
two misses goes otherwise: both loads are handed over together, the compute lane stalls on
the first, then runs it while the I/O thread is in the middle of the second. This script
times that pattern on the tiny model's expert shape (random probe store, O_DIRECT, one torch
thread): per round a steady pair of loads and a run with the I/O lane idle give the alone
times, then the pattern gives the run's and the second load's times and their overlap, and
the fluid model's speeds follow: speed = (alone time - time not overlapped) / overlap.
Prints the median speeds of both patterns.

Usage: python benchmarks/overlap_patterns.py [--rounds 60]
"""

from __future__ import annotations

import argparse
import dataclasses
import queue
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from decode_ab import print_machine

from d2moe.core.jobs import ExpertKey, Load
from d2moe.core.sizes import QuantLayout, all_experts_bytes
from d2moe.core.spec import load_spec
from d2moe.executor.pool import ExpertPool
from d2moe.executor.setup import cache_dir
from d2moe.profiles.executor_probes import _drop, load_into, measure_overlap, run_bodies
from d2moe.profiles.probe_store import write_random_store
from d2moe.quant.store import StoreReader

BITS = 4


def executor_pattern(reader: StoreReader, probe, layout: QuantLayout, rounds: int
                     ) -> tuple[float, float]:
    """(I/O speed, compute speed), medians over `rounds` of the stall-then-run pattern."""
    run = run_bodies(probe, layout, torch.device("cpu"), [(BITS, 1)])[0]
    pool = ExpertPool(probe, layout, all_experts_bytes(probe, layout.bK, layout),
                      torch.device("cpu"))
    keys = [ExpertKey(0, e) for e in range(probe.experts)]
    todo: queue.Queue[list[int] | None] = queue.Queue()
    spans: dict[int, tuple[float, float]] = {}
    done: dict[int, threading.Event] = {}

    def io_lane() -> None:  # loads each handed-over batch back to back, as executor/lanes.py
        while (batch := todo.get()) is not None:
            for k in batch:
                _drop(pool, keys[k])
                t0 = time.perf_counter()
                load_into(reader, pool, Load(keys[k], 0, BITS))
                spans[k] = (t0, time.perf_counter())
                done[k].set()

    def hand_over(batch: list[int]) -> None:
        for k in batch:
            done[k] = threading.Event()
        todo.put(batch)

    def timed_run(i: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        run(i)
        return t0, time.perf_counter()

    thread = threading.Thread(target=io_lane, daemon=True)
    thread.start()
    io_speed, compute_speed, load_alone, run_alone = [], [], [], []
    try:
        for r in range(rounds + 1):  # round 0 warms up
            hand_over([0, 1])  # alone: the second of a steady pair, a run with I/O idle
            done[1].wait()
            load_alone.append(spans[1][1] - spans[1][0])
            a0, a1 = timed_run(r)
            run_alone.append(a1 - a0)
            time.sleep(0.002)
            hand_over([2, 3])  # the pattern: stall on load 2, run it while 3 loads
            done[2].wait()
            r0, r1 = timed_run(r)
            done[3].wait()
            l0, l1 = spans[3]
            overlap = min(r1, l1) - max(r0, l0)
            if r and overlap > 0:
                b, a = statistics.median(load_alone), statistics.median(run_alone)
                io_speed.append((b - (l1 - l0 - overlap)) / overlap)
                compute_speed.append((a - (r1 - r0 - overlap)) / overlap)
            time.sleep(0.002)
    finally:
        todo.put(None)
        thread.join()
        for key in list(pool.blocks):
            _drop(pool, key)
    return statistics.median(io_speed), statistics.median(compute_speed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    layout = QuantLayout()
    probe = dataclasses.replace(load_spec("tiny"), layers=1, experts=4, top_k=2)
    print_machine(f"tiny expert shape, {BITS}-bit loads and runs, {args.rounds} rounds")
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="overlap-", dir=root) as tmp:
        reader = StoreReader(write_random_store(Path(tmp) / "store", probe, layout), direct=True)
        try:
            ex_io, ex_cpu = executor_pattern(reader, probe, layout, args.rounds)
            base = measure_overlap(reader, probe, layout, torch.device("cpu"), BITS, 15,
                                   lambda: None)
        finally:
            reader.close()
    print(f"{'pattern':<52}  io speed  compute speed")
    print(f"{'profile probe (runs back to back, loads handed over)':<52}  "
          f"{base['overlap_io_speed']:8.2f}  {base['overlap_compute_speed']:13.2f}")
    print(f"{'executor (stall on a load, run beside the next)':<52}  {ex_io:8.2f}  "
          f"{ex_cpu:13.2f}")


if __name__ == "__main__":
    main()
