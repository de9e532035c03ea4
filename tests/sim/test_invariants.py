"""Properties of every policy on random workloads and budgets, checked from the events."""

from __future__ import annotations

from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.core.jobs import Demand, ExpertKey
from d2moe.core.sizes import QuantLayout
from d2moe.policies import POLICIES, Sizes, policy_config
from d2moe.sim import SimSetup, StepWork
from tests.sim.workloads import SPEC, LinearProfile, simulate_or_skip, step_lists

LAYOUT = QuantLayout(b1=2, bK=4)
SIZES = Sizes.of(SPEC, LAYOUT)
ALL_BYTES = SPEC.layers * SPEC.experts * SIZES.by_bits[4]


def _setup(frac: float, engine: str = "fast") -> SimSetup:
    budget = max(SIZES.by_bits[4], int(frac * ALL_BYTES))
    return SimSetup(SPEC, LinearProfile(), LAYOUT, budget, engine=engine)


budgets = st.floats(0.0, 1.2)
policies = st.sampled_from(POLICIES.names())


def assert_lanes_and_residency(tl, name: str, spec=SPEC) -> None:
    """Each lane does one thing at a time; and replayed from the rows (a load's bits count
    from its end, an eviction's loss from its start; at one instant loads land, then
    evictions, then runs start), every run's expert is resident at its bits, whichever
    step's or layer's load or prefetch brought it. Order only: real timelines pass too."""
    for lane, kinds in (("io", ("load", "prefetch")),
                        ("compute", ("run", "substitute", "stall", "non_expert"))):
        rows = sorted((e.start_us, e.end_us) for e in tl.events if e.kind in kinds)
        assert all(e.lane == lane for e in tl.events if e.kind in kinds)
        assert all(a[1] <= b[0] + 1e-9 for a, b in zip(rows, rows[1:], strict=False)), lane
    cfg = policy_config(name)  # a pinned policy starts with every expert at its bits
    bits = {(layer, e): cfg.uniform_bits for layer in range(spec.layers)
            for e in range(spec.experts)} if cfg.pin else {}
    order = {"load": 0, "prefetch": 0, "evict": 1, "run": 2}
    moves = sorted(((e.end_us if e.kind in ("load", "prefetch") else e.start_us,
                     order[e.kind], i, e) for i, e in enumerate(tl.events) if e.kind in order),
                   key=lambda t: t[:3])
    for _, _, _, e in moves:
        key = (e.layer, e.expert)
        if e.kind == "run":
            assert bits.get(key, 0) >= e.bits_to, (e, bits.get(key, 0))
        else:
            bits[key] = e.bits_to


@settings(max_examples=60, deadline=None)
@given(steps=step_lists(), frac=budgets, name=policies)
def test_runs_after_loads_and_budget_holds(steps, frac, name):
    setup = _setup(frac)
    tl = simulate_or_skip(setup, steps, name)
    load_end: dict[tuple[int, int, int], float] = {}
    for e in tl.events:
        if e.kind == "load":
            load_end[(e.step, e.layer, e.expert)] = e.end_us
    for e in tl.events:
        if e.kind == "run" and (e.step, e.layer, e.expert) in load_end:
            assert e.start_us >= load_end[(e.step, e.layer, e.expert)]
    assert_lanes_and_residency(tl, name)
    # resident bytes from the rows: + at each load start, - at each eviction
    deltas = sorted([(e.start_us, 1, e.bytes) for e in tl.events
                     if e.kind in ("load", "prefetch")]
                    + [(e.start_us, 0, -e.bytes) for e in tl.events if e.kind == "evict"])
    used = tl.meta.get("initial_resident_bytes", 0)
    for _, _, d in deltas:  # evictions (0) sort before loads (1) at the same instant
        used += d
        assert 0 <= used <= setup.budget_bytes
    assert tl.meta["peak_resident_bytes"] <= setup.budget_bytes


