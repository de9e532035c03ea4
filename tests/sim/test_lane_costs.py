"""Executor lane costs in the simulator (a profile's `executor` section): read requests as
the store reader groups levels, per-load/run/layer fixed costs and the hand-off between
lanes, by hand and on random plans where both engines must write identical rows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.core.jobs import Demand, ExpertKey
from d2moe.core.sizes import QuantLayout
from d2moe.policies import POLICIES, Sizes, make_policy
from d2moe.profiles.schema import ExecutorCosts
from d2moe.sim import SimSetup, StepWork, simulate
from tests.sim.workloads import SPEC, LinearProfile, simulate_or_skip, step_lists

LAYOUT = QuantLayout(kind="mwq", b1=2, bK=4)


@pytest.fixture(autouse=True)
def _levels_read_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hand-worked numbers below read each level in its own request: SPEC's levels
    (3840-7680 B) count as large here, as a Mixtral expert's do (quant.store.read_groups);
    `test_small_levels_share_one_request` checks the default, where they share one."""
    import d2moe.sim.costs as sim_costs

    monkeypatch.setattr(sim_costs, "PIPELINE_MIN_BYTES", 1000)
SIZES = Sizes.of(SPEC, LAYOUT)
ALL_BYTES = SPEC.layers * SPEC.experts * SIZES.by_bits[4]


@dataclass(frozen=True)
class LaneProfile(LinearProfile):
    """LinearProfile whose load pays `latency_us` per request, plus executor lane costs."""

    executor: ExecutorCosts = field(default_factory=lambda: ExecutorCosts(
        layer_us=1.0, load_us=0.5, load_GBps=math.inf, run_us=0.25, wake_us=2.0))

    def load_us(self, nbytes: int, tier: str = "disk", requests: int = 1) -> float:
        if tier == "host":
            return 1.0 + nbytes / 10000.0
        return self.latency_us * requests + nbytes / self.read_Bpus


def _rows(engine: str, profile=None):
    steps = [StepWork("prefill", 2, [[Demand(ExpertKey(0, 1), 2, 2, 0.8)]]),
             StepWork("decode", 2, [[Demand(ExpertKey(0, 0), 4, 1, 0.9),
                                     Demand(ExpertKey(0, 1), 2, 2, 0.8)]])]
    tl = simulate(SimSetup(SPEC, profile or LaneProfile(), LAYOUT, 10**6, engine=engine), steps,
                  make_policy("fifo"))
    return sorted(((e.step, e.kind, e.expert, round(e.start_us, 6), round(e.end_us, 6))
                   for e in tl.events if e.lane != "memory"), key=lambda r: (r[0], r[3], r[1]))


@pytest.mark.parametrize("engine", ["fast", "simpy"])
def test_lane_costs_by_hand(engine: str) -> None:
    # load E1 0->2: 1 request: 5 + 7680/1000 + 0.5 = 13.18; run E1: 2 + 2*2 + 0.25 = 6.25
    # load E0 0->4: 3 requests (levels 2, 3, 4): 15 + 15360/1000 + 0.5 = 30.86; run E0 6.25
    # non-expert 3, then the plan starts after layer_us 1; the I/O lane 2 later (wake);
    # a run that waited on its load starts wake (2) after the load's end.
    assert _rows(engine) == [
        (0, "non_expert", -1, 0.0, 3.0),
        (0, "prefill", -1, 0.0, 27.43),
        (0, "stall", 1, 4.0, 21.18),
        (0, "load", 1, 6.0, 19.18),
        (0, "run", 1, 21.18, 27.43),
        (1, "decode", -1, 27.43, 78.79),
        (1, "non_expert", -1, 27.43, 30.43),
        (1, "stall", 0, 31.43, 66.29),
        (1, "load", 0, 33.43, 64.29),
        (1, "run", 0, 66.29, 72.54),
        (1, "run", 1, 72.54, 78.79),
    ]


