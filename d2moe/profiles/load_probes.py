"""The load probes of `d2moe profile`, through the I/O lane's own steps (`executor/lanes.py`):
whole loads (read, check, convert, place), evictions, the store's checksum speed, and what
loads cost beyond a steady stream after the lane sat idle (cold loads)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from d2moe.core.sizes import QuantLayout
from d2moe.core.spec import ModelSpec
from d2moe.profiles.timing import Bar, interleaved_means


def measure_loads(reader: Any, probe: ModelSpec, layout: QuantLayout, device: Any,
                  raises: Sequence[tuple[int, int]], repeats: int, sync: Callable[[], None],
                  bar: Bar) -> list[tuple[list[int], float]]:
    """(each level's bytes, us) of the I/O lane's whole load: read, check, convert, place."""
    from d2moe.core.jobs import ExpertKey, Load
    from d2moe.core.sizes import all_experts_bytes
    from d2moe.executor.pool import ExpertPool

    pool = ExpertPool(probe, layout, all_experts_bytes(probe, layout.bK, layout), device)
    keys = [ExpertKey(0, e) for e in range(probe.experts)]

    def loader(bits_from: int, bits_to: int) -> Callable[[int], float]:
        def load(i: int) -> float:
            key = keys[i % len(keys)]
            drop_expert(pool, key)
            if bits_from:
                base = Load(key, 0, bits_from)
                load_into(reader, pool, base)
            sync()
            t0 = time.perf_counter()
            ld = Load(key, bits_from, bits_to)
            load_into(reader, pool, ld)
            sync()
            return (time.perf_counter() - t0) * 1e6

        return load

    means = interleaved_means([loader(a, b) for a, b in raises], repeats, sync, bar, "load")
    for key in list(pool.blocks):
        drop_expert(pool, key)
    def levels(a: int, b: int) -> list[int]:
        return [reader.expert_nbytes(0, 0, 0 if k == layout.b1 else k - 1, k)
                for k in range(layout.b1 if a == 0 else a + 1, b + 1)]

    return [(levels(a, b), us) for (a, b), us in zip(raises, means, strict=True)]


def measure_check_GBps(nbytes: int, repeats: int) -> float:
    """GB/s of zlib.crc32 over a fresh `nbytes` buffer (the store's check of one level;
    median of `repeats`, each at least 2 ms of checking)."""
    import zlib

    buf = np.random.default_rng(7).integers(0, 256, size=max(nbytes, 4096), dtype=np.uint8)
    calls = max(1, int(2e-3 * 3e9 / buf.nbytes))  # ~2 ms at 3 GB/s
    rates = []
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        for _ in range(calls):
            zlib.crc32(buf)
        rates.append(calls * buf.nbytes / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def measure_evict_us(reader: Any, probe: ModelSpec, layout: QuantLayout, device: Any,
                     bits: int, repeats: int) -> float:
    """Median us of one eviction as the I/O lane makes it before a load (`ExpertPool.evict`
    of an expert resident at `bits` that has run: its level blocks freed, its views and
    kernel inputs forgotten); at least 20 timed. A lower bound: on the development VM 6 us
    here, 11-13 us inside the tiny model's runs, whose caches are colder."""
    from d2moe.core.jobs import Evict, ExpertKey, Load
    from d2moe.core.sizes import all_experts_bytes
    from d2moe.executor.pool import ExpertPool

    pool = ExpertPool(probe, layout, all_experts_bytes(probe, layout.bK, layout), device)
    keys = [ExpertKey(0, e) for e in range(probe.experts)]
    times = []
    for i in range(max(20, 10 * repeats)):
        key = keys[i % len(keys)]
        load_into(reader, pool, Load(key, 0, bits))
        with pool.moving:  # its kernel inputs, as a run leaves them
            pool.matrices(key, bits)
        t0 = time.perf_counter()
        pool.evict(Evict(key, bits, 0))
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def drop_expert(pool: Any, key: Any) -> None:
    """Evict every resident level of `key` from `pool` (the probes' way to make a load cold)."""
    from d2moe.core.jobs import Evict

    have = pool.view.bits.get(key, 0)
    if have:
        pool.evict(Evict(key, have, 0))


def load_into(reader: Any, pool: Any, ld: Any) -> int:
    """What the I/O lane does for one load (`executor/lanes.py`): read the levels, then place
    them in the pool (on the CPU converted straight into it where the pool can; otherwise
    converted, then placed); returns the bytes."""
    raw = reader.read_planes(ld.key.layer, ld.key.expert, ld.bits_from, ld.bits_to)
    if pool.device.type != "cuda" and hasattr(pool, "admit_stored"):
        return int(pool.admit_stored(ld, raw))
    return int(pool.admit(ld, {bits: pool.fmt.convert(bits, raw[bits])
                               for bits in pool.levels_of(ld)}))


COLD_IDLE_MS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0)  # I/O lane idle before a burst
COLD_BURST = 3  # loads timed after each pause: the coldness outlasts the first one
# Rounds go on past the asked count until the probe has run this long (at most
# COLD_MAX_ROUNDS): a small expert's round takes ~50 ms, and its ~100 us cold cost needs
# more bursts than a few rounds give to stand clear of their noise (fit_cold_curve's gate);
# Mixtral-sized rounds (1-2 s) stop at the asked count as before.
COLD_MIN_S = 3.0
COLD_MAX_ROUNDS = 120
STEADY_LOADS = (4, 12)  # of a long hand-over, loads [4, 12) are the warm baseline


