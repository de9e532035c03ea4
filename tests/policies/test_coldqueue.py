"""The planner's cold-expert heap against a plain sorted scan of the same pushes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.core.jobs import ExpertKey
from d2moe.policies.coldqueue import ColdQueue

KEYS = [ExpertKey(layer, e) for layer in range(2) for e in range(4)]


class Scan:
    """What ColdQueue promises, without a heap: the last pushed score per key; a pop scans
    keys by (score, key), keeps excluded ones, forgets those at or below the floor until
    their next push, and removes and returns the first resident above the floor."""

    def __init__(self) -> None:
        self.latest: dict[ExpertKey, float] = {}

    def push(self, keys, scores) -> None:
        for k in keys:
            self.latest[k] = scores[k]

    def pop(self, have, floor, exclude):
        for _, k in sorted((s, k) for k, s in self.latest.items()):
            if k in exclude:
                continue
            del self.latest[k]
            if have.get(k, 0) > floor:
                return k
        return None


ops = st.lists(st.one_of(
    st.tuples(st.just("push"), st.lists(st.sampled_from(KEYS), min_size=1, max_size=3),
              st.integers(0, 3)),  # few scores: ties and repeats of an old score
    st.tuples(st.just("have"), st.sampled_from(KEYS), st.integers(0, 4)),
    st.tuples(st.just("pop"), st.integers(0, 2), st.sets(st.sampled_from(KEYS), max_size=3)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=ops)
def test_pop_returns_what_a_sorted_scan_returns(ops):
    queue, scan = ColdQueue(), Scan()
    scores: dict[ExpertKey, float] = {}
    have: dict[ExpertKey, int] = {}
    for op in ops:
        if op[0] == "push":
            _, keys, score = op
            for k in keys:
                scores[k] = float(score)
            queue.push(keys, scores)
            scan.push(keys, scores)
        elif op[0] == "have":
            _, key, bits = op
            have[key] = bits
        else:
            _, floor, exclude = op
            assert queue.pop(have, floor, exclude) == scan.pop(have, floor, exclude)


def test_stale_entries_are_compacted_and_order_survives():
    """Thousands of score changes on two keys: the heap stays bounded (stale entries
    dropped) and the coldest comes out first, ties to the lower key."""
    a, b = KEYS[0], KEYS[1]
    queue = ColdQueue()
    scores = {}
    for i in range(2000):
        scores[a], scores[b] = float(i), float(i + 1)
        queue.push([a, b], scores)
        assert len(queue.heap) <= 4 * 2 + 256 + 2
    have = {a: 4, b: 4}
    assert [queue.pop(have, 0, ()), queue.pop(have, 0, ()), queue.pop(have, 0, ())] == \
        [a, b, None]
    scores[a] = scores[b] = 5.0
    queue.push([b, a], scores)
    assert queue.pop(have, 0, ()) == a  # equal scores: the lower key
