"""What a pause costs the I/O lane: the first read, and the first whole load, after the lane
sat idle, against one right after another (the baseline, measured in the same rounds).

On the tiny model's nested store (O_DIRECT): "read" is the first level's read request of a
4-bit expert alone; "load" the I/O lane's whole load (every level's read, checksum,
conversion, placement in the pool) on a thread woken through a queue, as
`executor/lanes.py`. Each round times every (kind, idle) once in shuffled order: idle 0 is a
load right behind another (the warm baseline), the others sleep first. Prints medians and
the extra over the baseline per idle time; the profile's `cold_curve_us` probes the whole
load because its extra is several times the read's (docs/profiling.md).

Usage: python benchmarks/cold_loads.py [--rounds 40]
"""

from __future__ import annotations

import argparse
import queue
import random
import statistics
import threading
import time

import torch
from decode_ab import print_machine

from d2moe.core.jobs import ExpertKey, Load
from d2moe.core.sizes import QuantLayout, all_experts_bytes
from d2moe.executor.pool import ExpertPool
from d2moe.executor.setup import tiny_store
from d2moe.model.load import load_tiny
from d2moe.profiles.load_probes import drop_expert, load_into
from d2moe.quant.store import StoreReader

IDLE_MS = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0)
BITS = 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print_machine(f"tiny store, {BITS}-bit loads, {args.rounds} rounds")
    layout = QuantLayout()
    _, spec = load_tiny()
    reader = StoreReader(tiny_store(layout), direct=True)
    pool = ExpertPool(spec, layout, all_experts_bytes(spec, layout.bK, layout),
                      torch.device("cpu"))
    keys = [ExpertKey(layer, e) for layer in range(spec.layers) for e in range(spec.experts)]

    def read(key: ExpertKey) -> float:
        first = reader.byte_ranges(key.layer, key.expert, 0, BITS)[0]
        t0 = time.perf_counter()
        reader.read_range(first)
        return (time.perf_counter() - t0) * 1e6

    def load(key: ExpertKey) -> float:
        drop_expert(pool, key)
        t0 = time.perf_counter()
        load_into(reader, pool, Load(key, 0, BITS))
        return (time.perf_counter() - t0) * 1e6

    todo: queue.Queue[list[ExpertKey] | None] = queue.Queue()
    done: queue.Queue[float] = queue.Queue()

    def io_lane() -> None:  # times the last load of each hand-over
        while (batch := todo.get()) is not None:
            done.put([load(k) for k in batch][-1])

    thread = threading.Thread(target=io_lane, daemon=True)
    thread.start()
    rng = random.Random(0)
    times: dict[tuple[str, float], list[float]] = {(k, g): [] for k in ("read", "load")
                                                   for g in IDLE_MS}
    for r in range(args.rounds + 1):  # round 0 warms up
        cells = list(times)
        rng.shuffle(cells)
        for kind, idle_ms in cells:
            key, before = rng.choice(keys), rng.choice(keys)
            if idle_ms:
                time.sleep(idle_ms / 1e3)
            if kind == "read":
                if not idle_ms:
                    read(before)
                us = read(key)
            else:
                todo.put([key] if idle_ms else [before, key])
                us = done.get()
            if r:
                times[(kind, idle_ms)].append(us)
    todo.put(None)
    thread.join()
    reader.close()
    print(f"{'idle ms':>8} " + " ".join(f"{g:>7}" for g in IDLE_MS))
    for kind in ("read", "load"):
        med = [statistics.median(times[(kind, g)]) for g in IDLE_MS]
        print(f"{kind:>8} " + " ".join(f"{m:7.0f}" for m in med) + "  us (median)")
        print(f"{'extra':>8} " + " ".join(f"{m - med[0]:7.0f}" for m in med))
    extra = {k: [statistics.median(times[(k, g)]) - statistics.median(times[(k, 0.0)])
                 for g in IDLE_MS[1:]] for k in ("read", "load")}
    ratios = [a / b for a, b in zip(extra["load"], extra["read"], strict=True) if b > 0]
    print("whole load's extra / first read's extra (median over idle times): "
          f"{statistics.median(ratios):.2f}x" if ratios else "no read extra measured")


if __name__ == "__main__":
    main()
