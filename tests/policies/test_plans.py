"""Plans from every policy satisfy `check_plan` from any resident state and budget."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.core.errors import UserError
from d2moe.core.jobs import Demand, Evict, ExpertKey, Load, Plan, Run
from d2moe.core.sizes import QuantLayout
from d2moe.policies import (
    POLICIES,
    RESIDENCY,
    SCHEDULERS,
    PlanError,
    Policy,
    ResidentSet,
    Sizes,
    make_policy,
    policy_config,
)
from d2moe.policies.check import check_plan
from d2moe.policies.planner import Planner, make_jobs
from d2moe.policies.residency import HotAdaptive, HotRecent, Hottest, Lfu, Lru
from tests.sim.workloads import SPEC, LinearProfile, random_stats

SIZES = Sizes.of(SPEC, QuantLayout(b1=2, bK=4))
COPIES = Sizes.of(SPEC, QuantLayout(kind="copies", b1=2, bK=4))


class Costs:
    def __init__(self) -> None:
        self.p = LinearProfile()

    def load_us(self, key, bits_from, bits_to):
        return self.p.load_us(SIZES.load(bits_from, bits_to))

    def run_us(self, key, bits, tokens):
        return self.p.run_us(SPEC, bits, tokens)


@st.composite
def scenarios(draw, name, steps=2):
    """A pool in the policy's own layout, warm or cold, and `steps` steps of 2 layers of
    demands."""
    run_layout = draw(st.sampled_from([QuantLayout(b1=2, bK=4),
                                       QuantLayout(kind="copies", b1=2, bK=4)]))
    layout = policy_config(name).quant_layout(run_layout)
    sizes = Sizes.of(SPEC, layout)
    top = make_policy(name, stats=random_stats(2, 12, 0)).max_bits(4)
    budget = draw(st.integers(sizes.by_bits[top], 12 * sizes.by_bits[top]))
    pool = ResidentSet(sizes, budget)
    for e in draw(st.lists(st.integers(0, 11), max_size=8, unique=True)):
        key = ExpertKey(draw(st.integers(0, 1)), e)
        b = draw(st.integers(layout.b1, layout.bK))
        if pool.used_bytes + sizes.by_bits[b] <= budget and key not in pool.bits:
            pool.apply_load(Load(key, 0, b))
    layers = []
    for _ in range(2 * steps):  # step 0 layers 0, 1; step 1 layers 0, 1; ...
        experts = draw(st.lists(st.integers(0, 11), min_size=1, max_size=4, unique=True))
        demands = []
        for e in sorted(experts):
            for b in sorted(draw(st.sets(st.integers(2, 4), min_size=1, max_size=2))):
                demands.append(Demand(ExpertKey(len(layers) % 2, e), b, draw(st.integers(1, 5)),
                                      draw(st.sampled_from([0.1, 0.5, 0.9]))))
        layers.append(demands)
    return pool, layers, draw(st.integers(0, 3))


def apply_plan(plan: Plan, pool: ResidentSet) -> None:
    for ld in plan.loads:
        for ev in ld.evict:
            pool.apply_evict(ev)
        pool.apply_load(ld)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), name=st.sampled_from(POLICIES.names()))
def test_every_policy_makes_feasible_plans(data, name):
    """Over consecutive layers (so prefetching policies prefetch), from any pool and budget
    that holds one expert: every plan passes check_plan, substitutions included."""
    pool, layers, seed = data.draw(scenarios(name))
    policy = make_policy(name, stats=random_stats(2, 12, seed))
    experts = [ExpertKey(layer, e) for layer in range(2) for e in range(12)]
    pre = policy.preload(experts, pool.view)
    if sum(pool.sizes.load(ld.bits_from, ld.bits_to) for ld in pre) + pool.used_bytes \
            > pool.budget_bytes:
        return  # a pinned policy that cannot hold every expert: the backends refuse it
    for ld in pre:
        pool.apply_load(ld)
    below = policy.config.substitute_below if policy.config.substitute != "none" else 0.0
    for i, demands in enumerate(layers):
        plan = policy.plan(i % 2, demands, pool.view, Costs())
        check_plan(plan, demands, pool, substitute_below=below)
        apply_plan(plan, pool)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), name=st.sampled_from(POLICIES.names()))
def test_victims_are_taken_outside_the_layer_first_and_prefetch_spares_the_layer(data, name):
    """planner.py's preference: a load frees bytes from experts this layer does not run
    before it touches one it runs, so an eviction of a layer expert (other than a copy
    replaced by its own load) comes only once no other expert is resident; a prefetch
    evicts neither the layer's experts nor another prefetch's."""
    pool, layers, seed = data.draw(scenarios(name))
    policy = make_policy(name, stats=random_stats(2, 12, seed))
    if policy.config.pin:
        return  # everything resident up front: nothing is ever evicted
    for i, demands in enumerate(layers):
        plan = policy.plan(i % 2, demands, pool.view, Costs())
        layer = {r.source for r in plan.runs}
        fetched = {ld.key for ld in plan.loads if ld.prefetch}
        for ld in plan.loads:
            for ev in ld.evict:
                if ld.prefetch:
                    assert ev.key not in layer | fetched, (ld, ev)
                elif ev.key in layer and ev.key != ld.key:
                    others = [k for k in pool.bits if k not in layer]
                    assert others == [], (ld, ev, others)
                pool.apply_evict(ev)
            pool.apply_load(ld)


def _bounced(plan: Plan, pool: ResidentSet, layer: set[ExpertKey],
             predicted: set[ExpertKey]) -> list[tuple[Load, Evict, list[ExpertKey]]]:
    """Evictions of a predicted next-layer expert while another expert outside the layer
    and the prediction was still resident, each with those others; applies `plan` to
    `pool`. With the preference of planner.py ((1) before (1b)) the list is empty."""
    bad = []
    for ld in plan.loads:
        for ev in ld.evict:
            if ev.key in predicted and ev.key not in layer:
                others = [k for k in pool.bits if k not in layer | predicted]
                if others:
                    bad.append((ld, ev, others))
            pool.apply_evict(ev)
        pool.apply_load(ld)
    return bad


def _recording_predictions(policy) -> list[set[ExpertKey]]:
    """Record each layer's prediction (the keys the policy will protect and prefetch)."""
    seen: list[set[ExpertKey]] = []
    predict = policy.prefetcher.predict

    def recording(layer, demands):
        guess = predict(layer, demands)
        seen.append({k for k, _ in guess})
        return guess

    policy.prefetcher.predict = recording
    return seen


