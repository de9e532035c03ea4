"""The evaluation's baselines and the project's additions: bit rules, substitution, prefetch."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.core.errors import UserError
from d2moe.core.jobs import Demand, ExpertKey, Load, Plan
from d2moe.core.sizes import QuantLayout
from d2moe.policies import (
    POLICIES,
    ExpertStats,
    Policy,
    ResidentSet,
    Sizes,
    make_policy,
    policy_config,
)
from d2moe.policies.bitrules import Static
from d2moe.policies.check import check_plan
from d2moe.policies.prefetch import HeatPredictor
from tests.policies.test_plans import Costs
from tests.sim.workloads import SPEC

K = [ExpertKey(0, e) for e in range(10)]


def test_static_bits_fill_the_shares_by_importance():
    imp = [[0.1 * e for e in range(10)]]  # expert 9 most important
    stats = ExpertStats.from_lists(imp, [[[1.0 if i == j else 0.0 for j in range(10)]
                                          for i in range(10)]])
    rule = Static(stats, (4, 3, 2), (0.3, 0.4, 0.3))
    assert [rule.bits(k, 8) for k in K] == [2, 2, 2, 3, 3, 3, 3, 4, 4, 4]
    d = rule.apply([Demand(K[0], 4, 1), Demand(K[9], 4, 1)])
    assert d == [Demand(K[0], 2, 1, asked=4), Demand(K[9], 4, 1)]


def test_every_registered_bit_rule_keeps_its_bits_within_its_bounds():
    from d2moe.policies.bitrules import BIT_RULES
    from d2moe.policies.presets import PolicyConfig

    stats = ExpertStats.from_lists([[0.1 * e for e in range(10)]],
                                   [[[float(i == j) for j in range(10)] for i in range(10)]])
    cfg = PolicyConfig("fifo", "lru", False, uniform_bits=5)
    asked = [Demand(k, b, 1) for k, b in zip(K, (2, 3, 4, 8, 2, 3, 4, 8, 2, 3), strict=True)]
    seen = {}
    for name in BIT_RULES.names():
        rule = BIT_RULES.factory(name)(cfg, stats)
        out = rule.apply(asked)
        assert [d.key for d in out] == K and all(d.tokens == 1 for d in out), name
        lo, hi = rule.min_bits(2), rule.max_bits(8)
        assert all(lo <= d.bits <= hi for d in out), name
        # a changed demand remembers the bits it was routed at
        assert all(d.asked == a.bits for d, a in zip(out, asked, strict=True)
                   if d.bits != a.bits), name
        seen[name] = [d.bits for d in out]
    assert seen["asked"] == [d.bits for d in asked] and set(seen["uniform"]) == {5}
    assert seen["static"] == [2, 2, 2, 3, 3, 3, 3, 4, 4, 4]
    with pytest.raises(UserError, match="field 'bits'.*choose one of: asked, static, uniform"):
        BIT_RULES.factory("nope", field="bits")


def test_every_registered_substitution_mode_serves_only_low_misses_from_resident_experts():
    from d2moe.policies.presets import PolicyConfig
    from d2moe.policies.substitute import SUBSTITUTIONS

    sizes = Sizes.of(SPEC, QuantLayout(b1=2, bK=4))
    pool = ResidentSet(sizes, 10 * sizes.by_bits[4])
    for key, bits in ((K[0], 2), (K[1], 4), (K[2], 4)):
        pool.apply_load(Load(key, 0, bits))
    stats = _similarity({(3, 1): 0.9, (4, 2): 0.8, (5, 1): 0.7}, n=6)
    cfg = PolicyConfig("fifo", "lru", False)
    demands = [Demand(K[0], 4, 1, importance=0.1),  # partly resident, low
               Demand(K[1], 4, 2, importance=0.1),  # a hit
               Demand(K[3], 4, 1, importance=0.1),  # missing, low
               Demand(K[4], 4, 1, importance=0.2),  # missing, low
               Demand(K[5], 4, 1, importance=0.9)]  # missing, high
    seen = {}
    for name in SUBSTITUTIONS.names():
        keep, subs = SUBSTITUTIONS.factory(name)(cfg, stats).split(demands, pool.view)
        served = [s.demand for s in subs]
        assert sorted(d.key for d in keep + served) == [d.key for d in demands], name
        for s in subs:
            assert pool.bits.get(s.source, 0) >= s.demand.bits > 0, name
            assert s.demand.importance < cfg.substitute_below, name
            assert pool.bits.get(s.demand.key, 0) < s.demand.asked, name  # was a miss
        seen[name] = [(s.demand.key.expert, s.source.expert, s.demand.bits) for s in subs]
    assert seen["none"] == [] and seen["lower"] == [(0, 0, 2)]
    assert seen["similar"] == [(3, 1, 4), (4, 2, 4)]
    with pytest.raises(UserError, match="field 'substitute'.*choose one of: lower, none, sim"):
        SUBSTITUTIONS.factory("nope", field="substitute")


def test_every_registered_prefetcher_loads_only_the_next_layers_missing_experts():
    from d2moe.policies.prefetch import PREFETCHERS
    from d2moe.policies.presets import PolicyConfig

    sizes = Sizes.of(SPEC, QuantLayout(b1=2, bK=4))
    prefetched = {}
    for name in PREFETCHERS.names():
        policy = Policy("t", PolicyConfig("hebf", "hottest", True, prefetch=name))
        count = 0
        # _alternate's check_plan: each load starts from the bits resident at that point
        for _, layer, plan in _alternate(policy, ResidentSet(sizes, 3 * sizes.by_bits[4])):
            for ld in plan.loads:
                if ld.prefetch:
                    assert ld.key.layer == (layer + 1) % 2, name
                    count += 1
        prefetched[name] = count
    assert prefetched["none"] == 0 and prefetched["heat"] > 0
    with pytest.raises(UserError, match="field 'prefetch'.*choose one of: heat, none"):
        PREFETCHERS.factory("nope", field="prefetch")


def test_policies_that_need_statistics_say_so_without_them():
    for name in POLICIES.names():
        if policy_config(name).needs_stats:
            with pytest.raises(UserError, match="expert-stats"):
                make_policy(name)
        else:
            make_policy(name)


def _stats(n: int = 10) -> ExpertStats:
    return ExpertStats.from_lists([[0.1 * e for e in range(n)]],
                                  [[[1.0 if i == j else 0.0 for j in range(n)]
                                    for i in range(n)]])


def _stats_parts():
    """(registry, PolicyConfig field) of each part a policy builds with its statistics."""
    from d2moe.policies.bitrules import BIT_RULES
    from d2moe.policies.prefetch import PREFETCHERS
    from d2moe.policies.substitute import SUBSTITUTIONS

    return ((BIT_RULES, "bits"), (SUBSTITUTIONS, "substitute"), (PREFETCHERS, "prefetch"))


def test_every_part_needs_stats_exactly_as_registered():
    """A part declared needs_stats cannot be built without statistics; any other can."""
    from d2moe.policies import PolicyConfig

    options = PolicyConfig("fifo", "lru", False)
    declared = set()
    for registry, _ in _stats_parts():
        for name in registry.names():
            factory = registry.factory(name)
            if registry.needs_stats(name):
                declared.add((registry.family, name))
                with pytest.raises(UserError, match="expert-stats"):
                    factory(options, None)
            else:
                factory(options, None)
            factory(options, _stats())
    assert declared == {("bit rule", "static"), ("substitution mode", "similar")}


def test_every_preset_needs_stats_as_its_parts_declare():
    from dataclasses import replace

    needing = set()
    for name in POLICIES.names():
        cfg = policy_config(name)
        parts = [registry.needs_stats(getattr(cfg, f)) for registry, f in _stats_parts()]
        assert cfg.needs_stats == any(parts), name
        # as the rule was written before the registries declared it
        assert cfg.needs_stats == (cfg.bits == "static" or cfg.substitute == "similar"), name
        if cfg.needs_stats:
            needing.add(name)
    assert needing == {"edgemoe", "sub-similar"}
    with pytest.raises(UserError, match="field 'substitute'.*choose one of"):
        _ = replace(policy_config("fifo"), substitute="nope").needs_stats


def test_a_part_registered_as_needing_stats_is_honoured(monkeypatch):
    """A prefetcher registered (in a fresh registry, not the global one) with
    needs_stats=True makes the policy that names it ask for statistics, and gets them."""
    from dataclasses import replace

    import d2moe.policies.presets as presets
    from d2moe.policies import PolicyConfig
    from d2moe.policies.prefetch import PREFETCHERS, Prefetcher
    from d2moe.policies.registry import Registry

    fresh: Registry[Prefetcher] = Registry("prefetcher")
    fresh.register("none")(PREFETCHERS.factory("none"))
    seen = []

    @fresh.register("peek", needs_stats=True)
    def _peek(options: object, stats: ExpertStats | None) -> Prefetcher:
        """a test prefetcher that records the statistics it was built with"""
        seen.append(stats)
        return Prefetcher()

    assert fresh.needs_stats("peek") and not fresh.needs_stats("none")
    with pytest.raises(UserError, match="field 'prefetch': unknown prefetcher 'nope'"):
        fresh.needs_stats("nope", field="prefetch")
    monkeypatch.setattr(presets, "PREFETCHERS", fresh)
    cfg = PolicyConfig("hebf", "hottest", True, prefetch="peek")
    assert cfg.needs_stats and not replace(cfg, prefetch="none").needs_stats
    stats = _stats()
    Policy("t", cfg, stats)
    assert seen == [stats]
    assert "peek" not in PREFETCHERS.names()  # the global registry is untouched


def _similarity(pairs: dict[tuple[int, int], float], n: int = 4) -> ExpertStats:
    sim = [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
    for (i, j), v in pairs.items():
        sim[i][j] = sim[j][i] = v
    return ExpertStats.from_lists([[1.0] * n], [sim])


def test_sub_similar_serves_a_low_importance_miss_by_the_most_similar_resident_expert():
    sizes = Sizes.of(SPEC, QuantLayout(b1=2, bK=4))
    pool = ResidentSet(sizes, 10 * sizes.by_bits[4])
    for e in (1, 2):
        pool.apply_load(Load(ExpertKey(0, e), 0, 4))
    policy = make_policy("sub-similar", stats=_similarity({(0, 1): 0.2, (0, 2): 0.7,
                                                           (3, 1): 0.9}))
    low = Demand(ExpertKey(0, 0), 4, 2, importance=0.1)  # missing, low: served by 2
    high = Demand(ExpertKey(0, 3), 4, 1, importance=0.8)  # missing, high: loaded
    plan = policy.plan(0, [low, high], pool.view, Costs())
    check_plan(plan, [low, high], pool, substitute_below=policy.config.substitute_below)
    by_key = {r.key: r for r in plan.runs}
    assert by_key[low.key].served_by == ExpertKey(0, 2)
    assert by_key[high.key].served_by is None
    assert [ld.key for ld in plan.loads] == [high.key]


def test_sub_lower_serves_a_low_importance_miss_at_the_resident_bits():
    sizes = Sizes.of(SPEC, QuantLayout(b1=2, bK=4))
    pool = ResidentSet(sizes, 10 * sizes.by_bits[4])
    pool.apply_load(Load(K[0], 0, 2))
    pool.apply_load(Load(K[1], 0, 2))
    policy = make_policy("sub-lower")
    low, high = Demand(K[0], 4, 1, 0.1), Demand(K[1], 4, 1, 0.9)
    plan = policy.plan(0, [low, high], pool.view, Costs())
    check_plan(plan, [low, high], pool, substitute_below=policy.config.substitute_below)
    runs = {r.key: r for r in plan.runs}
    assert (runs[K[0]].bits, runs[K[0]].asked) == (2, 4)  # no load: the base planes serve
    assert (runs[K[1]].bits, runs[K[1]].asked) == (4, 0)
    assert [(ld.key, ld.bits_from, ld.bits_to) for ld in plan.loads] == [(K[1], 2, 4)]


def test_heat_predictor_learns_a_fixed_layer_to_layer_map():
    p = HeatPredictor(min_prob=0.5)
    for _ in range(3):  # three steps: expert e at layer 0 is always followed by e+1 at 1
        for e in (0, 2):
            p.observe(0, [Demand(ExpertKey(0, e), 4, 1)])
            p.observe(1, [Demand(ExpertKey(1, e + 1), 4, 1)])
    assert p.predict(0, [Demand(ExpertKey(0, 2), 4, 1)]) == [(ExpertKey(1, 3), 1.0)]
    assert p.predict(0, [Demand(ExpertKey(0, 0), 4, 1)]) == [(ExpertKey(1, 1), 1.0)]
    assert p.predict(0, [Demand(ExpertKey(0, 5), 4, 1)]) == []  # never seen: no guess


def _layer(layer: int, tokens: dict[int, int]) -> list[Demand]:
    """One execution of `layer`: the demands of `tokens` (expert -> tokens), at 4 bits."""
    return [Demand(ExpertKey(layer, e), 4, t) for e, t in sorted(tokens.items())]


def _decode(p: HeatPredictor, steps: list[tuple[list[int], list[int]]]) -> None:
    """One token per step over two layers: (its experts at layer 0, its experts at layer 1)."""
    for first, second in steps:
        p.observe(0, _layer(0, dict.fromkeys(first, 1)))
        p.observe(1, _layer(1, dict.fromkeys(second, 1)))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_heat_predictor_gives_a_certain_follower_probability_one_for_any_top_k(k):
    """Two token patterns alternate; each of a pattern's k experts at layer 0 is always
    followed by the same k experts at layer 1. Each follower is needed with probability 1
    (the slot-share estimator before 2026-11-24 said 1/k: 0.25 for top-4, below 0.3), the
    other pattern's experts are not scored; and the prediction is the next layer's keys."""
    a, b = list(range(k)), list(range(k, 2 * k))
    follow = {0: [(e + 3) % 16 for e in a], 1: [(e + 3) % 16 for e in b]}
    p = HeatPredictor(min_prob=0.9)
    _decode(p, [(a, follow[0]), (b, follow[1])] * 5)
    prob = p.probabilities(0, _layer(0, dict.fromkeys(a, 1)))
    assert prob == pytest.approx(dict.fromkeys(follow[0], 1.0))  # the others never followed
    assert p.predict(0, _layer(0, dict.fromkeys(a, 1))) == [
        (ExpertKey(1, f), pytest.approx(1.0)) for f in sorted(follow[0])]
    assert p.top_k == k


@pytest.mark.parametrize("k", [1, 2, 4])
def test_heat_predictor_gives_a_50_50_alternation_one_half(k):
    """The same k experts at layer 0, followed in turn by two disjoint sets at layer 1: every
    expert of either set is needed half the time."""
    a = list(range(k))
    x, y = [8 + e for e in a], [12 + e for e in a]
    p = HeatPredictor(min_prob=0.4)
    _decode(p, [(a, x), (a, y)] * 6)
    demands = _layer(0, dict.fromkeys(a, 1))
    assert p.probabilities(0, demands) == pytest.approx(dict.fromkeys(x + y, 0.5))
    guess = p.predict(0, demands)  # at most as many as the layer needed, ties by expert id
    assert guess == [(ExpertKey(1, f), pytest.approx(0.5)) for f in sorted(x + y)[:k]]
    assert HeatPredictor(min_prob=0.6).predict(0, demands) == []


def test_heat_predictor_counts_a_prompt_step_at_its_per_token_mix():
    """A prompt of 8 tokens at top-2 needs all 8 experts at both layers (each expert 2
    tokens). Counted as one execution, every pair would look certain; counted per token it
    says each expert at layer 1 takes 2 of the 8 tokens: 0.25 for a single token, and for a
    second 8-token step 1 - 0.75^8."""
    p = HeatPredictor()
    for layer in (0, 1):
        p.observe(layer, _layer(layer, dict.fromkeys(range(8), 2)))
    _decode(p, [([0, 1], [2, 3])])  # teaches k = 2 (and one decode transition)
    prob = p.probabilities(0, _layer(0, {5: 1, 6: 1}))  # seen in the prompt only
    assert prob == pytest.approx(dict.fromkeys(range(8), 0.25))
    prompt = p.probabilities(0, _layer(0, {e: 2 for e in range(5, 8)} | {4: 10}))
    assert prompt == pytest.approx(dict.fromkeys(range(8), 1 - 0.75 ** 8))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(st.integers(0, 7), st.integers(0, 6), max_size=5),
                min_size=1, max_size=40),
       st.integers(1, 4), st.floats(0.0, 1.0))
def test_heat_predictions_are_probabilities(executions, layers, min_prob):
    """Any sequence of executions (layers in turn, any tokens, experts never seen, empty
    layers): every probability is in [0, 1]; the prediction is the probabilities at least
    min_prob, most likely first, at most as many as the layer needed, for the next layer."""
    p = HeatPredictor(min_prob=min_prob)
    for i, tokens in enumerate(executions):
        layer = i % layers
        demands = _layer(layer, tokens)
        p.observe(layer, demands)
        prob = p.probabilities(layer, demands)
        assert all(0.0 <= v <= 1.0 for v in prob.values())
        guess = p.predict(layer, demands)
        assert len(guess) <= len({d.key.expert for d in demands})
        assert [v for _, v in guess] == sorted((v for _, v in guess), reverse=True)
        assert all(v >= min_prob and prob[k.expert] == v for k, v in guess)
        assert all(k.layer == (layer + 1) % p.layers for k, _ in guess)


def _alternate(policy: Policy, pool: ResidentSet) -> list[tuple[int, int, Plan]]:
    """Six steps over two layers alternating expert 0 -> 1 and 2 -> 3, each plan checked and
    applied to `pool`: (step, layer, plan) per layer."""
    out = []
    for step in range(6):
        e = 0 if step % 2 == 0 else 2
        for layer, expert in ((0, e), (1, e + 1)):
            d = [Demand(ExpertKey(layer, expert), 4, 1)]
            plan = policy.plan(layer, d, pool.view, Costs())
            check_plan(plan, d, pool)
            for ld in plan.loads:
                for ev in ld.evict:
                    pool.apply_evict(ev)
                pool.apply_load(ld)
            out.append((step, layer, plan))
    return out


def test_hebf_prefetch_queues_the_predicted_expert_behind_the_layers_own_loads():
    """Two slots; steps alternate expert 0 -> 1 and 2 -> 3 over two layers: once the map is
    learned, layer 0's plan prefetches the layer-1 expert its demand predicts."""
    sizes = Sizes.of(SPEC, QuantLayout(b1=2, bK=4))
    plans = _alternate(make_policy("hebf-prefetch"), ResidentSet(sizes, 2 * sizes.by_bits[4]))
    prefetched = {(step, ld.key) for step, layer, p in plans if layer == 0
                  for ld in p.loads if ld.prefetch}
    assert {(4, ExpertKey(1, 1)), (5, ExpertKey(1, 3))} <= prefetched
    assert all(not ld.prefetch for step, _, p in plans if step == 0 for ld in p.loads)
    # the prefetched expert is then a hit: layer 1 of those steps loads nothing on demand
    assert not [ld for step, layer, p in plans if step >= 4 and layer == 1
                for ld in p.loads if not ld.prefetch]


def test_pinned_baselines_preload_every_expert_at_their_bits():
    sizes = Sizes.of(SPEC, QuantLayout(kind="copies", b1=8, bK=8))
    pool = ResidentSet(sizes, 10**9)
    policy = make_policy("hold-in-memory")
    keys = [ExpertKey(layer, e) for layer in range(SPEC.layers) for e in range(SPEC.experts)]
    loads = policy.preload(keys, pool.view)
    assert [(ld.key, ld.bits_to) for ld in loads] == [(k, 8) for k in keys]
    assert make_policy("fifo").preload(keys, pool.view) == []
