"""Execute one layer's plan on the I/O and compute lanes: a SimPy model and an exact fast path.

Both engines follow the same rules (see `core.jobs.run_waits/load_waits`):
- the I/O lane runs loads in plan order; a load starts when the lane is free and the runs
  its evictions wait for have ended; it takes `load_us(bytes)`;
- the compute lane runs in plan order; a run starts when the lane is free and its load has
  ended; waiting shows as a `stall` row;
- evictions happen at their load's start;
- a plan with loads starts `handoff_us` later than one without (the real executor hands
  only plans with loads to the I/O lane's thread; 0 unless the profile measured it);
- a lane that had to wait for the other resumes `wake_us` after the signal (the real
  executor's thread hand-off; 0 unless the profile measured it), and the I/O lane takes a
  layer's first load `wake_us` after the plan is handed to it;
- a load that starts `idle` us after the I/O lane's previous load ended (in any layer) takes
  `cold_us(idle)` longer (the disk's first request after a pause; none unless measured);
- the first run waiting on a load takes `first_run_us` longer (its planes come from the I/O
  lane's core; 0 unless measured), and the first run of the plan `layer_first_run_us` longer
  (the layer's non-expert slice cycled the caches in between; 0 unless measured);
- the layer ends when both lanes are done (a prefetch for the next layer may outlast the
  runs; the executor waits for it too);
- with lane contention (speeds < 1 in the profile) both engines time the plan with the fluid
  model of `sim/contention.py`.
Both write identical Event rows; tests cross-check them on random plans.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from d2moe.core.events import Event, load_event, run_event
from d2moe.core.jobs import Load, Plan, Run, load_waits, run_waits
from d2moe.policies.view import ResidentSet
from d2moe.sim.contention import execute_contended, start_after


@dataclass
class LayerCtx:
    """What a plan execution needs besides the plan: where rows go and what things cost."""

    step: int
    layer: int
    pool: ResidentSet
    events: list[Event]
    load_us: Callable[[Load, int], float]  # (load, bytes) -> duration
    run_us: Callable[[Run], float]
    wake_us: float = 0.0  # a lane blocked on the other resumes this long after the signal
    io_speed: float = 1.0  # the I/O lane's speed while the compute lane is busy (contention)
    compute_speed: float = 1.0  # the compute lane's speed while the I/O lane is busy
    cold_us: Callable[[float], float] | None = None  # (idle us) -> a cold load's extra us
    io_last_end: float = -math.inf  # when the I/O lane's last load ended (across layers)
    first_run_us: float = 0.0  # extra time of the first run after its expert's load
    layer_first_run_us: float = 0.0  # extra time of the plan's first run (after non-expert)
    handoff_us: float = 0.0  # a plan with loads starts this much later (the I/O hand-off)
    run_wait_us: float = 0.0  # what a run overlapping a load pays more, once (contention)
    loaded: bool = False  # whether the last plan had loads (the drivers set it)

    @property
    def contended(self) -> bool:
        """Whether the lanes slow each other down (then `sim/contention.py` times the plan)."""
        return self.io_speed < 1.0 or self.compute_speed < 1.0 or self.run_wait_us > 0.0


def plan_start(ctx: LayerCtx, plan: Plan, t0: float) -> float:
    """When a plan handed over at `t0` starts: `handoff_us` later when it has loads (the
    executor wakes the I/O lane's thread only for those), else at once."""
    return t0 + ctx.handoff_us if plan.loads else t0


def _do_load(ctx: LayerCtx, ld: Load, start: float) -> float:
    """Apply a load's evictions and the load itself to the pool; record rows; return its end."""
    ev_rows, pool = ctx.events, ctx.pool
    for ev in ld.evict:
        freed = pool.apply_evict(ev)
        ev_rows.append(Event("memory", "evict", ctx.step, ev.key.layer, ev.key.expert,
                             ev.bits_from, ev.bits_to, 0, freed, start, start))
    nbytes = pool.apply_load(ld)
    end = start + ctx.load_us(ld, nbytes)
    if ctx.cold_us is not None:
        end += ctx.cold_us(start - ctx.io_last_end)
    ctx.io_last_end = end
    ev_rows.append(load_event(ctx.step, ld, nbytes, start, end))
    return end


def first_runs(rw: list[int]) -> list[bool]:
    """Per run: whether it is the first run waiting on its load (rw: `run_waits`)."""
    seen: set[int] = set()
    out = []
    for d in rw:
        out.append(d >= 0 and d not in seen)
        seen.add(d)
    return out


def run_extras_us(ctx: LayerCtx, rw: list[int]) -> list[float]:
    """Per run of a plan (rw: `run_waits`), what it takes beyond its expert's cost: the
    first run after each load `first_run_us`, the plan's first run `layer_first_run_us`."""
    if not ctx.first_run_us:  # profiles without lane costs: the simulator's hot path
        out = [0.0] * len(rw)
    else:
        out = [ctx.first_run_us if first else 0.0 for first in first_runs(rw)]
    if out:
        out[0] += ctx.layer_first_run_us
    return out


def _do_run(ctx: LayerCtx, run: Run, free: float, ready: float, extra_us: float = 0.0) -> float:
    """Record a run starting at max(free, ready), with a stall row if it waited; it takes its
    cost plus `extra_us` (`run_extras_us`)."""
    rows = ctx.events
    start = start_after(free, ready, ctx.wake_us)
    if start > free:
        rows.append(Event("compute", "stall", ctx.step, ctx.layer, run.source.expert, 0, 0, 0, 0,
                          free, start))
    end = start + ctx.run_us(run) + extra_us
    rows.append(run_event(ctx.step, ctx.layer, run, start, end))
    return end


def execute_fast(ctx: LayerCtx, plan: Plan, t0: float) -> float:
    """Exact two-lane recurrence without SimPy; returns when the compute lane is done.

    load i starts at max(io_free, end of run load_waits[i]);
    run j starts at max(cpu_free, end of load run_waits[j]).
    """
    t0 = plan_start(ctx, plan, t0)
    if ctx.contended:
        return execute_contended(ctx, plan, t0)
    loads, runs = plan.loads, plan.runs
    rw = run_waits(plan)
    extra = run_extras_us(ctx, rw)
    lw = load_waits(plan)
    if max(lw, default=-1) < 0:
        lw = None  # the I/O lane never waits on compute in this plan
    load_end = [0.0] * len(loads)
    run_end = [0.0] * len(runs)
    io = t0 + ctx.wake_us if loads else t0
    cpu = t0
    i = j = 0
    n_l, n_r = len(loads), len(runs)
    while i < n_l or j < n_r:
        moved = False
        if i < n_l and (lw is None or lw[i] < j):
            start = io if lw is None or lw[i] < 0 else start_after(io, run_end[lw[i]], ctx.wake_us)
            io = load_end[i] = _do_load(ctx, loads[i], start)
            i += 1
            moved = True
        if j < n_r and rw[j] < i:
            ready = load_end[rw[j]] if rw[j] >= 0 else t0
            cpu = run_end[j] = _do_run(ctx, runs[j], cpu, ready, extra[j])
            j += 1
            moved = True
        if not moved:
            raise RuntimeError(f"plan deadlocks at load {i}, run {j}: {plan}")
    return max(cpu, io)  # prefetches may outlast the runs: the layer ends when both lanes do


def simpy_layer(env: Any, ctx: LayerCtx, plan: Plan, t0: float) -> Generator[Any, Any, float]:
    """SimPy process for one layer: an I/O process and the compute lane, joined at the end.

    Times are carried in the processes' own variables (SimPy orders the waits), so both
    engines do the same float arithmetic and their rows match exactly.
    """
    t0 = plan_start(ctx, plan, t0)
    if ctx.contended:
        end = execute_contended(ctx, plan, t0)
        yield env.timeout(max(0.0, end - env.now))
        return end
    loads, runs = plan.loads, plan.runs
    rw, lw = run_waits(plan), load_waits(plan)
    extra = run_extras_us(ctx, rw)
    load_done = [env.event() for _ in loads]
    run_done = [env.event() for _ in runs]
    load_end = [0.0] * len(loads)
    run_end = [0.0] * len(runs)

    def io_lane() -> Generator[Any, Any, None]:
        io = t0 + ctx.wake_us
        for i, ld in enumerate(loads):
            if lw[i] >= 0:
                if not run_done[lw[i]].triggered:
                    yield run_done[lw[i]]
                io = start_after(io, run_end[lw[i]], ctx.wake_us)
            io = load_end[i] = _do_load(ctx, ld, io)
            yield env.timeout(max(0.0, io - env.now))
            load_done[i].succeed()

    io_proc = env.process(io_lane())
    cpu = t0
    for j, run in enumerate(runs):
        ready = t0
        if rw[j] >= 0:
            if not load_done[rw[j]].triggered:
                yield load_done[rw[j]]
            ready = load_end[rw[j]]
        cpu = run_end[j] = _do_run(ctx, run, cpu, ready, extra[j])
        yield env.timeout(max(0.0, cpu - env.now))
        run_done[j].succeed()
    yield io_proc
    return max(cpu, load_end[-1]) if loads else cpu