def test_a_load_spares_the_expert_its_own_prefetch_would_load_back():
    """Layer 0's e0 has always been followed by layer 1's e1; with e0, e5 (hot) and (1, e1)
    resident and a budget of three, layer 0 asks for e0 and a new e2. The coldest expert
    outside the layer is (1, e1): planning before predicting evicted it for e2 and then
    prefetched it back, evicting e5 (two loads, one wasted). Protected, e5 goes and e1
    stays: one load, no prefetch."""
    pool = ResidentSet(SIZES, 3 * SIZES.by_bits[2])
    policy = make_policy("hebf-prefetch")
    seen = _recording_predictions(policy)
    history = [(0, [(0, 1)]), (1, [(1, 1)]), (0, [(0, 1), (5, 8)]), (1, [(1, 1)]),
               (0, [(0, 1), (2, 1)])]
    for layer, asked in history:
        demands = [Demand(ExpertKey(layer, e), 2, t) for e, t in asked]
        plan = policy.plan(layer, demands, pool.view, Costs())
        check_plan(plan, demands, pool)
        before = dict(pool.bits)
        apply_plan(plan, pool)
    assert ExpertKey(1, 1) in seen[-1]  # predicted for the next layer
    assert set(before) == {ExpertKey(0, 0), ExpertKey(0, 5), ExpertKey(1, 1)}
    assert plan.loads == (Load(ExpertKey(0, 2), 0, 2, (Evict(ExpertKey(0, 5), 2, 0),)),)
    assert set(pool.bits) == {ExpertKey(0, 0), ExpertKey(0, 2), ExpertKey(1, 1)}


