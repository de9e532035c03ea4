"""Timing helpers of `d2moe profile`: robust means over interleaved rounds, the latency +
bandwidth fit, and the progress bar."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np


def fit_latency_bandwidth(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Fit t_us = latency_us + bytes / (GBps * 1e3) to (bytes, us): (latency_us, GBps).

    Least squares on the relative error (each point weighted by 1/t), so small requests,
    the ones an expert's planes make, fit as well as large ones. The latency is clamped at
    0; a flat or falling slope gives an infinite bandwidth.
    """
    x = np.array([p[0] for p in points], float)
    y = np.array([p[1] for p in points], float)
    if len(points) < 2 or np.ptp(x) == 0:
        return max(float(np.median(y)), 0.0), math.inf
    w = 1.0 / np.maximum(np.abs(y), 1e-9)
    slope, intercept = np.polyfit(x, y, 1, w=w)
    if slope <= 0:
        return max(float(np.median(y)), 0.0), math.inf
    if intercept < 0:  # refit through the origin
        slope = float((w * w * x * y).sum() / (w * w * x * x).sum())
        intercept = 0.0
    return float(intercept), 1.0 / (float(slope) * 1e3)


def clear_excess(a: Sequence[float], b: Sequence[float] = (), z: float = 2.0) -> float:
    """mean(a) - mean(b) (b empty: a holds paired differences) when it stands above `z`
    standard errors of that difference, else 0. A surcharge the probe cannot tell from its
    own noise is not charged: a Mixtral-sized expert run (200+ ms on a CPU, drifting by tens
    of ms) gave first-run "surcharges" of 5 and 40 ms in two profiles a few minutes apart,
    while real runs right after a load took no longer than the others."""
    def var_of_mean(xs: Sequence[float]) -> float:
        return statistics.variance(xs) / len(xs) if len(xs) > 1 else math.inf

    if not a:
        return 0.0
    diff = statistics.fmean(a) - (statistics.fmean(b) if b else 0.0)
    se = math.sqrt(var_of_mean(a) + (var_of_mean(b) if b else 0.0))
    return diff if diff > z * se else 0.0


def fit_ramp(points: Sequence[tuple[float, float]], z: float = 2.0) -> tuple[float, float]:
    """Fit extra_us = full_us * min(1, idle_us / ramp_us) to (idle_us, extra_us) points:
    (full_us, ramp_us), least squares; ramp_us from the points' idle times and a grid between
    them (0: the full amount after any idle time). A fit below 0 gives (0, 0): no cost; so
    does one whose points past the ramp do not stand `z` standard errors clear of 0
    (`clear_excess`): on a Mixtral-sized load (40 ms, bursts varying by tens of ms) two
    stalls made a 7-17 ms "cold cost" that the real loads after a pause never paid
    (docs/results/fidelity.md, 2026-11-24)."""
    idle = np.array([p[0] for p in points], float)
    extra = np.array([p[1] for p in points], float)
    top = float(idle.max(initial=0.0))
    if top <= 0:
        return 0.0, 0.0
    best = (math.inf, 0.0, 0.0)
    for ramp in _ramp_candidates(idle, top):
        x = np.minimum(1.0, idle / ramp)
        full = float((x * extra).sum() / (x * x).sum())
        err = float(((full * x - extra) ** 2).sum())
        if err < best[0]:
            best = (err, full, ramp)
    _, full, ramp = best
    past = [e for i, e in zip(idle.tolist(), extra.tolist(), strict=True) if i >= ramp]
    return (0.0, 0.0) if full <= 0 or clear_excess(past, z=z) <= 0 else (full, ramp)


def _ramp_candidates(idle: np.ndarray, top: float) -> list[float]:
    """The ramp lengths a cold fit tries: a grid up to the longest pause, and every pause."""
    return sorted({*np.linspace(top / 64, top, 64).tolist(), *idle[idle > 0].tolist()})


