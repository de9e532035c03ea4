"""Lane contention: the I/O and compute lanes share one resource (the CPU cores and the
interpreter lock of the real executor on a CPU), so each runs slower while the other is busy.

Model (fluid): a job has its nominal duration from the profile; while both lanes execute a
job, the I/O job progresses at `io_speed` and the compute job at `compute_speed` (fractions
of nominal speed, measured by `d2moe profile`); otherwise at full speed. A run gets
`run_wait_us` more work the first time a load runs beside it (a wait for what the load
holds, the same whatever the run's length). A stalled lane is not
busy. The dependency rules are the plan's (`core.jobs.run_waits/load_waits`) with the same
hand-off (`wake_us`) and cold loads (`cold_us`: extra nominal work of a load that starts
after the I/O lane sat idle) as the uncontended engines. Both simulator engines take a contended
layer's times from `fluid_schedule`, so their rows stay identical; with both speeds 1 the
engines use their own exact recurrences instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from d2moe.core.events import Event, load_event, run_event
from d2moe.core.jobs import Evict, Plan, load_waits, run_waits

INF = math.inf


class _Job:
    """A job in progress: its index, nominal work left, since when, at what speed."""

    __slots__ = ("index", "left", "since", "speed")

    def __init__(self, index: int, work: float, start: float, speed: float) -> None:
        self.index, self.left, self.since, self.speed = index, work, start, speed

    @property
    def end(self) -> float:
        return self.since + self.left / self.speed

    def reprice(self, t: float, speed: float) -> None:
        if speed != self.speed:
            self.left = max(self.left - (t - self.since) * self.speed, 0.0)
            self.since, self.speed = t, speed


def start_after(free: float, ready: float, wake_us: float) -> float:
    """When a lane free at `free` starts a job whose dependency ends at `ready` (a lane that
    had to wait for it pays the wake-up)."""
    return free if ready <= free else ready + wake_us


def fluid_schedule(load_us: Sequence[float], run_us: Sequence[float], rw: Sequence[int],
                   lw: Sequence[int], t0: float, wake_us: float, io_speed: float,
                   compute_speed: float, cold_us: Callable[[float], float] | None = None,
                   io_last_end: float = -INF, run_wait_us: float = 0.0
                   ) -> tuple[list[float], list[float], list[float], list[float]]:
    """(load starts, load ends, run starts, run ends) of one layer's plan under contention.

    Loads run in order on the I/O lane (load i after the run lw[i], if any), runs in order on
    the compute lane (run j after the load rw[j], if any); the I/O lane takes its first load
    `wake_us` after t0, and a lane that waited on the other starts `wake_us` after the signal.
    A load starting `idle` us after the previous one ended (`io_last_end` before this layer)
    has `cold_us(idle)` more nominal work; a run beside a load, `run_wait_us` more, once.
    """
    nl, nr = len(load_us), len(run_us)
    ls, le, rs, re = [0.0] * nl, [0.0] * nl, [0.0] * nr, [0.0] * nr
    io_free, cpu_free = (t0 + wake_us if nl else t0), t0
    i = j = 0  # the next job each lane starts
    io: _Job | None = None
    cpu: _Job | None = None
    waited = False  # whether the run in progress has been charged its wait
    while i < nl or j < nr or io is not None or cpu is not None:
        io_next = cpu_next = INF
        if io is None and i < nl:
            d = lw[i]
            if d < 0:
                io_next = io_free
            elif d < j and (cpu is None or cpu.index != d):
                io_next = start_after(io_free, re[d], wake_us)
        if cpu is None and j < nr:
            d = rw[j]
            if d < 0:
                cpu_next = cpu_free
            elif d < i and (io is None or io.index != d):
                cpu_next = start_after(cpu_free, le[d], wake_us)
        io_end = io.end if io is not None else INF
        cpu_end = cpu.end if cpu is not None else INF
        t = min(io_next, cpu_next, io_end, cpu_end)
        if t == INF:
            raise RuntimeError(f"plan deadlocks at load {i}, run {j}")
        if io is not None and io_end == t:
            le[io.index] = io_free = t
            io = None
        if cpu is not None and cpu_end == t:
            re[cpu.index] = cpu_free = t
            cpu = None
        if io is None and io_next == t:
            ls[i] = t
            work = load_us[i]
            if cold_us is not None:
                work += cold_us(t - (le[i - 1] if i else io_last_end))
            io = _Job(i, work, t, 1.0)
            i += 1
        if cpu is None and cpu_next == t:
            rs[j] = t
            cpu = _Job(j, run_us[j], t, 1.0)
            waited = False
            j += 1
        both = io is not None and cpu is not None
        if io is not None:
            io.reprice(t, io_speed if both else 1.0)
        if cpu is not None:
            cpu.reprice(t, compute_speed if both else 1.0)
            if both and not waited:
                cpu.left += run_wait_us
                waited = True
    return ls, le, rs, re


def execute_contended(ctx: object, plan: Plan, t0: float) -> float:
    """Apply the plan to the pool, time it with `fluid_schedule`, write the rows (the same
    rows as `lanes.execute_fast` would, at the contended times); returns the compute end."""
    from d2moe.sim.lanes import LayerCtx, run_extras_us

    assert isinstance(ctx, LayerCtx)
    pool, rows = ctx.pool, ctx.events
    freed_by: list[list[tuple[Evict, int]]] = []
    nbytes: list[int] = []
    durations: list[float] = []
    for ld in plan.loads:  # pool changes happen in load order whatever the timing
        freed_by.append([(ev, pool.apply_evict(ev)) for ev in ld.evict])
        n = pool.apply_load(ld)
        nbytes.append(n)
        durations.append(ctx.load_us(ld, n))
    rw = run_waits(plan)
    runs_us = [ctx.run_us(r) + extra
               for r, extra in zip(plan.runs, run_extras_us(ctx, rw), strict=True)]
    ls, le, rs, re = fluid_schedule(durations, runs_us, rw, load_waits(plan), t0, ctx.wake_us,
                                    ctx.io_speed, ctx.compute_speed, ctx.cold_us, ctx.io_last_end,
                                    ctx.run_wait_us)
    if le:
        ctx.io_last_end = le[-1]
    for k, ld in enumerate(plan.loads):
        for ev, freed in freed_by[k]:
            rows.append(Event("memory", "evict", ctx.step, ev.key.layer, ev.key.expert,
                              ev.bits_from, ev.bits_to, 0, freed, ls[k], ls[k]))
        rows.append(load_event(ctx.step, ld, nbytes[k], ls[k], le[k]))
    free = t0
    for j, run in enumerate(plan.runs):
        if rs[j] > free:
            rows.append(Event("compute", "stall", ctx.step, ctx.layer, run.source.expert, 0, 0,
                              0, 0, free, rs[j]))
        rows.append(run_event(ctx.step, ctx.layer, run, rs[j], re[j]))
        free = re[j]
    return max(re[-1] if re else t0, le[-1] if le else t0)