def test_a_load_evicts_predicted_experts_least_likely_first_once_nothing_else_is_left():
    """Preference (1b): when only the layer and the prediction are resident, a load evicts
    the least likely predicted expert (not the coldest), and the plan still fits."""
    pool = ResidentSet(SIZES, 3 * SIZES.by_bits[2])
    policy = Policy("t", replace(policy_config("hebf-prefetch"), prefetch_min_prob=0.3))
    seen = _recording_predictions(policy)
    # layer 0's e0 is followed by layer 1's e1 twice and e3 once: P(e1) = 2/3, P(e3) = 1/3 per
    # token (top-1; e2 never seen: no evidence); the last layer has 2 tokens, so 1 - (1/3)^2
    # and 1 - (2/3)^2 (0.89, 0.56), both above min_prob 0.3
    history = [(0, [(0, 1)]), (1, [(1, 1)]), (0, [(0, 1)]), (1, [(1, 1)]),
               (0, [(0, 1)]), (1, [(3, 9)]), (0, [(0, 1), (2, 1)])]
    for layer, asked in history:
        demands = [Demand(ExpertKey(layer, e), 2, t) for e, t in asked]
        before = ResidentSet(SIZES, pool.budget_bytes)
        before.bits, before.used_bytes = dict(pool.bits), pool.used_bytes
        plan = policy.plan(layer, demands, pool.view, Costs())
        check_plan(plan, demands, pool)
        apply_plan(plan, pool)
    assert set(before.bits) == {ExpertKey(0, 0), ExpertKey(1, 1), ExpertKey(1, 3)}
    assert seen[-1] == {ExpertKey(1, 1), ExpertKey(1, 3)}
    # (1, e3) is hotter (9 tokens, recent) but less likely: it goes, (1, e1) stays
    assert policy.residency.scores[ExpertKey(1, 3)] > policy.residency.scores[ExpertKey(1, 1)]
    assert plan.loads[0] == Load(ExpertKey(0, 2), 0, 2, (Evict(ExpertKey(1, 3), 2, 0),))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), name=st.sampled_from(["hebf-prefetch", "edgemoe"]))
def test_no_plan_evicts_a_predicted_expert_while_another_could_go(data, name):
    """With heat prefetch, a layer's loads (and prefetches) evict an expert the prediction
    for the next layer names only once every resident expert outside the layer is
    predicted too (feasibility forced it); so no plan evicts a key and loads it back by
    prefetch unless forced. Every plan still passes check_plan."""
    pool, layers, seed = data.draw(scenarios(name, steps=4))
    policy = make_policy(name, stats=random_stats(2, 12, seed))
    seen = _recording_predictions(policy)
    for i, demands in enumerate(layers):
        plan = policy.plan(i % 2, demands, pool.view, Costs())
        check_plan(plan, demands, pool)
        layer = {r.source for r in plan.runs}
        predicted = seen[-1]
        evicted = {ev.key for ld in plan.loads for ev in ld.evict}
        bounced = evicted & {ld.key for ld in plan.loads if ld.prefetch}
        assert _bounced(plan, pool, layer, predicted) == [], (bounced, plan)


def test_check_plan_catches_a_run_before_its_bits_exist():
    pool = ResidentSet(SIZES, 10**6)
    d = Demand(ExpertKey(0, 0), 4, 1)
    with pytest.raises(PlanError, match="starts with"):
        check_plan(Plan(runs=(Run(d.key, 4, 1),)), [d], pool)


def test_check_plan_catches_budget_overrun_and_deadlock():
    pool = ResidentSet(SIZES, SIZES.by_bits[4])
    a, b = Demand(ExpertKey(0, 0), 4, 1), Demand(ExpertKey(0, 1), 4, 1)
    over = Plan(loads=(Load(a.key, 0, 4), Load(b.key, 0, 4)),
                runs=(Run(a.key, 4, 1), Run(b.key, 4, 1)))
    with pytest.raises(PlanError, match="budget"):
        check_plan(over, [a, b], pool)
    # b's load evicts a after a's run, but a runs after b: a cycle
    cycle = Plan(loads=(Load(a.key, 0, 4), Load(b.key, 0, 4, (Evict(a.key, 4, 0),))),
                 runs=(Run(b.key, 4, 1), Run(a.key, 4, 1)))
    with pytest.raises(PlanError, match="deadlock"):
        check_plan(cycle, [a, b], pool)