@pytest.mark.parametrize("engine", ["fast", "simpy"])
def test_a_policy_pays_its_planning_beyond_the_probes(engine: str) -> None:
    """`plan_us` {hebf: 4, fifo: 1.5, hebf-ghost: 10}: the profile's layer_us (1) holds
    hebf's planning, so a layer planned by hebf-ghost starts 6 us later, and by FIFO
    2.5 earlier, which the layer's 1 us caps at 1; a policy without a figure, or a
    profile without any, pays nothing more."""
    plans = (("fifo", 1.5), ("hebf", 4.0), ("hebf-ghost", 10.0))

    def rows(name: str, plan_us=plans) -> list[tuple[int, str, int, float, float]]:
        profile = LaneProfile(executor=dataclass_replace(LaneProfile().executor,
                                                         plan_us=plan_us))
        steps = [StepWork("decode", 1, [[Demand(ExpertKey(0, 0), 4, 1, 0.9)]])]
        tl = simulate(SimSetup(SPEC, profile, LAYOUT, 10**6, engine=engine), steps,
                      make_policy(name))
        return [(e.kind, round(e.start_us, 6), round(e.end_us, 6)) for e in tl.events
                if e.kind in ("load", "run")]

    # without: non-expert 3, layer_us 1, the load 2 later (wake): 6 to 36.86, run after wake
    base = [("load", 6.0, 36.86), ("run", 38.86, 45.11)]
    assert rows("hebf") == rows("hebf-ghost", ()) == rows("johnson") == base
    assert rows("fifo") == [(k, a - 1.0, b - 1.0) for k, a, b in base]
    assert rows("hebf-ghost") == [(k, a + 6.0, b + 6.0) for k, a, b in base]


