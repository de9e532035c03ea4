"""The simulator: replay a trace through a policy on a hardware profile, emit a Timeline.

Per step and layer: the compute lane runs the layer's non-expert part (attention, router;
layer 0's also the step's head), whose output fixes the layer's demands; the policy plans
them; both lanes then execute the plan (`lanes.py`). Deterministic: no randomness, ties
broken by expert id in the policies.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from d2moe.core.errors import UserError
from d2moe.core.events import Event, Timeline
from d2moe.core.jobs import Demand, ExpertKey, Load
from d2moe.core.sizes import QuantLayout, fmt_bytes
from d2moe.core.spec import ModelSpec
from d2moe.policies.presets import Policy
from d2moe.policies.view import ResidentSet, Sizes
from d2moe.sim.costs import HostCache, ProfileCosts
from d2moe.sim.lanes import LayerCtx, execute_fast, simpy_layer

ENGINES = ("fast", "simpy")


@dataclass(frozen=True)
class StepWork:
    """One forward step: its phase, its token count and its demands per layer."""

    phase: str  # "prefill" | "decode"
    tokens: int
    layers: Sequence[Sequence[Demand]]


class StepSource:
    """The steps a simulation runs, asked for one at a time; this base replays a fixed list.

    A subclass may decide a step's work from what the simulated steps before it did (the
    adaptive capacity controller re-places widths: d2moe/sim/adaptive.py): `work(s)` is
    asked right before step s runs, `observe` right after, with the step's Event rows.
    """

    def __init__(self, steps: Sequence[StepWork] = ()) -> None:
        self.steps = steps

    def __len__(self) -> int:
        return len(self.steps)

    def max_bits(self, default: int) -> int:
        """The most bits any demand can ask for (sizes the storage check and the budget)."""
        return max((d.bits for s in self.steps for ds in s.layers for d in ds), default=default)

    def min_bits(self, default: int) -> int:
        """The fewest bits any demand can ask for (the storage check's lower end)."""
        return min((d.bits for s in self.steps for ds in s.layers for d in ds), default=default)

    def work(self, s: int) -> StepWork:
        """Step s's work, asked right before it runs."""
        return self.steps[s]

    def observe(self, s: int, events: Sequence[Event], start_us: float, end_us: float) -> None:
        """Step s ran from `start_us` to `end_us`; `events` holds its rows (a fixed list
        ignores them)."""


@dataclass(frozen=True)
class SimSetup:
    """Everything fixed across the policies compared on one trace.

    `emulate_copies`: a policy of separate copies runs on the nested store `layout` as the
    real executor emulates it (`executor.setup.check_store_layout`: the b-bit prefix of a
    bitplane code, read as the store reader reads a raise, reloaded whole), not on a store
    of copies (one read per copy); set where a real run on that store is replayed."""

    spec: ModelSpec
    profile: Any
    layout: QuantLayout = QuantLayout()
    budget_bytes: int = 0
    host_cache_bytes: int = 0
    engine: str = "fast"
    meta: dict[str, Any] = field(default_factory=dict)
    emulate_copies: bool = False


def check_budget(setup: SimSetup, max_bits: int) -> None:
    """The budget must hold the largest expert the run can ask for."""
    one = Sizes.of(setup.spec, setup.layout).by_bits[max_bits]
    if setup.budget_bytes < one:
        raise UserError(f"budget {fmt_bytes(setup.budget_bytes)} is smaller than one expert at "
                        f"{max_bits} bits ({fmt_bytes(one)})", field="budget",
                        fix=f"give at least {one} bytes, e.g. a larger percentage (a bare "
                            "number above 1 counts bytes)")


def simulate(setup: SimSetup, steps: Sequence[StepWork] | StepSource, policy: Policy
             ) -> Timeline:
    """Run `policy` over `steps` (a list, or a `StepSource` deciding them as it goes);
    returns the Timeline (events + meta).

    The cyclic garbage collector is paused meanwhile: the loop makes no reference cycles
    (refcounting frees everything), and each collection would rescan every event created so
    far, which cost a third of the simulator's time on long traces.
    """
    with _no_cyclic_gc():
        return _simulate(setup, steps, policy)


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class SimSession:
    """The fast engine's state across steps: the pool, the lanes' context, the costs.

    `simulate` drives one over a fixed list of steps; a serving loop (concurrent requests)
    drives one step at a time, deciding each step's work from the clock.
    """

    def __init__(self, setup: SimSetup, policy: Policy) -> None:
        self.setup, self.policy = setup, policy
        self.sizes = Sizes.of(setup.spec, setup.layout)
        if setup.emulate_copies and not policy.config.quant_layout(setup.layout).nested:
            self.sizes = replace(self.sizes, nested=False)  # copies on the nested store
        self.costs = ProfileCosts(setup.profile, setup.spec, self.sizes, setup.layout)
        self.layer_us = self.costs.layer_us_for(policy.name)
        self.pool = ResidentSet(self.sizes, setup.budget_bytes)
        self.host = HostCache(setup.host_cache_bytes, self.sizes)
        self.events: list[Event] = []
        policy.reset()
        self.ctx = layer_ctx(self.costs, self.pool, self.events, self.load_us)
        self.initial_bytes = preload(policy, setup.spec, self.pool)

    def load_us(self, ld: Load, nbytes: int) -> float:
        return self.costs.load_us_of(ld, nbytes, self.host)

    def run_step(self, s: int, step: StepWork, t: float) -> float:
        """Simulate step `s` starting at `t` (us); returns when it ends."""
        costs, policy, ctx = self.costs, self.policy, self.ctx
        t_step = t
        events, view = ctx.events, ctx.pool.view
        ctx.step = s
        for layer, demands in enumerate(step.layers):
            ne = costs.non_expert_us_of(layer, step.tokens, ctx.loaded)
            events.append(Event("compute", "non_expert", s, layer, -1, 0, 0, step.tokens, 0, t,
                                t + ne))
            t += ne
            ctx.loaded = False
            if demands:
                plan = policy.plan(layer, demands, view, costs)
                ctx.layer, ctx.loaded = layer, bool(plan.loads)
                t = execute_fast(ctx, plan, t + self.layer_us)
        events.append(Event("step", step.phase, s, -1, -1, 0, 0, step.tokens, 0, t_step, t))
        return t

    def timeline(self, **meta: Any) -> Timeline:
        """The rows so far, with the run's metadata."""
        return Timeline(self.events, _meta(self.setup, self.policy, self.pool,
                                           initial_resident_bytes=self.initial_bytes, **meta))


def preload(policy: Policy, spec: ModelSpec, pool: ResidentSet) -> int:
    """Apply the policy's `preload` loads (untimed: before the first step); returns the bytes.
    A pinned policy whose experts exceed the budget is a user error, with the bytes it needs."""
    experts = [ExpertKey(layer, e) for layer in range(spec.layers) for e in range(spec.experts)]
    loads = policy.preload(experts, pool.view)
    need = pool.used_bytes + sum(pool.sizes.load(ld.bits_from, ld.bits_to) for ld in loads)
    if need > pool.budget_bytes:
        raise UserError(f"policy {policy.name} holds every expert in memory: that needs "
                        f"{fmt_bytes(need)} ({need} B), the budget is "
                        f"{fmt_bytes(pool.budget_bytes)}", field="budget",
                        fix=f"give a budget of at least {need} bytes, or an on-demand policy")
    for ld in loads:
        pool.apply_load(ld)
    return pool.used_bytes


def _meta(setup: SimSetup, policy: Policy, pool: ResidentSet, **extra: Any) -> dict[str, Any]:
    return {"backend": "sim", "engine": setup.engine, "policy": policy.name,
            "model": setup.spec.name, "profile": getattr(setup.profile, "name", "?"),
            "layout": setup.layout.kind, "budget_bytes": setup.budget_bytes,
            "peak_resident_bytes": pool.peak_bytes, **setup.meta, **extra}


def policy_setup(setup: SimSetup, policy: Policy, asked_max: int,
                 asked_min: int | None = None) -> SimSetup:
    """`setup` in the policy's own storage layout (a baseline may imply one), checked: the
    bits the policy runs at (from the fewest the workload asks, `asked_min`, when known, to
    the most) are stored and the budget holds the largest expert."""
    layout = policy.config.quant_layout(setup.layout)
    if setup.emulate_copies and not layout.nested:  # the executor's store, as it emulates
        layout = setup.layout if setup.layout.kind == "bitplane" else \
            replace(setup.layout, kind="bitplane")
    bits = policy.max_bits(asked_max)
    low = policy.min_bits(asked_min) if asked_min is not None else bits
    if layout.kind != "dense" and not layout.b1 <= low <= bits <= layout.bK:
        span = f"{low}..{bits}" if low < bits else f"{bits}"
        raise UserError(f"policy {policy.name} runs experts at {span} bits but its "
                        f"{layout.kind} layout stores {layout.b1}..{layout.bK}", field="bits",
                        fix=f"give a workload of {layout.b1}..{layout.bK} bits (--bits) or "
                            f"another policy")
    out = replace(setup, layout=layout)
    check_budget(out, bits)
    return out


def _simulate(setup: SimSetup, steps: Sequence[StepWork] | StepSource, policy: Policy
              ) -> Timeline:
    if setup.engine not in ENGINES:
        raise UserError(f"unknown engine {setup.engine!r}", field="engine",
                        fix=f"use one of {', '.join(ENGINES)}")
    source = steps if isinstance(steps, StepSource) else StepSource(steps)
    setup = policy_setup(setup, policy, source.max_bits(setup.layout.b1),
                         source.min_bits(setup.layout.b1))
    session = SimSession(setup, policy)
    if setup.engine == "fast":
        t = 0.0
        for s in range(len(source)):
            first = len(session.events)
            t_end = session.run_step(s, source.work(s), t)
            source.observe(s, session.events[first:], t, t_end)
            t = t_end
    else:
        import simpy

        env = simpy.Environment()
        env.process(_steps_simpy(env, source, policy, session.pool, session.costs,
                                 session.events, session.load_us))
        env.run()
    return session.timeline()


def layer_ctx(costs: ProfileCosts, pool: ResidentSet, events: list[Event], load_us: Any
              ) -> LayerCtx:
    """The lanes' context over a run: the profile's lane costs, the pool, the event list."""
    return LayerCtx(0, 0, pool, events, load_us, costs.run_us_of, costs.wake_us,
                    costs.io_speed, costs.compute_speed, costs.cold_us,
                    first_run_us=costs.first_run_us,
                    layer_first_run_us=costs.layer_first_run_us, handoff_us=costs.handoff_us,
                    run_wait_us=costs.run_wait_us)


def _steps_simpy(env: Any, source: StepSource, policy: Policy, pool: ResidentSet,
                 costs: ProfileCosts, events: list[Event], load_us: Any) -> Any:
    """The driver process: each layer's non-expert slice, then its plan on both lanes."""
    t, layer_us = 0.0, costs.layer_us_for(policy.name)
    ctx = layer_ctx(costs, pool, events, load_us)  # one context: the I/O lane's state
    for s in range(len(source)):
        step, t_step, first = source.work(s), t, len(events)
        for layer, demands in enumerate(step.layers):
            ne = costs.non_expert_us_of(layer, step.tokens, ctx.loaded)
            events.append(Event("compute", "non_expert", s, layer, -1, 0, 0, step.tokens, 0,
                                t, t + ne))
            t += ne
            ctx.loaded = False
            yield env.timeout(max(0.0, t - env.now))
            if demands:
                plan = policy.plan(layer, demands, pool.view, costs)
                ctx.step, ctx.layer, ctx.loaded = s, layer, bool(plan.loads)
                t = yield env.process(simpy_layer(env, ctx, plan, t + layer_us))
        events.append(Event("step", step.phase, s, -1, -1, 0, 0, step.tokens, 0, t_step, t))
        source.observe(s, events[first:], t_step, t)
