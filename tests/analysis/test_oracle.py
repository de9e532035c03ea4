"""The MIN oracle: optimal against exhaustive search, and never beaten by a registered policy."""

from __future__ import annotations

from functools import cache
from itertools import combinations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from d2moe.analysis import compute_metrics
from d2moe.analysis.oracle import belady, min_fetches, next_uses, steps_from_runs
from d2moe.core.errors import UserError
from d2moe.core.jobs import Demand, ExpertKey
from d2moe.core.sizes import QuantLayout
from d2moe.core.spec import load_spec
from d2moe.experts import stats_from_trace
from d2moe.policies import POLICIES, Sizes, make_policy
from d2moe.policies.presets import policy_config
from d2moe.profiles import load_profile
from d2moe.sim.simulator import SimSetup, StepWork, policy_setup, simulate
from d2moe.sim.workload import steps_from_trace
from d2moe.traces import SynthConfig, synth_trace

Groups = tuple[tuple[tuple[int, int], ...], ...]


def brute_force(groups: Groups, capacity: int) -> int:
    """Fewest fetches over every eviction choice: any set of other experts, any size that fits."""

    @cache
    def best(g: int, cache: frozenset) -> int:
        if g == len(groups):
            return 0
        need = frozenset(groups[g])
        misses = need - cache
        others = sorted(cache - need)
        over = len(cache) + len(misses) - capacity
        return len(misses) + min(
            best(g + 1, (cache - frozenset(out)) | need)
            for n in range(max(over, 0), len(others) + 1) for out in combinations(others, n))

    return best(0, frozenset())


@st.composite
def group_lists(draw: st.DrawFn) -> tuple[Groups, int]:
    """Up to 9 layers' requests over 5 experts, and a capacity that holds the widest layer."""
    item = st.tuples(st.just(0), st.integers(0, 4))
    groups = tuple(tuple(g) for g in draw(st.lists(
        st.lists(item, min_size=1, max_size=3, unique=True), max_size=9)))
    widest = max((len(g) for g in groups), default=1)
    return groups, draw(st.integers(widest, 5))


@settings(max_examples=300, deadline=None)
@given(case=group_lists())
def test_min_equals_exhaustive_search(case):
    groups, capacity = case
    assert min_fetches(groups, capacity) == brute_force(groups, capacity)


def _g(*layers: str) -> Groups:
    return tuple(tuple((0, ord(c)) for c in layer) for layer in layers)


@pytest.mark.parametrize(("groups", "capacity", "fetches"), [
    (_g("a", "b", "c", "a", "b", "c"), 2, 4),  # MIN keeps a (LRU would fetch all 6)
    (_g("ab", "c", "a", "b"), 2, 4),
    (_g("ab", "ab", "ab"), 2, 2),
    (_g(), 1, 0),
])
def test_min_examples(groups, capacity, fetches):
    assert min_fetches(groups, capacity) == fetches == brute_force(groups, capacity)


def test_bound_assumes_a_layer_resident_together():
    """Cap 2, layers [a] [y] [ab] [y] [b] [a]: MIN keeping a layer together fetches 5 times.

    A cache that serves `ab` one by one may evict a right after its run to load b (a comes
    back last) and fetch only 4 times: the bound covers policies that never evict an expert
    of the layer being served, as the planner does while the budget holds the layer.
    """
    groups = _g("a", "y", "ab", "y", "b", "a")
    assert min_fetches(groups, 2) == brute_force(groups, 2) == 5


def test_next_uses_backward_pass():
    assert next_uses(_g("ab", "b", "a")) == [[2, 1], [1 << 62], [1 << 62]]


def _step(*layers: list[tuple[int, int]]) -> StepWork:
    """A step whose layer i demands (expert, bits) pairs."""
    return StepWork("decode", 1, [[Demand(ExpertKey(i, e), b, 1) for e, b in layer]
                                  for i, layer in enumerate(layers)])