def test_small_levels_share_one_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the store reader's own threshold SPEC's three levels are one read: E0's 0->4 load
    in step 1 pays one request, 5 + 15360/1000 + 0.5 = 20.86, not 30.86, and every row
    after it moves 10 earlier than in test_lane_costs_by_hand."""
    import d2moe.sim.costs as sim_costs
    from d2moe.quant.store import PIPELINE_MIN_BYTES

    monkeypatch.setattr(sim_costs, "PIPELINE_MIN_BYTES", PIPELINE_MIN_BYTES)
    rows = _rows("fast")
    assert (1, "load", 0, 33.43, 54.29) in rows and (1, "decode", -1, 27.43, 68.79) in rows
    assert rows == _rows("simpy")


def test_without_lane_costs_a_load_is_one_request() -> None:
    plain = _rows("fast", LinearProfile())
    assert (1, "load", 0, 24.68, 45.04) in plain  # the golden test's numbers


@pytest.mark.parametrize("engine", ["fast", "simpy"])
def test_a_load_pays_for_its_evictions(engine: str) -> None:
    """Room for one 4-bit expert: decode loads E0 (evicting E1) and E1 back (evicting E0);
    each load takes `evict_us` (3) more per eviction it makes, the one without none."""
    steps = [StepWork("prefill", 2, [[Demand(ExpertKey(0, 1), 2, 2, 0.8)]]),
             StepWork("decode", 2, [[Demand(ExpertKey(0, 0), 4, 1, 0.9),
                                     Demand(ExpertKey(0, 1), 2, 2, 0.8)]])]

    def loads(evict_us: float) -> list[tuple[int, int, float]]:
        profile = LaneProfile(executor=dataclass_replace(LaneProfile().executor,
                                                         evict_us=evict_us))
        tl = simulate(SimSetup(SPEC, profile, LAYOUT, SIZES.by_bits[4], engine=engine),
                      steps, make_policy("fifo"))
        evicts = [e.start_us for e in tl.events if e.kind == "evict"]
        return [(e.expert, sum(t == e.start_us for t in evicts), e.end_us - e.start_us)
                for e in tl.events if e.kind == "load"]

    free, paid = loads(0.0), loads(3.0)
    assert [(x, n) for x, n, _ in paid] == [(x, n) for x, n, _ in free] == [(1, 0), (0, 1),
                                                                            (1, 1)]
    assert [b - a for (_, _, a), (_, n, b) in zip(free, paid, strict=True)] == \
        pytest.approx([3.0 * n for _, n, _ in paid])


@settings(max_examples=40, deadline=None)
@given(steps=step_lists(), frac=st.floats(0.0, 1.2), name=st.sampled_from(POLICIES.names()))
def test_engines_match_exactly_with_lane_costs(steps, frac, name) -> None:
    budget = max(SIZES.by_bits[4], int(frac * ALL_BYTES))
    layout = QuantLayout(b1=2, bK=4)
    profile = LaneProfile(head_us_flat=1.5, executor=ExecutorCosts(
        layer_us=1.0, load_us=0.5, load_GBps=math.inf, run_us=0.25, wake_us=2.0,
        non_expert_after_load_us=0.75, evict_us=0.125))
    fast = simulate_or_skip(SimSetup(SPEC, profile, layout, budget, engine="fast"), steps, name)
    slow = simulate_or_skip(SimSetup(SPEC, profile, layout, budget, engine="simpy"), steps, name)
    key = lambda e: (e.start_us, e.end_us, e.lane, e.kind, e.layer, e.expert)  # noqa: E731
    assert sorted(fast.events, key=key) == sorted(slow.events, key=key)


@pytest.mark.parametrize("engine", ["fast", "simpy"])
def test_non_expert_after_a_plan_with_loads(engine: str) -> None:
    """The surcharge lands on the non-expert row right after a plan with loads (across the
    step boundary too), on no other row."""
    # budget: one expert at 2 bits; E0 of every layer: the first layer loads, then hits
    # (same expert, different layers: all miss), so every plan has a load
    demands = [[Demand(ExpertKey(layer, 0), 2, 1, 0.9)] for layer in range(3)]
    steps = [StepWork("prefill", 1, demands), StepWork("decode", 1, demands)]
    costs = dict(layer_us=1.0, load_us=0.5, load_GBps=math.inf, run_us=0.25, wake_us=2.0)

    def rows(extra: float):
        profile = LaneProfile(executor=ExecutorCosts(**costs, non_expert_after_load_us=extra))
        tl = simulate(SimSetup(SPEC, profile, LAYOUT, SIZES.by_bits[2], engine=engine), steps,
                      make_policy("fifo"))
        return [(e.step, e.layer, e.end_us - e.start_us) for e in tl.events
                if e.kind == "non_expert"]

    assert [us for *_, us in rows(0.0)] == [3.0] * 6
    # every plan loads: each row but the very first follows one
    assert rows(2.5) == [(0, 0, 3.0), (0, 1, 5.5), (0, 2, 5.5), (1, 0, 5.5), (1, 1, 5.5),
                         (1, 2, 5.5)]
    # a budget holding every expert: the decode step's plans load nothing, no surcharge
    big = LaneProfile(executor=ExecutorCosts(**costs, non_expert_after_load_us=2.5))
    tl = simulate(SimSetup(SPEC, big, LAYOUT, 10**6, engine=engine),
                  [StepWork("prefill", 1, demands)] + [StepWork("decode", 1, demands)] * 2,
                  make_policy("fifo"))
    ne = [e.end_us - e.start_us for e in tl.events if e.kind == "non_expert" and e.step == 2]
    assert ne == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("engine", ["fast", "simpy"])
def test_the_step_head_is_layer_zeros(engine: str) -> None:
    """The step's head lengthens layer 0's non-expert row of every step, nothing else."""
    steps = [StepWork(phase, 1, [[Demand(ExpertKey(layer, 0), 2, 1, 0.9)] for layer in range(3)])
             for phase in ("prefill", "decode")]

    def rows(head_us: float):
        tl = simulate(SimSetup(SPEC, LaneProfile(head_us_flat=head_us), LAYOUT, 10**6,
                               engine=engine), steps, make_policy("fifo"))
        return tl.events

    plain, headed = rows(0.0), rows(4.5)
    ne = [(e.step, e.layer, e.end_us - e.start_us) for e in headed if e.kind == "non_expert"]
    assert ne == [(s, layer, 7.5 if layer == 0 else 3.0) for s in (0, 1) for layer in range(3)]
    # everything after a step's layer 0 row moves by 4.5 per step so far, and only that
    shift = {0: 4.5, 1: 9.0}
    for a, b in zip(plain, headed, strict=True):
        lead = 4.5 * a.step if a.kind in ("non_expert", "prefill", "decode") and (
            a.layer <= 0) else shift[a.step]
        assert (b.kind, b.step, b.layer) == (a.kind, a.step, a.layer)
        assert b.start_us == pytest.approx(a.start_us + lead)


def test_fluid_schedule_by_hand() -> None:
    from d2moe.sim.contention import fluid_schedule

    # a load of 10 us and a resident run of 10 us start together at 0
    assert fluid_schedule([10.0], [10.0], [-1], [-1], 0.0, 0.0, 0.5, 0.5) == \
        ([0.0], [20.0], [0.0], [20.0])
    # the run keeps a quarter of its speed: by the load's end (20) it has done 5 of 10 us,
    # then runs alone for 5
    assert fluid_schedule([10.0], [10.0], [-1], [-1], 0.0, 0.0, 0.5, 0.25) == \
        ([0.0], [20.0], [0.0], [25.0])
    # a run waiting on its load runs alone afterwards (stalls are not busy), hand-off 1 us;
    # the second load overlaps that run: both at half speed
    ls, le, rs, re = fluid_schedule([4.0, 6.0], [2.0, 3.0], [0, 1], [-1, -1], 0.0, 1.0,
                                    0.5, 0.5)
    # I/O starts at 1 (wake): load 0 [1, 5]; load 1 from 5, alone until run 0 starts at 6
    # (5 + wake); both busy from 6: run 0 needs 2 us at 0.5 -> ends 10; load 1 did 1 us by
    # 6 and 2 more by 10, then 3 alone -> ends 13; run 1 starts at 14 (13 + wake), ends 17
    assert (ls, le, rs, re) == ([1.0, 5.0], [5.0, 13.0], [6.0, 14.0], [10.0, 17.0])


def test_fluid_schedule_with_a_run_wait_by_hand() -> None:
    from d2moe.sim.contention import fluid_schedule

    # a load of 10 us from 0; three resident runs of 5 us, each charged 3 us once when a
    # load runs beside it: run 0 [0, 8]; run 1 from 8, the load still running -> [8, 16];
    # run 2 from 16, no load left -> [16, 21]
    assert fluid_schedule([10.0], [5.0, 5.0, 5.0], [-1, -1, -1], [-1], 0.0, 0.0, 1.0, 1.0,
                          run_wait_us=3.0) == ([0.0], [10.0], [0.0, 8.0, 16.0],
                                               [8.0, 16.0, 21.0])
    # loads that start while a run is under way (at the I/O wake, 2 us) charge it once:
    # run 0 [0, 5 + 3] beside two loads
    assert fluid_schedule([4.0, 4.0], [5.0], [-1], [-1, -1], 0.0, 2.0, 1.0, 1.0,
                          run_wait_us=3.0) == ([2.0, 6.0], [6.0, 10.0], [0.0], [8.0])
    # with a speed and a wait, the wait is work at that speed: 10 us run at 0.5 beside a
    # 10 us load (speed 1): by 10 it did 5 of 10 + 4 -> 9 left alone -> ends 19
    assert fluid_schedule([10.0], [10.0], [-1], [-1], 0.0, 0.0, 1.0, 0.5,
                          run_wait_us=4.0) == ([0.0], [10.0], [0.0], [19.0])


@dataclass(frozen=True)
class ContendedProfile(LaneProfile):
    """LaneProfile whose lanes slow each other down."""

    executor: ExecutorCosts = field(default_factory=lambda: ExecutorCosts(
        layer_us=1.0, load_us=0.5, load_GBps=math.inf, run_us=0.25, wake_us=2.0,
        overlap_io_speed=0.6, overlap_compute_speed=0.4))


@dataclass(frozen=True)
class WaitProfile(LaneProfile):
    """LaneProfile whose runs beside a load wait 3 us more (the compute lane at full speed)."""

    executor: ExecutorCosts = field(default_factory=lambda: ExecutorCosts(
        layer_us=1.0, load_us=0.5, load_GBps=math.inf, run_us=0.25, wake_us=2.0,
        overlap_io_speed=0.6, overlap_run_wait_us=3.0))


@settings(max_examples=40, deadline=None)
@given(steps=step_lists(), frac=st.floats(0.0, 1.2), name=st.sampled_from(POLICIES.names()))
def test_contended_engines_match_and_full_speed_equals_the_recurrence(steps, frac, name) -> None:
    import d2moe.sim.lanes as lanes

    budget = max(SIZES.by_bits[4], int(frac * ALL_BYTES))
    layout = QuantLayout(b1=2, bK=4)
    key = lambda e: (e.start_us, e.end_us, e.lane, e.kind, e.layer, e.expert)  # noqa: E731

    def run(profile, engine):
        tl = simulate_or_skip(SimSetup(SPEC, profile, layout, budget, engine=engine), steps, name)
        return sorted(tl.events, key=key)

    contended = run(ContendedProfile(), "fast")
    assert contended == run(ContendedProfile(), "simpy")
    plain = run(LaneProfile(), "fast")
    end = lambda rows: max(e.end_us for e in rows)  # noqa: E731
    assert end(contended) >= end(plain) - 1e-9  # contention never helps
    waited = run(WaitProfile(), "fast")
    assert waited == run(WaitProfile(), "simpy")
    assert end(waited) >= end(plain) - 1e-9
    # the fluid solver at full speed is the exact recurrence
    original = lanes.LayerCtx.contended
    lanes.LayerCtx.contended = property(lambda self: True)
    try:
        assert run(LaneProfile(), "fast") == plain
    finally:
        lanes.LayerCtx.contended = original


@dataclass(frozen=True)
class ColdProfile(LaneProfile):
    """LaneProfile whose loads after an idle I/O lane pay up to 8 us more (full after 40 us)."""

    executor: ExecutorCosts = field(default_factory=lambda: ExecutorCosts(
        layer_us=1.0, load_us=0.5, load_GBps=math.inf, run_us=0.25, wake_us=2.0,
        cold_curve_us=((40.0, 8.0),)))


@pytest.mark.parametrize("engine", ["fast", "simpy"])
def test_cold_loads_by_hand(engine: str) -> None:
    # as test_lane_costs_by_hand, plus the cold first request: the run's first load (never an
    # earlier one) pays the full 8: 6 + 13.18 + 8 = 27.18; the stall ends 2 later (wake).
    # Step 1's load starts at 41.43, 14.25 after the last load ended: 8 * 14.25 / 40 = 2.85
    # more, so 41.43 + 30.86 + 2.85 = 75.14; runs 77.14 .. 83.39 .. 89.64.
    assert _rows(engine, ColdProfile()) == [
        (0, "non_expert", -1, 0.0, 3.0),
        (0, "prefill", -1, 0.0, 35.43),
        (0, "stall", 1, 4.0, 29.18),
        (0, "load", 1, 6.0, 27.18),
        (0, "run", 1, 29.18, 35.43),
        (1, "decode", -1, 35.43, 89.64),
        (1, "non_expert", -1, 35.43, 38.43),
        (1, "stall", 0, 39.43, 77.14),
        (1, "load", 0, 41.43, 75.14),
        (1, "run", 0, 77.14, 83.39),
        (1, "run", 1, 83.39, 89.64),
    ]


def test_cold_cost_follows_the_curve_then_saturates() -> None:
    c = ExecutorCosts(cold_curve_us=((6000.0, 300.0),))
    assert [c.cold_us(t) for t in (-1.0, 0.0, 1500.0, 6000.0, 60000.0, math.inf)] == \
        [0.0, 0.0, 75.0, 300.0, 300.0, 300.0]
    assert ExecutorCosts().cold_us(math.inf) == 0.0 and not ExecutorCosts().any_cold
    # from (0, 0) to the first pause, then between the pauses, flat past the last
    f = ExecutorCosts(cold_curve_us=((250.0, 20.0), (1000.0, 20.0), (6000.0, 300.0)))
    assert [f.cold_us(t) for t in (125.0, 250.0, 500.0, 3500.0, 1e6)] == \
        [10.0, 20.0, 20.0, 160.0, 300.0]
    assert f.any_cold and not ExecutorCosts(cold_curve_us=((250.0, 0.0),)).any_cold


@pytest.mark.parametrize("engine", ["fast", "simpy"])
def test_a_short_cold_curve_makes_loads_cold(engine: str) -> None:
    """A curve of one point, reached after the shortest pause, still charges every load
    after a pause: the simulator does not skip it."""
    def end(executor: ExecutorCosts) -> float:
        steps = [StepWork("decode", 1, [[Demand(ExpertKey(0, 0), 4, 1, 0.9)]]),
                 StepWork("decode", 1, [[Demand(ExpertKey(0, 1), 4, 1, 0.9)]])]
        tl = simulate(SimSetup(SPEC, LaneProfile(executor=executor), LAYOUT, 10**6,
                               engine=engine), steps, make_policy("fifo"))
        return max(e.end_us for e in tl.events)

    warm = LaneProfile().executor
    assert end(dataclass_replace(warm, cold_curve_us=((250.0, 40.0),))) > end(warm)


def test_fluid_schedule_with_cold_loads_by_hand() -> None:
    from d2moe.sim.contention import fluid_schedule

    def cold(idle: float) -> float:
        return min(4.0, idle)

    # the I/O lane's last load ended at -2: load 0 starts at 0 with 2 us more work (12); the
    # resident run (10) beside it, both at half speed: the run ends at 20, the load has done
    # 10 of 12 by then and ends at 22; load 1 follows at once (idle 0): 10 alone, ends 32
    assert fluid_schedule([10.0, 10.0], [10.0], [-1], [-1, -1], 0.0, 0.0, 0.5, 0.5,
                          cold, -2.0) == ([0.0, 22.0], [22.0, 32.0], [0.0], [20.0])


@dataclass(frozen=True)
class ColdContendedProfile(LaneProfile):
    """Cold loads (a two-point curve) and contended lanes together."""

    executor: ExecutorCosts = field(default_factory=lambda: ExecutorCosts(
        layer_us=1.0, load_us=0.5, load_GBps=math.inf, run_us=0.25, wake_us=2.0,
        overlap_io_speed=0.6, overlap_compute_speed=0.4, cold_curve_us=((40.0, 8.5), (250.0, 11.0)),
        first_run_us=0.75, layer_first_run_us=0.5, handoff_us=1.25))


@dataclass(frozen=True)
class ColdFirstProfile(LaneProfile):
    """Cold loads (a two-point curve) and first runs, no contention."""

    executor: ExecutorCosts = field(default_factory=lambda: ExecutorCosts(
        layer_us=1.0, load_us=0.5, load_GBps=math.inf, run_us=0.25, wake_us=2.0,
        cold_curve_us=((40.0, 8.5), (250.0, 11.0)), first_run_us=0.75,
        layer_first_run_us=0.5, handoff_us=1.25))


@dataclass(frozen=True)
class FirstRunProfile(LaneProfile):
    """LaneProfile whose first run after a load pays 1.5 us more."""

    executor: ExecutorCosts = field(default_factory=lambda: ExecutorCosts(
        layer_us=1.0, load_us=0.5, load_GBps=math.inf, run_us=0.25, wake_us=2.0,
        first_run_us=1.5))


@pytest.mark.parametrize("engine", ["fast", "simpy"])
def test_first_runs_by_hand(engine: str) -> None:
    # as test_lane_costs_by_hand, plus 1.5 us for a run waiting on its load: step 0's run of
    # E1 21.18 + 6.25 + 1.5 = 28.93; step 1: plan at 32.93, load E0 34.93 .. 65.79, E0's run
    # (first after its load) 67.79 .. 75.54, E1's run (resident, no load) 75.54 .. 81.79
    assert _rows(engine, FirstRunProfile()) == [
        (0, "non_expert", -1, 0.0, 3.0),
        (0, "prefill", -1, 0.0, 28.93),
        (0, "stall", 1, 4.0, 21.18),
        (0, "load", 1, 6.0, 19.18),
        (0, "run", 1, 21.18, 28.93),
        (1, "decode", -1, 28.93, 81.79),
        (1, "non_expert", -1, 28.93, 31.93),
        (1, "stall", 0, 32.93, 67.79),
        (1, "load", 0, 34.93, 65.79),
        (1, "run", 0, 67.79, 75.54),
        (1, "run", 1, 75.54, 81.79),
    ]


@dataclass(frozen=True)
class LayerFirstProfile(LaneProfile):
    """LaneProfile whose first run after a load pays 1.5 us more and the first run of each
    layer's plan 0.5 us more."""

    executor: ExecutorCosts = field(default_factory=lambda: ExecutorCosts(
        layer_us=1.0, load_us=0.5, load_GBps=math.inf, run_us=0.25, wake_us=2.0,
        first_run_us=1.5, layer_first_run_us=0.5))


