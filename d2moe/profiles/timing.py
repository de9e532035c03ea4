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


def fit_cold_curve(points: Sequence[tuple[float, float, float]],
                   z: float = 2.0) -> tuple[tuple[float, float], ...]:
    """The cold cost per pause from (pause_us, idle_us, extra_us) points, one per burst of
    loads after the probe paused `pause_us`: ((mean idle_us, mean extra_us), ...) per pause,
    rising with it; () when nothing stands clear of 0.

    A mean stays only where it stands `z` standard errors clear of 0 (`clear_excess`), and
    the means are then made non-decreasing (pool-adjacent-violators, weighted by points): a
    load after a longer pause is no faster. Two-part fits (a floor plus a ramp, or a ramp
    alone) swung from round to round on the development VM between a 45-93 us floor and a
    ramp charging 10-25 us at the decode's 0.25-1 ms pauses, while the probe's own means
    there were 0-27 us in every run but one (docs/results/fidelity.md, 2026-11-24); on a
    Mixtral-sized load (40 ms, bursts varying by tens of ms) the gate keeps stalls from
    reading as a cost."""
    by_pause: dict[float, list[tuple[float, float]]] = {}
    for pause, idle, extra in points:
        by_pause.setdefault(pause, []).append((idle, extra))
    # in the order of the idle the thread saw (a slow hand-over can reorder two pauses)
    groups = sorted((statistics.fmean(i for i, _ in g), [e for _, e in g])
                    for g in by_pause.values())
    means = _rising([max(clear_excess(extras, z=z), 0.0) for _, extras in groups],
                    [len(extras) for _, extras in groups])
    curve: list[tuple[float, float]] = []
    for (idle, _), us in zip(groups, means, strict=True):
        if curve and round(idle, 1) <= curve[-1][0]:
            curve.pop()  # the same idle once rounded: the later point, no lower, stays
        curve.append((round(idle, 1), round(us, 2)))
    return tuple(curve) if any(us > 0 for _, us in curve) else ()


def _rising(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """The non-decreasing sequence nearest `values` in weighted least squares
    (pool-adjacent-violators)."""
    blocks: list[tuple[float, float, int]] = []  # (weight, mean, members)
    for v, w in zip(values, weights, strict=True):
        blocks.append((w, v, 1))
        while len(blocks) > 1 and blocks[-2][1] > blocks[-1][1]:
            (w2, v2, n2), (w1, v1, n1) = blocks.pop(), blocks.pop()
            blocks.append((w1 + w2, (w1 * v1 + w2 * v2) / (w1 + w2), n1 + n2))
    return [v for _, v, n in blocks for _ in range(n)]


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
    """A tqdm bar (or nothing: disabled, or stderr not a terminal) advanced by measurement
    points."""

    def __init__(self, total: int, enabled: bool) -> None:
        from d2moe.core.progress import progress_bar

        self.bar = progress_bar(total, enabled, "profile", "point")

    def step(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            if self.bar.n != self.bar.total:  # a miscounted total: end the bar at 100%
                self.bar.total = self.bar.n
                self.bar.refresh()
            self.bar.close()