def test_check_plan_catches_runs_that_do_not_match_the_demands():
    """The property tests above trust check_plan to see every demand run exactly once at
    its routed bits: a missing, doubled or re-routed run is refused."""
    pool = ResidentSet(SIZES, 10**6)
    a, b = Demand(ExpertKey(0, 0), 4, 2), Demand(ExpertKey(0, 1), 2, 1)
    for ld in (Load(a.key, 0, 4), Load(b.key, 0, 2)):
        pool.apply_load(ld)
    check_plan(Plan(runs=(Run(a.key, 4, 2), Run(b.key, 2, 1))), [a, b], pool)  # the good one
    for runs in [(Run(a.key, 4, 2),),  # b never runs
                 (Run(a.key, 4, 2), Run(b.key, 2, 1), Run(b.key, 2, 1)),  # b twice
                 (Run(a.key, 4, 1), Run(b.key, 2, 1)),  # a token lost
                 (Run(a.key, 4, 2), Run(b.key, 4, 1, asked=4))]:  # b's tokens re-routed
        with pytest.raises(PlanError, match="do not match demands"):
            check_plan(Plan(runs=runs), [a, b], pool)


def test_check_plan_refuses_substituting_an_important_demand():
    pool = ResidentSet(SIZES, 10**6)
    pool.apply_load(Load(ExpertKey(0, 1), 0, 4))
    low, high = Demand(ExpertKey(0, 0), 4, 1, 0.2), Demand(ExpertKey(0, 2), 4, 1, 0.6)
    src = ExpertKey(0, 1)
    ok = Plan(runs=(Run(low.key, 4, 1, served_by=src),))
    check_plan(ok, [low], pool, substitute_below=0.3)
    bad = Plan(runs=(Run(high.key, 4, 1, served_by=src),))
    with pytest.raises(PlanError, match=r"substitutes a demand of importance 0\.6 >= 0\.3"):
        check_plan(bad, [high], pool, substitute_below=0.3)
    with pytest.raises(PlanError, match="substitutes"):  # no substitution allowed by default
        check_plan(ok, [low], pool, substitute_below=0.0)


@pytest.mark.parametrize("sizes,ops,match", [
    (SIZES, [Evict(ExpertKey(0, 5), 4, 0)], "resident at 0 bits"),  # not resident
    (SIZES, [Evict(ExpertKey(0, 0), 3, 0)], "resident at 4 bits"),  # wrong bits_from
    (SIZES, [Evict(ExpertKey(0, 0), 4, 4)], "resident at 4 bits"),  # lowers nothing
    (COPIES, [Evict(ExpertKey(0, 0), 4, 2)], "plane drop needs a nested layout"),
    (SIZES, [Load(ExpertKey(0, 0), 0, 4)], "resident at 4 bits"),  # already there
    (SIZES, [Load(ExpertKey(0, 0), 4, 3)], "resident at 4 bits"),  # a load that lowers
    (COPIES, [Load(ExpertKey(0, 0), 4, 5)], "raising in place needs a nested layout"),
])
def test_resident_set_refuses_evictions_and_loads_that_do_not_match_the_pool(sizes, ops,
                                                                            match):
    """The accounting both backends share (and check_plan replays) refuses an eviction of an
    expert that is not resident at the bits it names, and a load from the wrong bits; the
    pool is left as it was."""
    pool = ResidentSet(sizes, 10**6)
    pool.apply_load(Load(ExpertKey(0, 0), 0, 4))
    before = (dict(pool.bits), pool.used_bytes, pool.version)
    for op in ops:
        with pytest.raises(PlanError, match=match):
            (pool.apply_evict if isinstance(op, Evict) else pool.apply_load)(op)
    assert (pool.bits, pool.used_bytes, pool.version) == before


def test_unknown_names_are_user_errors_listing_the_choices():
    for reg in (POLICIES, SCHEDULERS, RESIDENCY):
        with pytest.raises(UserError, match="choose one of"):
            reg.create("nope")


def test_every_scheduler_and_residency_rule_runs_in_some_preset():
    """The registry tests run presets (sim/test_presets.py, executor/test_backend.py): a
    scheduler or residency rule no preset names would never run there."""
    configs = [policy_config(n) for n in POLICIES.names()]
    assert {c.scheduler for c in configs} == set(SCHEDULERS.names())
    assert {c.residency for c in configs} == set(RESIDENCY.names())