@pytest.mark.parametrize("engine", ["fast", "simpy"])
def test_layer_first_runs_by_hand(engine: str) -> None:
    # as test_first_runs_by_hand, plus 0.5 us for each layer's first run: step 0's only run
    # (first after its load and first of the layer) 21.18 + 6.25 + 1.5 + 0.5 = 29.43; step 1:
    # plan at 33.43, load E0 35.43 .. 66.29, E0's run (first of the layer, first after its
    # load) 68.29 .. 76.54, E1's run (neither) 76.54 .. 82.79: charged once per layer
    assert _rows(engine, LayerFirstProfile()) == [
        (0, "non_expert", -1, 0.0, 3.0),
        (0, "prefill", -1, 0.0, 29.43),
        (0, "stall", 1, 4.0, 21.18),
        (0, "load", 1, 6.0, 19.18),
        (0, "run", 1, 21.18, 29.43),
        (1, "decode", -1, 29.43, 82.79),
        (1, "non_expert", -1, 29.43, 32.43),
        (1, "stall", 0, 33.43, 68.29),
        (1, "load", 0, 35.43, 66.29),
        (1, "run", 0, 68.29, 76.54),
        (1, "run", 1, 76.54, 82.79),
    ]


def test_layer_first_run_in_the_fluid_model_by_hand() -> None:
    # contended profile (the fluid engine): step 0 loads E0 and E1, step 1 finds both resident
    # and runs them with no load beside: its first run pays layer_first_run_us (0.5), the
    # second does not. A run is 2 + 2 * 1 + 0.25 = 4.25 (LinearProfile, 1 token at 2 bits);
    # step 1 starts at t: non-expert 3, layer_us 1, runs t+4 .. t+8.75 .. t+13
    demands = [Demand(ExpertKey(0, 0), 2, 1, 0.9), Demand(ExpertKey(0, 1), 2, 1, 0.8)]
    steps = [StepWork("prefill", 1, [demands]), StepWork("decode", 1, [demands])]
    profile = dataclass_replace(ContendedProfile(), executor=ExecutorCosts(
        layer_us=1.0, run_us=0.25, overlap_io_speed=0.6, overlap_compute_speed=0.4,
        layer_first_run_us=0.5))
    for engine in ("fast", "simpy"):
        tl = simulate(SimSetup(SPEC, profile, LAYOUT, ALL_BYTES, engine=engine), steps,
                      make_policy("hebf"))
        t = next(e.start_us for e in tl.events if e.kind == "decode")
        runs = [(e.expert, round(e.start_us - t, 6), round(e.end_us - t, 6))
                for e in tl.events if e.kind == "run" and e.step == 1]
        assert runs == [(0, 4.0, 8.75), (1, 8.75, 13.0)]