@settings(max_examples=60, deadline=None)
@given(steps=step_lists(), frac=budgets, name=policies)
def test_every_demand_runs_once_at_enough_bits(steps, frac, name):
    tl = simulate_or_skip(_setup(frac), steps, name)
    ran = defaultdict(list)
    for e in tl.events:
        if e.kind in ("run", "substitute"):  # bits_from: the bits the tokens were routed at
            ran[(e.step, e.layer)].append((e.expert, e.bits_from, e.tokens))
    for s, step in enumerate(steps):
        for layer, demands in enumerate(step.layers):
            want = sorted((d.key.expert, d.bits, d.tokens) for d in demands)
            assert sorted(ran[(s, layer)]) == want


def _layer_spans(tl):
    """Per (step, layer): the plan's makespan (first non-expert end to last run end)."""
    start, end = {}, {}
    for e in tl.events:
        k = (e.step, e.layer)
        if e.kind == "non_expert":
            start[k] = e.end_us
        elif e.lane in ("io", "compute") and e.kind != "non_expert":
            end[k] = max(end.get(k, 0.0), e.end_us)
    return {k: end.get(k, start[k]) - start[k] for k in start}


def _bound(tl):
    load, run = defaultdict(float), defaultdict(float)
    for e in tl.events:
        if e.kind == "load":
            load[(e.step, e.layer)] += e.dur_us
        elif e.kind == "run":
            run[(e.step, e.layer)] += e.dur_us
    return {k: max(load[k], run[k]) for k in set(load) | set(run)}


@settings(max_examples=60, deadline=None)
@given(steps=step_lists(), frac=budgets, name=policies)
def test_no_policy_beats_the_lower_bound(steps, frac, name):
    tl = simulate_or_skip(_setup(frac), steps, name)
    spans, bound = _layer_spans(tl), _bound(tl)
    for k, b in bound.items():
        assert spans[k] >= b - 1e-9


@settings(max_examples=60, deadline=None)
@given(steps=step_lists())
def test_johnson_is_never_beaten_per_layer_without_a_binding_budget(steps):
    runs = {n: _layer_spans(simulate_or_skip(_setup(10.0), steps, n))
            for n in ("johnson", "fifo", "hebf")}
    for k, best in runs["johnson"].items():
        assert best <= runs["fifo"][k] + 1e-9
        assert best <= runs["hebf"][k] + 1e-9


@settings(max_examples=40, deadline=None)
@given(steps=step_lists(), frac=budgets, name=policies)
def test_simpy_engine_matches_fast_engine_exactly(steps, frac, name):
    fast = simulate_or_skip(_setup(frac, "fast"), steps, name)
    slow = simulate_or_skip(_setup(frac, "simpy"), steps, name)
    key = lambda e: (e.start_us, e.end_us, e.lane, e.kind, e.layer, e.expert)  # noqa: E731
    assert sorted(fast.events, key=key) == sorted(slow.events, key=key)


def test_prefetched_experts_land_before_their_runs():
    """The random workloads above seldom let a predictor learn: here steps alternate
    experts 0 -> 1 -> 2 and 3 -> 4 -> 5 over the three layers under a budget of two experts,
    so hebf-prefetch and edgemoe prefetch, and the rows still replay cleanly."""
    steps = []
    for s in range(8):
        e = 0 if s % 2 == 0 else 3
        steps.append(StepWork("decode", 1, [[Demand(ExpertKey(layer, e + layer), 4, 1, 0.5)]
                                            for layer in range(SPEC.layers)]))
    for name in ("hebf-prefetch", "edgemoe"):
        for engine in ("fast", "simpy"):
            setup = SimSetup(SPEC, LinearProfile(), LAYOUT, 2 * SIZES.by_bits[4],
                             engine=engine)
            tl = simulate_or_skip(setup, steps, name)
            assert len(tl.of_kind("prefetch")) >= 4, (name, engine)
            assert_lanes_and_residency(tl, name)