def test_a_name_registers_once():
    from d2moe.policies.registry import Registry

    reg: Registry[object] = Registry("thing")
    reg.register("a", "first")(object)
    with pytest.raises(ValueError, match="thing 'a' registered twice"):
        reg.register("a")(dict)
    assert reg.names() == ["a"] and reg.doc("a") == "first"
    reg.register("b")(type("B", (), {}))  # no docstring: an empty line, not an IndexError
    assert reg.doc("b") == ""


def test_residency_rankings():
    k = [ExpertKey(0, i) for i in range(3)]
    lru, lfu, hot = Lru(), Lfu(), Hottest(half_life_layers=1.0)
    for r in (lru, lfu, hot):
        r.observe([Demand(k[0], 2, 5)])
        r.observe([Demand(k[1], 2, 1)])
        r.observe([Demand(k[2], 2, 2)])
    assert sorted(k, key=lru.scores.__getitem__) == [k[0], k[1], k[2]]
    assert sorted(k, key=lfu.scores.__getitem__) == [k[1], k[2], k[0]]
    # heats with decay 1/2 per layer: k0 = 5/4, k1 = 1/2, k2 = 2
    assert [hot.heat_now(x) for x in k] == pytest.approx([1.25, 0.5, 2.0])
    assert sorted(k, key=hot.scores.__getitem__) == [k[1], k[0], k[2]]


def test_hebf_puts_resident_then_hottest_then_higher_bits_first():
    pool = ResidentSet(SIZES, 10**6)
    pool.apply_load(Load(ExpertKey(0, 5), 0, 4))
    ds = [Demand(ExpertKey(0, 1), 2, 3), Demand(ExpertKey(0, 2), 4, 3),
          Demand(ExpertKey(0, 3), 2, 9), Demand(ExpertKey(0, 5), 2, 1)]
    plan = make_policy("hebf").plan(0, ds, pool.view, Costs())
    assert [r.key.expert for r in plan.runs] == [5, 3, 2, 1]
    assert [ld.key.expert for ld in plan.loads] == [3, 2, 1]
    fifo = make_policy("fifo").plan(0, ds, pool.view, Costs())
    assert [r.key.expert for r in fifo.runs] == [1, 2, 3, 5]


@pytest.mark.parametrize("make", [lambda: Hottest(half_life_layers=0.5),
                                  lambda: HotRecent(half_life_steps=0.5)],
                         ids=["hottest", "hot-recent"])
def test_decayed_heat_evicts_the_coldest_across_a_rescale(make) -> None:
    """The heats are stored scaled by a growing factor, renormalised before it overflows
    (every ~250 ticks at a half-life of 0.5): an expert whose stored score predates the
    renormalisation must not look hotter than one observed after it."""
    residency = make()
    planner = Planner(residency, plane_drop=False)
    pool = ResidentSet(SIZES, 2 * SIZES.by_bits[4])
    e0, e1, e2 = (ExpertKey(0, e) for e in range(3))

    def step(key: ExpertKey) -> Plan:
        demands = [Demand(key, 4, 1)]
        planner.observe(demands)
        plan = planner.plan(make_jobs(demands, pool), pool)
        apply_plan(plan, pool)
        return plan

    for t in range(2000):  # e0, e1 in turn until a tick rescales
        before, key = residency.scale, (e0, e1)[t % 2]
        step(key)
        if residency.scale < before:
            break
    else:
        pytest.fail("no rescale")
    older = e1 if key == e0 else e0  # observed the tick before, its score not rescaled
    assert residency.heat_now(older) < residency.heat_now(key)
    evicted = [ev.key for ld in step(e2).loads for ev in ld.evict]
    assert evicted == [older]


def test_hot_recent_ages_heat_per_step_not_per_layer() -> None:
    """A step is the planning of layers 0, 1, ...: within it nothing decays; each new step
    halves every heat (half-life 1 step), whatever the number of layers."""
    a, b, c = ExpertKey(0, 0), ExpertKey(1, 0), ExpertKey(0, 1)
    hot = HotRecent(half_life_steps=1.0)
    hot.observe([Demand(a, 4, 4)])  # step 0, layer 0
    hot.observe([Demand(b, 4, 2)])  # step 0, layer 1: no decay
    assert [hot.heat_now(k) for k in (a, b)] == pytest.approx([4.0, 2.0])
    hot.observe([])  # an empty layer neither ticks nor starts a step
    hot.observe([Demand(c, 4, 1)])  # step 1, layer 0: one halving
    assert [hot.heat_now(k) for k in (a, b, c)] == pytest.approx([2.0, 1.0, 1.0])
    hot.observe([Demand(a, 4, 1)])  # step 2 (layer 0 again)
    assert [hot.heat_now(k) for k in (a, b, c)] == pytest.approx([2.0, 0.5, 0.5])
    assert HotRecent().growth == pytest.approx(2 ** 0.5)  # the default: 2 steps