def test_profiles_without_the_layer_field_charge_nothing() -> None:
    assert ExecutorCosts().layer_first_run_us == 0.0
    assert _rows("fast", FirstRunProfile()) == _rows(
        "fast", dataclass_replace(LayerFirstProfile(), executor=dataclass_replace(
            LayerFirstProfile().executor, layer_first_run_us=0.0)))


HANDOFF_COSTS = ExecutorCosts(layer_us=1.0, load_us=0.5, load_GBps=math.inf, run_us=0.25,
                              wake_us=2.0, handoff_us=1.5)


@pytest.mark.parametrize("engine", ["fast", "simpy"])
@pytest.mark.parametrize("contended", [False, True])
def test_handoff_only_for_plans_with_loads_by_hand(engine: str, contended: bool) -> None:
    # as test_lane_costs_by_hand plus a third step that finds both experts resident; a plan
    # with loads starts handoff_us (1.5) after layer_us, one without at layer_us.
    # Step 0: plan at 3 + 1 + 1.5 = 5.5, I/O at 7.5 (wake), load E1 7.5 .. 20.68, run 22.68 ..
    # 28.93. Step 1: plan at 31.93 + 2.5 = 34.43, load E0 36.43 .. 67.29, runs 69.29 .. 75.54
    # .. 81.79. Step 2 (no loads): plan at 84.79 + 1 = 85.79, runs .. 92.04 .. 98.29. With
    # contention (the fluid engine) the same: no run overlaps a load in these plans.
    decode = [Demand(ExpertKey(0, 0), 4, 1, 0.9), Demand(ExpertKey(0, 1), 2, 2, 0.8)]
    steps = [StepWork("prefill", 2, [[Demand(ExpertKey(0, 1), 2, 2, 0.8)]]),
             StepWork("decode", 2, [decode]), StepWork("decode", 2, [list(decode)])]
    costs = dataclass_replace(HANDOFF_COSTS, overlap_compute_speed=0.4) if contended \
        else HANDOFF_COSTS
    tl = simulate(SimSetup(SPEC, LaneProfile(executor=costs), LAYOUT, 10**6, engine=engine),
                  steps, make_policy("fifo"))
    rows = sorted(((e.step, e.kind, e.expert, round(e.start_us, 6), round(e.end_us, 6))
                   for e in tl.events if e.lane != "memory"), key=lambda r: (r[0], r[3], r[1]))
    assert rows == [
        (0, "non_expert", -1, 0.0, 3.0),
        (0, "prefill", -1, 0.0, 28.93),
        (0, "stall", 1, 5.5, 22.68),
        (0, "load", 1, 7.5, 20.68),
        (0, "run", 1, 22.68, 28.93),
        (1, "decode", -1, 28.93, 81.79),
        (1, "non_expert", -1, 28.93, 31.93),
        (1, "stall", 0, 34.43, 69.29),
        (1, "load", 0, 36.43, 67.29),
        (1, "run", 0, 69.29, 75.54),
        (1, "run", 1, 75.54, 81.79),
        (2, "decode", -1, 81.79, 98.29),
        (2, "non_expert", -1, 81.79, 84.79),
        (2, "run", 0, 85.79, 92.04),
        (2, "run", 1, 92.04, 98.29),
    ]


