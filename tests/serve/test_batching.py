"""Continuous batching: every request gets exactly its tokens, nothing runs before it arrives,
at most max_batch are active, and the schedule ends."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.core.errors import UserError
from d2moe.serve.arrivals import Request
from d2moe.serve.batching import ContinuousBatcher

requests_st = st.lists(
    st.tuples(st.floats(0, 1e4, allow_nan=False), st.integers(1, 20), st.integers(1, 8)),
    min_size=1, max_size=25).map(
        lambda rows: [Request(i, a, p, o) for i, (a, p, o) in enumerate(rows)])


def drive(requests, max_batch, cost=lambda step: 10.0 + step.total_tokens):
    """Run the batcher against a fake clock; returns (steps with their start, batcher)."""
    b = ContinuousBatcher(requests, max_batch)
    t, steps = 0.0, []
    bound = sum(1 + r.output_tokens for r in requests) + len(requests)
    while not b.done:
        assert len(steps) <= bound, "the schedule does not end"
        step = b.next_step(t)
        if step is None:
            assert not b.active
            t = max(t, b.next_arrival_us())
            continue
        assert len(b.active) <= max_batch
        steps.append((t, step))
        t += cost(step)
        b.complete(step, t)
    return steps, b


@settings(max_examples=150, deadline=None)
@given(requests_st, st.integers(1, 6))
def test_batching_invariants(requests, max_batch):
    steps, b = drive(requests, max_batch)
    by_id = {r.id: r for r in requests}
    got = dict.fromkeys(by_id, 0)
    prefilled = set()
    for t, step in steps:
        assert len(step.requests) <= max_batch
        assert len(set(step.requests)) == len(step.requests)
        for rid, n in zip(step.requests, step.tokens, strict=True):
            r = by_id[rid]
            assert t >= r.arrival_us  # nothing starts before it arrives
            if step.phase == "prefill":
                assert rid not in prefilled and n == r.prompt_tokens
                prefilled.add(rid)
            else:
                assert rid in prefilled and n == 1
            got[rid] += 1  # each step gives a request one output token
    assert got == {rid: r.output_tokens for rid, r in by_id.items()}
    rows = b.rows()
    assert len(rows) == 2 * len(requests)
    for e in rows:
        r = by_id[e.step]
        assert e.start_us == r.arrival_us <= e.end_us
        if e.kind == "request":
            assert (e.tokens, e.bytes) == (r.output_tokens, r.prompt_tokens)
    first = {e.step: e.end_us for e in rows if e.kind == "first_token"}
    end = {e.step: e.end_us for e in rows if e.kind == "request"}
    assert all(first[i] <= end[i] for i in by_id)


@settings(max_examples=60, deadline=None)
@given(requests_st)
def test_batch_of_one_serves_in_arrival_order_one_at_a_time(requests):
    steps, _ = drive(requests, 1)
    order = [s.requests[0] for _, s in steps if s.phase == "prefill"]
    assert order == [r.id for r in sorted(requests, key=lambda r: (r.arrival_us, r.id))]
    current = None
    for _, s in steps:  # a request decodes to its end before the next one's prefill
        assert len(s.requests) == 1
        if s.phase == "prefill":
            current = s.requests[0]
        assert s.requests[0] == current


def test_prefill_first_then_decode_everyone():
    reqs = [Request(0, 0.0, 4, 3), Request(1, 5.0, 2, 2)]
    b = ContinuousBatcher(reqs, 4)
    s = b.next_step(0.0)
    assert (s.phase, s.requests, s.tokens) == ("prefill", (0,), (4,))
    assert b.complete(s, 10.0) == []
    s = b.next_step(10.0)  # request 1 arrived: its prefill runs before anyone decodes
    assert (s.phase, s.requests, s.total_tokens) == ("prefill", (1,), 2)
    b.complete(s, 12.0)
    s = b.next_step(12.0)
    assert (s.phase, s.requests, s.tokens) == ("decode", (0, 1), (1, 1))
    assert b.complete(s, 13.0) == [1]  # two tokens: prefill + one decode
    s = b.next_step(13.0)
    assert s.requests == (0,) and b.complete(s, 14.0) == [0] and b.done
    assert b.next_step(20.0) is None and b.next_arrival_us() is None


def test_misuse_is_caught():
    with pytest.raises(UserError, match="max_batch"):
        ContinuousBatcher([], 0)
    with pytest.raises(ValueError, match="distinct"):
        ContinuousBatcher([Request(0, 0, 1, 1), Request(0, 1, 1, 1)], 2)
    b = ContinuousBatcher([Request(0, 0.0, 1, 2)], 1)
    s = b.next_step(0.0)
    with pytest.raises(RuntimeError):
        b.next_step(0.0)
    with pytest.raises(ValueError, match="before"):
        b.complete(s, -1.0)