def _routing(streaky: bool, steps: int = 600, experts: int = 8) -> list[list[Demand]]:
    """One layer's demands per step, top-1: streaky = each expert asked for 10 steps in a
    row, in turn (locality, no lasting favourite); else drawn independently with a fixed
    skew (a lasting favourite, no locality)."""
    rng = random.Random(0)
    weights = [2.0 ** -e for e in range(experts)]
    out = []
    for t in range(steps):
        e = (t // 10) % experts if streaky else rng.choices(range(experts), weights)[0]
        out.append([Demand(ExpertKey(0, e), 4, 1)])
    return out


@pytest.mark.parametrize(("streaky", "rule"), [(True, "lru"), (False, "hottest")])
def test_hot_adaptive_follows_the_memory_that_predicts_demand(streaky: bool, rule: str) -> None:
    hot = HotAdaptive()
    for demands in _routing(streaky):
        hot.observe(demands)
    assert hot.rules[hot.using].name == rule
    assert hot.scores is hot.rules[hot.using].scores
    assert hot.record[hot.using] == max(hot.record)


def test_hot_adaptive_switches_keep_the_planners_cold_index_current() -> None:
    """A switch of rule changes every score in use; the planner must re-index the resident
    experts then (as on a rescale), else it ranks them by the other rule's old scores."""
    hot = HotAdaptive()
    planner = Planner(hot, plane_drop=False)
    pool = ResidentSet(SIZES, 3 * SIZES.by_bits[4])
    switches = 0
    for demands in _routing(streaky=True):
        planner.observe(demands)
        apply_plan(planner.plan(make_jobs(demands, pool), pool), pool)
        for key in pool.bits:
            assert planner.cold.latest.get(key) == hot.scores[key], (key, hot.switches)
        switches = hot.switches
    assert switches >= 1


@pytest.mark.parametrize(("scores", "asked", "want"), [
    ({0: 3.0, 1: 2.0, 2: 1.0}, [0], 1.0),  # above both others
    ({0: 3.0, 1: 2.0, 2: 1.0}, [2], 0.0),  # below both
    ({0: 3.0, 1: 2.0, 2: 2.0}, [1], 0.25),  # one below, one tied
    ({0: 3.0, 1: 2.0, 2: 1.0}, [0, 2], 0.5),  # averaged over the experts asked
    ({0: 3.0, 1: 2.0}, [7], 0.0),  # never seen: scored 0, below every expert with heat
    ({0: 3.0, 1: 2.0}, [1, 1], 0.0),  # asked at two bit-widths: counted once
])
def test_percentile_ranks_the_demanded_experts(scores, asked, want) -> None:
    from d2moe.policies.residency import _percentile

    keys = dict.fromkeys(ExpertKey(0, e) for e in scores)
    table = {ExpertKey(0, e): v for e, v in scores.items()}
    demands = [Demand(ExpertKey(0, e), 4, 1) for e in asked]
    assert _percentile(table, keys, demands) == pytest.approx(want)


@settings(max_examples=100, deadline=None)
@given(layers=st.lists(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 7),
                                          st.integers(1, 4)), max_size=6), max_size=60))
def test_hot_adaptive_uses_its_best_record(layers) -> None:
    """Whatever the demands (any layer order, repeats, empty layers), each rule's record is
    an average of percentiles in [0, 1] and the scores in use are the best record's rule's."""
    hot = HotAdaptive(alpha=0.2)
    for layer in layers:
        at = layer[0][0] if layer else 0
        hot.observe([Demand(ExpertKey(at, e), 4, t) for _, e, t in layer])
        assert all(0.0 <= r <= 1.0 for r in hot.record)
        assert hot.record[hot.using] == max(hot.record)
        assert hot.scores is hot.rules[hot.using].scores