def test_profiles_without_the_handoff_field_charge_nothing() -> None:
    assert ExecutorCosts().handoff_us == 0.0
    assert _rows("fast", LaneProfile(executor=dataclass_replace(HANDOFF_COSTS, handoff_us=0.0))
                 ) == _rows("fast")


def test_first_runs_marks_the_first_run_after_each_load() -> None:
    from d2moe.sim.lanes import first_runs

    assert first_runs([-1, 0, 0, 1, -1, 1]) == [False, True, False, True, False, False]


@settings(max_examples=40, deadline=None)
@given(steps=step_lists(), frac=st.floats(0.0, 1.2), name=st.sampled_from(POLICIES.names()),
       contended=st.booleans())
def test_engines_match_exactly_with_cold_loads_and_first_runs(steps, frac, name, contended) -> None:
    budget = max(SIZES.by_bits[4], int(frac * ALL_BYTES))
    layout = QuantLayout(b1=2, bK=4)
    profile = ColdContendedProfile() if contended else ColdFirstProfile()
    key = lambda e: (e.start_us, e.end_us, e.lane, e.kind, e.layer, e.expert)  # noqa: E731
    fast = simulate_or_skip(SimSetup(SPEC, profile, layout, budget, engine="fast"), steps, name)
    slow = simulate_or_skip(SimSetup(SPEC, profile, layout, budget, engine="simpy"), steps, name)
    assert sorted(fast.events, key=key) == sorted(slow.events, key=key)
    warm_profile = ContendedProfile() if contended else LaneProfile()
    warm = simulate_or_skip(SimSetup(SPEC, warm_profile, layout, budget, engine="fast"), steps,
                            name)
    end = lambda tl: max((e.end_us for e in tl.events), default=0.0)  # noqa: E731
    assert end(fast) >= end(warm) - 1e-9  # a cold disk or a cold cache never helps