def test_belady_counts_like_metrics_and_sizes_at_the_widest_bits():
    sizes = Sizes.of(load_spec("tiny"), QuantLayout(kind="mwq", b1=2, bK=4))
    slot = sizes.by_bits[4]  # the widest any demand asks
    steps = [_step([(0, 2), (0, 4), (1, 2)], [(3, 3)]), _step([(0, 2)], [(3, 2)])]
    r = belady(steps, sizes, 3 * slot + slot // 2)
    assert (r.capacity_experts, r.slot_bytes) == (3, slot)
    assert (r.demands, r.hits, r.fetches) == (5, 2, 3)  # expert 0 at 2 and 4 bits: one demand
    assert r.hit_rate == pytest.approx(2 / 5) and r.bytes_loaded == 3 * slot
    assert "Belady" in r.note
    assert belady([], sizes, slot).hit_rate == 1.0


def test_belady_rejects_a_budget_below_a_layer():
    sizes = Sizes.of(load_spec("tiny"), QuantLayout(kind="copies", b1=4, bK=4))
    with pytest.raises(ValueError, match="demands 3 distinct experts"):
        belady([_step([(0, 4), (1, 4), (2, 4)])], sizes, 2 * sizes.by_bits[4])


# Every registered policy against the oracle on one uniform bit-width with whole-copy loads,
# where a policy's loads are whole experts of one size, as the oracle's slots are.
SPEC = load_spec("tiny")
LAYOUT = QuantLayout(kind="copies", b1=4, bK=4)
SIZES = Sizes.of(SPEC, LAYOUT)
SLOT = SIZES.by_bits[4]
PROFILE = load_profile("rtx3060-laptop")


def _policy_run(name: str, trace, steps, budget: int):
    """(timeline, slot bytes the policy holds an expert in), or None when the policy cannot
    run here: a budget too small for it, or bits the uniform 4-bit store does not hold."""
    policy = make_policy(name, stats_from_trace(trace) if policy_config(name).needs_stats
                         else None)
    setup = SimSetup(SPEC, PROFILE, LAYOUT, budget)
    try:
        tl = simulate(setup, steps, policy)
    except UserError as err:
        if err.field in ("budget", "bits"):
            return None
        raise
    own = policy_setup(setup, policy, 4)
    return tl, Sizes.of(SPEC, own.layout).by_bits[policy.max_bits(4)]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), prefill=st.integers(0, 3), decode=st.integers(1, 40),
       batch=st.integers(1, 2), slots=st.integers(1, SPEC.layers * SPEC.experts))
@example(seed=1, prefill=2, decode=30, batch=1, slots=SPEC.layers * SPEC.experts)
@example(seed=2, prefill=0, decode=40, batch=2, slots=6)
def test_no_policy_beats_the_oracle(seed, prefill, decode, batch, slots):
    cfg = SynthConfig(seed=seed, prefill_tokens=prefill, decode_steps=decode, batch=batch,
                      bits="")
    trace = synth_trace(SPEC, cfg)
    steps = steps_from_trace(trace, 4)
    widest = max(len({d.key for d in layer}) for s in steps for layer in s.layers)
    budget = max(slots, widest) * SLOT
    oracle = belady(steps, SIZES, budget)
    for name in POLICIES.names():
        got = _policy_run(name, trace, steps, budget)
        if got is None or got[1] != SLOT:  # cannot run here, or holds experts in other slots
            continue
        tl, _ = got
        m = compute_metrics(tl)
        kinds = {e.kind for e in tl.events}
        assert all(e.bytes == SLOT for e in tl.events if e.kind in ("load", "prefetch")), name
        preloaded = m.initial_resident_bytes // SLOT  # pinned before the first step, untimed
        # A substituted demand needs no fetch at all: bound what the policy did run instead
        # (fewer requests, so still a lower bound on its fetches).
        ran = belady(steps_from_runs(tl), SIZES, budget)
        bound = ran if "substitute" in kinds else oracle
        if "substitute" not in kinds:
            assert ran == oracle, name  # the runs are exactly the trace's demands
        # Any schedule fetches at least MIN's: a prefetch or a preload is a fetch moved earlier.
        assert bound.fetches <= m.loads + m.prefetches + preloaded, name
        # Hit rates compare only when every hit is fetch-free: metrics counts a prefetched or
        # preloaded expert as a hit, and a substituted demand has no run (not a demand).
        if not ("substitute" in kinds or "prefetch" in kinds or preloaded):
            assert m.demands == oracle.demands, name
            assert oracle.hit_rate >= m.hit_rate, name
