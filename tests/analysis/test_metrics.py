"""Metrics on hand-checked golden timelines, invariants on generated ones, file round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.analysis import compare, compute_metrics, resident_curve
from d2moe.analysis.columns import union_length_us
from d2moe.core.errors import UserError
from d2moe.core.events import Event, Timeline, load_timeline, save_timeline
from tests.analysis.synth import Job, Layer, random_steps, schedule


def E(lane, kind, step, layer, expert, bits_from, bits_to, tokens, nbytes, start, end):  # noqa: N802
    return Event(lane, kind, step, layer, expert, bits_from, bits_to, tokens, nbytes,
                 float(start), float(end))


def golden_decode() -> Timeline:
    """One decode step of two layers; every metric below is worked out by hand."""
    ev = [
        E("step", "decode", 0, -1, -1, 0, 0, 2, 0, 0, 60),
        # layer 0: E1 is loaded on demand (compute stalls for it), E2 was resident
        E("compute", "non_expert", 0, 0, -1, 0, 0, 2, 0, 0, 10),
        E("io", "load", 0, 0, 1, 0, 4, 0, 100, 10, 30),
        E("compute", "stall", 0, 0, 1, 0, 0, 0, 0, 10, 30),
        E("compute", "run", 0, 0, 1, 4, 4, 2, 0, 30, 40),
        E("compute", "run", 0, 0, 2, 3, 3, 1, 0, 40, 45),
        # layer 1: E3 was prefetched during layer 0; E1 is evicted to make room for E4
        E("io", "prefetch", 0, 1, 3, 0, 2, 0, 60, 30, 38),
        E("compute", "non_expert", 0, 1, -1, 0, 0, 2, 0, 45, 50),
        E("memory", "evict", 0, 0, 1, 4, 0, 0, 100, 50, 50),
        E("io", "load", 0, 1, 4, 0, 3, 0, 80, 50, 55),
        E("compute", "run", 0, 1, 3, 3, 2, 1, 0, 50, 52),  # asked 3 bits, ran at 2
        E("compute", "stall", 0, 1, 4, 0, 0, 0, 0, 52, 55),
        E("compute", "run", 0, 1, 4, 3, 3, 1, 0, 55, 60),
    ]
    return Timeline(ev, {"backend": "sim", "policy": "hebf", "initial_resident_bytes": 50})


def test_golden_decode_metrics_by_hand():
    m = compute_metrics(golden_decode())
    assert m.total_us == 60.0
    assert (m.decode_steps, m.decode_tokens, m.decode_us) == (1, 2, 60.0)
    assert m.decode_tokens_per_s == pytest.approx(2 / 60e-6)
    assert (m.prefill_steps, m.prefill_tokens_per_s) == (0, 0.0)
    # I/O busy: [10,30] + [30,38] + [50,55] = 33 of 60
    assert m.io_busy_us == 33.0 and m.io_idle_us == 27.0
    assert m.io_bubble_pct == pytest.approx(45.0)
    # compute busy: non_expert 10 + 5, runs 10 + 5 + 2 + 5 (stalls do not count)
    assert m.compute_busy_us == 37.0 and m.compute_idle_us == 23.0
    assert m.compute_bubble_pct == pytest.approx(100 * 23 / 60)
    assert m.exposed_io_us == 23.0 and m.stalls == 2
    # demands E1 (loaded), E2 (resident), E3 (prefetched: a hit), E4 (loaded)
    assert (m.demands, m.hits, m.hit_rate) == (4, 2, 0.5)
    assert (m.bytes_loaded, m.bytes_prefetched, m.bytes_evicted) == (240, 60, 100)
    # resident: 50 -> 150 (t=10) -> 210 (t=30) -> 110 -> 190 (t=50: evict before load)
    assert (m.initial_resident_bytes, m.peak_resident_bytes, m.final_resident_bytes) == \
        (50, 210, 190)
    assert (m.runs, m.loads, m.prefetches, m.evicts) == (4, 2, 1, 1)
    assert m.degraded_runs == 1
    assert m.mean_run_bits == pytest.approx((4 * 2 + 3 + 2 + 3) / 5)
    # bound: layer 0: 10 + max(20, 15) = 30; layer 1: 5 + max(5, 7) = 12 (prefetch left out)
    assert m.bound_us == 42.0 and m.decode_bound_us == 42.0
    assert m.gap_to_bound == pytest.approx(60 / 42 - 1)
    assert m.decode_gap_to_bound == pytest.approx(60 / 42 - 1)


def test_golden_resident_curve():
    t, level = resident_curve(golden_decode())
    assert t.tolist() == [0.0, 10.0, 30.0, 50.0, 60.0]
    assert level.tolist() == [50, 150, 210, 190, 190]


def golden_prefill_decode() -> Timeline:
    ev = [
        E("step", "prefill", 0, -1, -1, 0, 0, 8, 0, 0, 100),
        E("compute", "non_expert", 0, 0, -1, 0, 0, 8, 0, 0, 40),
        E("compute", "run", 0, 0, 0, 4, 4, 8, 0, 40, 100),
        E("step", "decode", 1, -1, -1, 0, 0, 1, 0, 100, 130),
        E("compute", "non_expert", 1, 0, -1, 0, 0, 1, 0, 100, 110),
        E("io", "load", 1, 0, 5, 0, 4, 0, 50, 110, 125),
        E("compute", "stall", 1, 0, 5, 0, 0, 0, 0, 110, 125),
        E("compute", "run", 1, 0, 5, 4, 4, 1, 0, 125, 130),
    ]
    return Timeline(ev, {})


def test_golden_phases_and_decode_bound():
    m = compute_metrics(golden_prefill_decode(), per_step=True)
    assert m.total_us == 130.0 and m.steps == 2
    assert m.prefill_tokens_per_s == pytest.approx(8 / 100e-6)
    assert m.decode_tokens_per_s == pytest.approx(1 / 30e-6)
    # step 0: 40 + max(0, 60) = 100; step 1: 10 + max(15, 5) = 25
    assert m.bound_us == 125.0 and m.decode_bound_us == 25.0
    assert m.gap_to_bound == pytest.approx(130 / 125 - 1)
    assert m.decode_gap_to_bound == pytest.approx(30 / 25 - 1)
    assert (m.demands, m.hits) == (2, 1)
    assert m.peak_resident_bytes == 50 and m.initial_resident_bytes == 0
    ps = m.per_step
    assert ps is not None
    assert ps["step"].tolist() == [0, 1]
    assert ps["is_decode"].tolist() == [False, True]
    assert ps["dur_us"].tolist() == [100.0, 30.0]
    assert ps["stall_us"].tolist() == [0.0, 15.0]
    assert ps["bound_us"].tolist() == [100.0, 25.0]
    assert m.as_dict(per_step=True)["per_step"]["tokens"] == [8, 1]
    assert "per_step" not in m.as_dict()


def test_empty_timeline():
    m = compute_metrics(Timeline([], {}))
    assert m.total_us == 0.0 and m.demands == 0 and m.hit_rate == 1.0
    assert m.bound_us == 0.0 and m.gap_to_bound == 0.0 and m.peak_resident_bytes == 0


def test_overlapping_io_counted_once():
    ev = [E("step", "decode", 0, -1, -1, 0, 0, 1, 0, 0, 100),
          E("io", "load", 0, 0, 1, 0, 4, 0, 10, 0, 50),
          E("io", "load", 0, 0, 2, 0, 4, 0, 10, 20, 60),  # a second I/O lane
          E("io", "prefetch", 0, 1, 3, 0, 4, 0, 10, 90, 120)]  # runs past the span: clipped
    m = compute_metrics(Timeline(ev, {}))
    assert m.io_busy_us == 70.0


def test_union_length_matches_brute_force():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 200, 60).astype(float)
    e = s + rng.integers(0, 30, 60)
    grid = np.zeros(300, bool)
    for a, b in zip(s.astype(int), e.astype(int), strict=True):
        grid[a:b] = True
    assert union_length_us(s, e) == grid.sum()


def test_bad_rows_are_user_errors():
    with pytest.raises(UserError, match="unknown event kind"):
        compute_metrics(Timeline([E("io", "teleport", 0, 0, 0, 0, 0, 0, 0, 0, 1)], {}))
    with pytest.raises(UserError, match="end before they start"):
        compute_metrics(Timeline([E("io", "load", 0, 0, 0, 0, 4, 0, 1, 5, 1)], {}))


def test_compare_relative_error():
    a = compute_metrics(golden_decode())
    b = compute_metrics(golden_prefill_decode())
    err = compare(a, b)
    assert err["total_us"] == pytest.approx(100 * (60 - 130) / 130)
    assert err["prefill_tokens_per_s"] == -100.0
    assert err["prefetches"] == math.inf  # reference 0, compared nonzero
    assert err["stalls"] == pytest.approx(100.0)
    assert compare(a, a)["bound_us"] == 0.0


@pytest.mark.parametrize("suffix", [".jsonl", ".npz"])
def test_round_trip_preserves_metrics(tmp_path, suffix):
    tl = schedule(random_steps(np.random.default_rng(3), steps=3, layers=4), policy="hebf",
                  budget_bytes=1500, prefetch=True, meta={"initial_resident_bytes": 0})
    path = tmp_path / f"t{suffix}"
    save_timeline(path, tl)
    back = load_timeline(path)
    assert compute_metrics(back).as_dict() == compute_metrics(tl).as_dict()


def _reference_peak(tl: Timeline) -> int:
    """Resident peak replayed event by event (frees before allocations at each instant)."""
    changes: dict[float, list[int]] = {}
    for e in tl.events:
        if e.kind in ("load", "prefetch"):
            changes.setdefault(e.start_us, []).append(e.bytes)
        elif e.kind == "evict":
            changes.setdefault(e.start_us, []).append(-e.bytes)
    level = peak = int(tl.meta.get("initial_resident_bytes", 0))
    for t in sorted(changes):
        for d in sorted(changes[t]):
            level += d
            peak = max(peak, level)
    return peak


jobs = st.builds(Job, expert=st.integers(0, 5), bits=st.integers(2, 4),
                 tokens=st.integers(1, 8), run_us=st.floats(0, 50), load_us=st.floats(0, 50))
layers = st.builds(
    Layer, non_expert_us=st.floats(0, 30),
    jobs=st.lists(jobs, max_size=4, unique_by=lambda j: j.expert).map(tuple))


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.lists(layers, min_size=1, max_size=3), min_size=1, max_size=3),
       policy=st.sampled_from(["fifo", "hebf"]), budget=st.integers(0, 2000),
       prefetch=st.booleans())
def test_bound_and_lane_invariants(steps, policy, budget, prefetch):
    tl = schedule(steps, policy=policy, budget_bytes=budget, prefetch=prefetch)
    m = compute_metrics(tl)
    tol = 1e-9 * max(1.0, m.total_us)
    assert m.bound_us <= m.total_us + tol
    assert m.decode_bound_us <= m.decode_us + tol
    # compute never waits except on loads here, so its idle time is exactly the stalls
    assert m.compute_idle_us == pytest.approx(m.exposed_io_us, abs=1e-6)
    assert 0.0 <= m.io_busy_us <= m.total_us + tol
    n_runs = sum(len(layer.jobs) for step in steps for layer in step)
    assert m.runs == m.demands == n_runs
    assert m.hits == n_runs - m.loads
    assert m.peak_resident_bytes == _reference_peak(tl)
    assert m.bytes_loaded - m.bytes_evicted == m.final_resident_bytes


def test_many_events():
    tl = schedule(random_steps(np.random.default_rng(0), steps=100, layers=32, experts=64,
                               top=8), policy="hebf", budget_bytes=40_000)
    assert len(tl.events) > 90_000
    m = compute_metrics(tl)
    assert m.runs == 100 * 32 * 8


def test_substitute_rows_are_compute_but_neither_hit_nor_miss():
    rows = [Event("step", "decode", 0, -1, -1, 0, 0, 1, 0, 0.0, 10.0),
            Event("compute", "run", 0, 0, 1, 4, 4, 1, 0, 0.0, 4.0),
            Event("compute", "substitute", 0, 0, 2, 4, 3, 1, 0, 4.0, 7.0)]
    m = compute_metrics(Timeline(rows, {}))
    assert m.substituted_runs == 1
    assert m.compute_busy_us == 7.0  # the substitute's 3 us count as compute
    assert (m.demands, m.hits) == (1, 1)  # expert 2 ran nowhere itself
