"""hot-ghost (policies/ghost.py): each rule replayed in a ghost pool at the real budget, the
cheapest ghost's rule in use, and the planner's cold index current across its switches."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.core.jobs import Demand, ExpertKey
from d2moe.policies.ghost import HotGhost
from d2moe.policies.planner import Planner, make_jobs
from d2moe.policies.residency import HotRecent, Hottest, Lru
from d2moe.policies.view import ResidentSet
from tests.policies.test_plans import SIZES, _routing, apply_plan


def _fading(steps: int = 900) -> list[list[Demand]]:
    """Expert 0 in every step for 300 steps (beside a random other), then never again while
    three others take turns in pairs: the long heat memory keeps 0 long after it is gone."""
    rng = random.Random(2)
    pairs = [(1, 2), (2, 3), (1, 3)]
    out = []
    for t in range(steps):
        es = {0, rng.randrange(1, 8)} if t < 300 else set(pairs[(t // 5) % 3])
        out.append([Demand(ExpertKey(0, e), 4, 1) for e in sorted(es)])
    return out


def _drive(residency, routing: list[list[Demand]], budget_experts: int) -> ResidentSet:
    """The real planner over `routing` with `residency`; checks the cold index each layer."""
    planner = Planner(residency, plane_drop=True)
    pool = ResidentSet(SIZES, budget_experts * SIZES.by_bits[4])
    for demands in routing:
        planner.observe(demands)
        apply_plan(planner.plan(make_jobs(demands, pool.view), pool.view), pool)
        for key in pool.bits:  # re-indexed on every switch, as on a rescale
            assert planner.cold.latest.get(key) == residency.scores[key]
    return pool


def _replayed_cost(rule, routing: list[list[Demand]], budget_experts: int,
                   alpha: float) -> float:
    """One rule's ghost by hand: its own planner and pool, from the second layer on (the
    first plan tells the real planner's pool), bytes loaded averaged with `alpha`."""
    planner = Planner(rule, plane_drop=True)
    pool = ResidentSet(SIZES, budget_experts * SIZES.by_bits[4])
    cost = 0.0
    for i, demands in enumerate(routing):
        planner.observe(demands)
        if i == 0:
            continue
        plan = planner.plan(make_jobs(demands, pool.view), pool.view)
        loaded = sum(SIZES.load(ld.bits_from, ld.bits_to) for ld in plan.loads)
        apply_plan(plan, pool)
        cost += alpha * (loaded - cost)
    return cost


@pytest.mark.parametrize(("routing", "budget", "rules"), [
    (_fading(), 3, {"lru", "hot-recent"}),  # the long memory holds the gone favourite
    (_routing(streaky=False), 3, {"hottest"}),  # a lasting skew: the long memory wins
])
def test_hot_ghost_uses_the_rule_whose_replay_loaded_least(routing, budget, rules) -> None:
    ghost = HotGhost()
    _drive(ghost, routing, budget)
    assert ghost.rules[ghost.using].name in rules
    assert ghost.scores is ghost.rules[ghost.using].scores
    by_hand = [_replayed_cost(rule, routing, budget, ghost.alpha)
               for rule in (Hottest(), HotRecent(), Lru())]
    assert ghost.cost == pytest.approx(by_hand)
    assert ghost.cost[ghost.using] == min(ghost.cost) < max(ghost.cost)


def test_without_a_pool_the_rules_still_count() -> None:
    ghost = HotGhost()
    key = ExpertKey(0, 3)
    ghost.observe([Demand(key, 4, 2)])
    assert not ghost.ghosts and all(rule.scores[key] > 0 for rule in ghost.rules)


@settings(max_examples=60, deadline=None)
@given(layers=st.lists(st.lists(st.tuples(st.integers(0, 7), st.integers(2, 4),
                                          st.integers(1, 3)), min_size=1, max_size=4),
                       max_size=40),
       budget=st.integers(1, 6))
def test_hot_ghost_stays_in_budget_and_uses_its_cheapest_ghost(layers, budget) -> None:
    """Any demands (bits 2-4, plane drops) and budget: every ghost pool fits the real budget
    (a `ResidentSet` refuses otherwise) and the scores in use are the cheapest ghost's."""
    ghost = HotGhost(alpha=0.2)
    routing = []
    for layer in layers:
        asked = {}
        for e, bits, tokens in layer:
            asked[e] = Demand(ExpertKey(0, e), max(bits, asked[e].bits if e in asked else 0),
                              tokens)
        routing.append([asked[e] for e in sorted(asked)])
    pool = _drive(ghost, routing, budget)
    assert pool.used_bytes <= pool.budget_bytes
    for _, ghost_pool in ghost.ghosts:
        assert ghost_pool.used_bytes <= ghost_pool.budget_bytes == pool.budget_bytes
    assert ghost.cost[ghost.using] == min(ghost.cost)