def fit_cold(points: Sequence[tuple[float, float]], floor_ramp_us: float,
             z: float = 2.0) -> tuple[float, float, float]:
    """Fit extra_us = floor_us * min(1, idle_us / floor_ramp_us) + full_us * min(1, idle_us /
    ramp_us) to (idle_us, extra_us) points: (floor_us, full_us, ramp_us), both amounts >= 0,
    least squares over the same ramp candidates as `fit_ramp`. A load after any pause pays a
    floor that the line through zero of `fit_ramp` misses (development VM, tiny loads,
    2026-11-24: 20-25 us after pauses of 0.27-3 ms, growing only beyond). Each part is kept
    only where the points stand `z` standard errors clear of 0 once the other part is taken
    off (`clear_excess`): the ramp over the points past `ramp_us`; the floor over each of the
    two shortest octaves of pauses, [1, 2) and [2, 4) x `floor_ramp_us`, on its own (one
    mean over every pause let a Mixtral-sized probe's stalls and drift, +-10 ms on 40 ms
    loads, through as a 3 ms floor). A part dropped, the other is fitted alone again."""
    idle = np.array([p[0] for p in points], float)
    extra = np.array([p[1] for p in points], float)
    top = float(idle.max(initial=0.0))
    if top <= 0:
        return 0.0, 0.0, 0.0
    x1 = np.minimum(1.0, np.maximum(idle, 0.0) / floor_ramp_us)
    best = (math.inf, 0.0, 0.0, 0.0)
    for ramp in _ramp_candidates(idle, top):
        x2 = np.minimum(1.0, idle / ramp)
        floor, full = _nonnegative_pair(x1, x2, extra)
        err = float(((floor * x1 + full * x2 - extra) ** 2).sum())
        if err < best[0]:
            best = (err, floor, full, ramp)
    _, floor, full, ramp = best
    if full > 0 and clear_excess([e - floor for i, e in zip(idle, extra, strict=True)
                                  if i >= ramp], z=z) <= 0:
        full, ramp = 0.0, 0.0
    if floor > 0 and not _floor_is_clear(idle, extra - (full * np.minimum(1.0, idle / ramp)
                                                         if full > 0 else 0.0),
                                         floor_ramp_us, z):
        floor = 0.0
    if floor == 0.0:
        full, ramp = fit_ramp(points, z=z)
    elif full == 0.0:
        floor = float((x1 * extra).sum() / (x1 * x1).sum())
        if floor <= 0 or not _floor_is_clear(idle, extra, floor_ramp_us, z):
            floor = 0.0
    return float(floor), float(full), float(ramp)


def _floor_is_clear(idle: np.ndarray, rest: np.ndarray, floor_ramp_us: float,
                    z: float) -> bool:
    """Whether the pauses of [1, 2) and of [2, 4) x `floor_ramp_us` each leave an extra
    `z` standard errors clear of 0 (`rest`: the extra less the ramp's part)."""
    return all(clear_excess(rest[(idle >= lo * floor_ramp_us) & (idle < 2 * lo * floor_ramp_us)]
                            .tolist(), z=z) > 0 for lo in (1, 2))


def _nonnegative_pair(x1: np.ndarray, x2: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) >= 0 minimising |a x1 + b x2 - y|^2 (two columns: the unconstrained solution,
    else the better of each column alone)."""
    a11, a12, a22 = float(x1 @ x1), float(x1 @ x2), float(x2 @ x2)
    b1, b2 = float(x1 @ y), float(x2 @ y)
    det = a11 * a22 - a12 * a12
    if det > 1e-12 * max(a11 * a22, 1e-300):
        a, b = (b1 * a22 - b2 * a12) / det, (b2 * a11 - b1 * a12) / det
        if a >= 0 and b >= 0:
            return a, b
    alone = [(max(0.0, b1 / a11) if a11 > 0 else 0.0, 0.0),
             (0.0, max(0.0, b2 / a22) if a22 > 0 else 0.0)]
    return min(alone, key=lambda ab: float(((ab[0] * x1 + ab[1] * x2 - y) ** 2).sum()))


def interleaved_means(fns: Sequence[Callable[[int], float | None]], repeats: int,
                      sync: Callable[[], None], bar: Bar | None = None, what: str = "",
                      min_s: float = 0.1, max_rounds: int = 2000) -> list[float]:
    """Mean time in us of each fn: at least `repeats` rounds, and more until every fn has
    spent `min_s` seconds (at most `max_rounds`), after a warm-up round.

    Each round calls every fn once, in its own shuffled order (seeded: reproducible), so a
    burst of load from another process spreads over the points instead of slowing a few
    neighbours. A plain mean over enough time, because on a CPU shared with other work a
    long run pays the preemptions that only some short timings catch (a median or a trimmed
    mean of short timings leaves them out and came out 1.5-2x optimistic on the development
    VM). A fn returning a number reports its own time (it times only part of what it does);
    otherwise its wall time is taken (with `sync` after it)."""
    times: list[list[float]] = [[] for _ in fns]
    spent_s = [0.0] * len(fns)
    rng = np.random.default_rng(0)
    r = -1
    while r < repeats or (min(spent_s, default=min_s) < min_s and r < max_rounds):
        for i in rng.permutation(len(fns)).tolist():
            t0 = time.perf_counter()
            own = fns[i](r)
            sync()
            spent = (time.perf_counter() - t0) * 1e6 if own is None else own
            if r >= 0:
                times[i].append(spent)
                spent_s[i] += spent / 1e6
                if bar is not None and r < repeats:
                    bar.step(what)
        r += 1
    return [statistics.fmean(t) for t in times]


class Bar:
    """A tqdm bar (or nothing) advanced by measurement points."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="profile", unit="point")

    def step(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
