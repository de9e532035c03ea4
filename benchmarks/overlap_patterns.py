"""How the two lanes share the CPU depends on who is running first: the lanes' speeds while
both are busy in two synthetic patterns, and as `d2moe profile` now reads them from the real
backend's rows (measured in the same run).

On the CPU the I/O lane's thread and the compute lane share the cores and the interpreter
lock. "stream": the compute lane runs experts back to back while the I/O thread loads
experts one after another (close to the overlap probe the profile used until 2026-11-23
12:40 UTC, which handed a load over every two runs). "stall": as a layer with two misses, both
loads are handed over together, the compute lane stalls on the first, then runs it while the
I/O thread is in the middle of the second. Both on the tiny model's expert shape (random probe
store, O_DIRECT, one torch thread); per round the alone times come from a steady pair of
loads and a run with the I/O lane idle, and the fluid model's speeds follow: speed = (alone
time - time not overlapped) / time overlapped, least squares within a round, the median
over the rounds. "rows": the
speeds of a `d2moe profile` run (`profiles.backend_probes.overlap_speeds_from_rows` on the
real backend decoding under a quarter of the experts).

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
from d2moe.profiles.load_probes import drop_expert, load_into
from d2moe.profiles.measure import ProfileConfig, measure_profile
from d2moe.profiles.probe_store import write_random_store
from d2moe.profiles.run_probes import run_bodies
from d2moe.quant.store import StoreReader

BITS = 4


def pattern_speeds(reader: StoreReader, probe, layout: QuantLayout, rounds: int
                   ) -> dict[str, tuple[float, float]]:
    """{pattern: (I/O speed, compute speed)} for "stream" and "stall", rounds interleaved."""
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
                key = keys[k % len(keys)]
                drop_expert(pool, key)
                t0 = time.perf_counter()
                load_into(reader, pool, Load(key, 0, BITS))
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

    def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
        return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))

    per_round: dict[str, list[tuple[float, float]]] = {"stream": [], "stall": []}

    def add(pattern: str, loads: list[tuple[float, float]], runs: list[tuple[float, float]],
            load_alone: float, run_alone: float) -> None:
        """One round's speeds: least squares over its overlapping loads, and runs."""
        acc = [0.0, 0.0, 0.0, 0.0]  # io: sum over x (alone - not overlapped), sum over^2; cpu
        for ld in loads:
            over = sum(overlap(ld, r) for r in runs)
            acc[0] += over * (load_alone - (ld[1] - ld[0] - over))
            acc[1] += over * over
        for r in runs:
            over = sum(overlap(r, ld) for ld in loads)
            acc[2] += over * (run_alone - (r[1] - r[0] - over))
            acc[3] += over * over
        if acc[1] > 0 and acc[3] > 0:
            per_round[pattern].append((acc[0] / acc[1], acc[2] / acc[3]))

    thread = threading.Thread(target=io_lane, daemon=True)
    thread.start()
    load_alone, run_alone = [], []
    try:
        for r in range(rounds + 1):  # round 0 warms up
            hand_over([0, 1])  # alone: the second of a steady pair, a run with I/O idle
            done[1].wait()
            load_alone.append(spans[1][1] - spans[1][0])
            t0, t1 = timed_run(r)
            run_alone.append(t1 - t0)
            b, a = statistics.median(load_alone), statistics.median(run_alone)
            time.sleep(0.002)
            hand_over([2, 3])  # stall on load 2, run it while 3 loads
            done[2].wait()
            ran = timed_run(r)
            done[3].wait()
            if r:
                add("stall", [spans[3]], [ran], b, a)
            time.sleep(0.002)
            batch = list(range(10, 16))  # stream: six loads beside back-to-back runs
            hand_over(batch)
            runs = []
            while not done[batch[-1]].is_set():
                runs.append(timed_run(r))
            if r:
                add("stream", [spans[k] for k in batch[1:-1]], runs, b, a)
            time.sleep(0.002)
    finally:
        todo.put(None)
        thread.join()
        for key in list(pool.blocks):
            drop_expert(pool, key)
    return {p: (statistics.median(io for io, _ in xs), statistics.median(c for _, c in xs))
            for p, xs in per_round.items()}


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
            speeds = pattern_speeds(reader, probe, layout, args.rounds)
        finally:
            reader.close()
        ex = measure_profile(ProfileConfig(out=str(Path(tmp) / "p.yaml"), progress=False,
                                           dir=tmp)).executor
    speeds["rows"] = (ex.overlap_io_speed, ex.overlap_compute_speed)
    print(f"{'pattern':<8}  io speed  compute speed")
    for name, (io, cpu) in speeds.items():
        print(f"{name:<8}  {io:8.2f}  {cpu:13.2f}")


if __name__ == "__main__":
    main()