def measure_cold_loads(reader: Any, probe: ModelSpec, layout: QuantLayout, device: Any,
                       bits: int, rounds: int, sync: Callable[[], None],
                       bar: Bar, min_s: float = COLD_MIN_S
                       ) -> list[tuple[float, float, float]]:
    """(pause us, idle us, extra us) of whole loads (read, checksum, convert, place) on an
    I/O thread woken through a queue (as `executor/lanes.py`) after it sat idle: the extra
    of the first COLD_BURST loads after the pause over a steady stream of loads, summed (the
    simulator charges it to the first): the disk's first requests after a pause and the
    lane's core and caches gone cold. A whole load's extra is 2-4x what one read shows, and
    the next load still pays about a fifth of it (development VM, 2026-11-23: after 3 ms
    idle 1510, 1114, 1049 us for loads 1-3 against 1011 in a stream;
    benchmarks/cold_loads.py). Each round makes every pause in COLD_IDLE_MS once, shuffled,
    and one stream; idle is measured on the thread (last load's end to the burst's start:
    the pause and the hand-over). One point per burst, so that `fit_cold_curve` can tell a
    cost from the bursts' noise; at least `rounds` rounds, more until `min_s` seconds have
    gone (at most COLD_MAX_ROUNDS)."""
    import queue
    import threading

    from d2moe.core.jobs import ExpertKey, Load
    from d2moe.core.sizes import all_experts_bytes
    from d2moe.executor.pool import ExpertPool

    pool = ExpertPool(probe, layout, all_experts_bytes(probe, layout.bK, layout), device)
    keys = [ExpertKey(0, e) for e in range(probe.experts)]
    todo: queue.Queue[int | None] = queue.Queue()  # how many loads to do back to back
    done: queue.Queue[tuple[float, list[float]]] = queue.Queue()  # (idle us, each load's us)
    last_end = [time.perf_counter()]

    def io_lane() -> None:
        n = 0
        while (count := todo.get()) is not None:
            idle_us, spans = (time.perf_counter() - last_end[0]) * 1e6, []
            for _ in range(count):
                key = keys[n % len(keys)]
                n += 1
                drop_expert(pool, key)
                t0 = time.perf_counter()
                load_into(reader, pool, Load(key, 0, bits))
                sync()
                last_end[0] = time.perf_counter()
                spans.append((last_end[0] - t0) * 1e6)
            done.put((idle_us, spans))

    thread = threading.Thread(target=io_lane, daemon=True)
    thread.start()
    rng = np.random.default_rng(6)
    bursts: dict[float, list[tuple[float, list[float]]]] = {g: [] for g in COLD_IDLE_MS}
    steady: list[float] = []
    t_end = time.perf_counter() + min_s
    r = -1
    try:
        while (r := r + 1) <= rounds or (time.perf_counter() < t_end
                                         and r <= COLD_MAX_ROUNDS):  # round 0 warms up
            for g in rng.permutation(len(COLD_IDLE_MS)).tolist():
                time.sleep(COLD_IDLE_MS[g] / 1e3)
                todo.put(COLD_BURST)
                got = done.get()
                if r:
                    bursts[COLD_IDLE_MS[g]].append(got)
            todo.put(STEADY_LOADS[1])
            spans = done.get()[1]
            if r:
                steady += spans[STEADY_LOADS[0]:]
            if r and r % 2 == 0 and r <= rounds:  # (the bar counts the asked rounds)
                bar.step("cold loads")
    finally:
        todo.put(None)
        thread.join()
    for key in list(pool.blocks):
        drop_expert(pool, key)
    warm = statistics.fmean(steady)
    return [(pause_ms * 1e3, idle_us, sum(spans) - len(spans) * warm)
            for pause_ms, got in bursts.items() for idle_us, spans in got]