def test_checked_loads_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """With `check_GBps` a nested raise pays each level's read and check as the store reader
    does them; the host tier (a RAM copy) pays no check; older profiles the bytes formula."""
    import d2moe.sim.costs as sim_costs
    from d2moe.sim.costs import ProfileCosts

    monkeypatch.setattr(sim_costs, "PIPELINE_MIN_BYTES", 1 << 20)  # the reader's: one read
    small = ProfileCosts(LaneProfile(), SPEC, SIZES, LAYOUT)
    assert small.reads(0, 4) == [15360] and small.raise_us(0, 4) == pytest.approx(5 + 15.36 + 0.5)
    checked_small = dataclass_replace(LaneProfile(), executor=dataclass_replace(
        LaneProfile().executor, check_GBps=1.0))
    assert ProfileCosts(checked_small, SPEC, SIZES, LAYOUT).raise_us(0, 4) == \
        pytest.approx(5 + 15.36 + 15.36 + 0.5)  # its check after it
    monkeypatch.setattr(sim_costs, "PIPELINE_MIN_BYTES", 1000)  # each level alone
    # LaneProfile reads: 5 us + bytes / 1000 per request; levels of E 0->4: 7680, 3840, 3840
    # bytes; checks at 1 GB/s: 7.68, 3.84, 3.84 us; the lane's own 0.5 us per load
    plain = ProfileCosts(LaneProfile(), SPEC, SIZES, LAYOUT)
    assert plain.levels(0, 4) == [7680, 3840, 3840] and plain.levels(2, 4) == [3840, 3840]
    assert plain.raise_us(0, 4) == pytest.approx(15 + 15.36 + 0.5)  # no check_GBps
    checked = dataclass_replace(LaneProfile(), executor=dataclass_replace(
        LaneProfile().executor, check_GBps=1.0))
    # each level its own read, every check but the last's on the helper: reads end at 12.68,
    # 21.52, 30.36; the helper's checks at 20.36 and 25.36; the last check inline: 34.2
    assert ProfileCosts(checked, SPEC, SIZES, LAYOUT).raise_us(0, 4) == \
        pytest.approx(12.68 + 8.84 + 8.84 + 3.84 + 0.5)
    monkeypatch.setattr(sim_costs, "PIPELINE_MIN_BYTES", 5000)
    costs = ProfileCosts(checked, SPEC, SIZES, LAYOUT)
    # the base (7680) alone, its check on the helper; the two planes (3840) one read of 7680,
    # checked inline: 12.68 + 12.68 + 7.68 (the helper's check ends at 20.36, before)
    assert costs.reads(0, 4) == [7680, 7680]
    assert costs.raise_us(0, 4) == pytest.approx(12.68 + 12.68 + 7.68 + 0.5)
    assert costs.raise_us(2, 4) == pytest.approx(5 + 7.68 + 7.68 + 0.5)
    assert costs.raise_us(0, 4, "host") == pytest.approx(1.0 + 15360 / 10000 + 0.5)
    copies = ProfileCosts(checked, SPEC, Sizes.of(SPEC, QuantLayout(kind="copies", b1=2, bK=4)),
                          QuantLayout(kind="copies", b1=2, bK=4))
    n = copies.sizes.by_bits[4]
    assert copies.levels(0, 4) == [n]
    assert copies.raise_us(0, 4) == pytest.approx(5 + n / 1000 + n / 1000 + 0.5)


@settings(max_examples=25, deadline=None)
@given(steps=step_lists(), frac=st.floats(0.0, 1.2), name=st.sampled_from(POLICIES.names()))
def test_engines_match_exactly_with_checked_loads(steps, frac, name) -> None:
    import d2moe.sim.costs as sim_costs

    budget = max(SIZES.by_bits[4], int(frac * ALL_BYTES))
    profile = dataclass_replace(LaneProfile(), executor=dataclass_replace(
        LaneProfile().executor, check_GBps=0.8))
    old, sim_costs.PIPELINE_MIN_BYTES = sim_costs.PIPELINE_MIN_BYTES, 5000
    try:
        fast = simulate_or_skip(SimSetup(SPEC, profile, LAYOUT, budget, engine="fast"), steps,
                                name)
        slow = simulate_or_skip(SimSetup(SPEC, profile, LAYOUT, budget, engine="simpy"), steps,
                                name)
    finally:
        sim_costs.PIPELINE_MIN_BYTES = old
    key = lambda e: (e.start_us, e.end_us, e.lane, e.kind, e.layer, e.expert)  # noqa: E731
    assert sorted(fast.events, key=key) == sorted(slow.events, key=key)
