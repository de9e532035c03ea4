"""Online adaptive capacity: the rule's moves by hand, its invariants, its direction under
persistent stalls or none, and the executor still giving the resident model's tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.core.errors import UserError
from d2moe.core.events import Event
from d2moe.router.adaptive import (
    AdaptiveCapacity,
    CapacityConfig,
    StepObservation,
    decide,
    describe,
    mean_bits,
    run_bits,
    step_observation,
)

TRAINED = (0.3, 0.4, 0.3)
BITS = (2, 3, 4)
STALL, IDLE, BAND = 0.2, 0.0, 0.03  # stall fractions: above, below and inside the band
CFG = CapacityConfig(capacity_mode="adaptive", share_step=0.1)


def approx(shares):
    return pytest.approx(shares, abs=1e-9)


def test_down_moves_take_from_the_widest_and_give_to_the_next_narrower():
    s = TRAINED
    want = [(0.3, 0.5, 0.2), (0.3, 0.6, 0.1), (0.3, 0.7, 0.0), (0.4, 0.6, 0.0),
            (0.5, 0.5, 0.0), (0.6, 0.4, 0.0)]
    for w in want:
        s = decide(s, TRAINED, STALL, CFG)
        assert s == approx(w)


def test_up_moves_lift_the_narrowest_back_to_exactly_the_trained_shares():
    s = (0.4, 0.6, 0.0)
    for w in [(0.3, 0.6, 0.1), (0.3, 0.5, 0.2), (0.3, 0.4, 0.3), (0.3, 0.4, 0.3)]:
        s = decide(s, TRAINED, IDLE, CFG)
        assert s == approx(w)


def test_dead_band_keeps_the_shares_and_bounds_limit_the_amount():
    assert decide((0.4, 0.6, 0.0), TRAINED, BAND, CFG) == approx((0.4, 0.6, 0.0))
    cfg = CapacityConfig(capacity_mode="adaptive", share_step=0.1, min_share=0.1,
                         max_share=0.45)
    # the widest can give only 0.05 before min_share
    assert decide((0.3, 0.4, 0.3 - 0.15), TRAINED, STALL, cfg) == approx((0.3, 0.45, 0.1))
    # width 1 is full (max_share), so width 2 gives to width 0
    assert decide((0.3, 0.45, 0.25), TRAINED, STALL, cfg) == approx((0.4, 0.45, 0.15))
    # ceiling "bounds": more bits than trained while nothing stalls
    up = CapacityConfig(capacity_mode="adaptive", share_step=0.1, share_ceiling="bounds")
    assert decide(TRAINED, TRAINED, IDLE, up) == approx((0.2, 0.5, 0.3))
    assert decide((0.0, 1.0, 0.0), TRAINED, IDLE, up) == approx((0.0, 0.9, 0.1))


def test_controller_decides_once_per_window_from_the_summed_observations():
    ctl = AdaptiveCapacity(TRAINED, CFG, window_steps=3)
    obs = [StepObservation(1, 1000, 50, 10, 1), StepObservation(2, 1000, 150, 0, 1),
           StepObservation(3, 2000, 0, 20, 1)]
    assert ctl.observe(obs[0]) is None and ctl.observe(obs[1]) is None
    assert ctl.observe(obs[2]) == approx((0.3, 0.4, 0.3))  # 200/4000 = 0.05: not above
    d = ctl.decisions[0]
    assert (d.step, d.stall_fraction, d.bytes_per_token) == (3, pytest.approx(0.05), 10.0)
    for i in range(3):
        ctl.observe(StepObservation(4 + i, 1000, 60, 0, 1))  # 0.06 > 0.05: down
    assert ctl.shares == approx((0.3, 0.5, 0.2)) and len(ctl.decisions) == 2
    ctl.reset()
    assert ctl.shares == TRAINED and ctl.decisions == []


def test_step_observation_reads_event_rows():
    ev = [Event("compute", "stall", 4, 0, 1, 0, 0, 0, 0, 10.0, 30.0),
          Event("io", "load", 4, 0, 1, 0, 3, 0, 500, 5.0, 30.0),
          Event("compute", "stall", 3, 0, 1, 0, 0, 0, 0, 0.0, 99.0),  # another step
          Event("compute", "run", 4, 0, 1, 3, 3, 1, 0, 30.0, 40.0),
          Event("step", "decode", 4, -1, -1, 0, 0, 1, 0, 0.0, 100.0)]
    assert step_observation(ev, 4, 0.0, 100.0) == StepObservation(4, 100.0, 20.0, 500, 1)
    assert run_bits(ev) == 3.0


def test_config_and_controller_refuse_bad_settings():
    with pytest.raises(UserError, match="capacity mode"):
        CapacityConfig(capacity_mode="auto")
    with pytest.raises(UserError, match="stall-low <= stall-high"):
        CapacityConfig(stall_low=0.2, stall_high=0.1)
    with pytest.raises(UserError, match="sum to 3"):
        AdaptiveCapacity((1.0, 1.0, 1.0), CFG, 8)
    with pytest.raises(UserError, match="no 3 shares"):
        AdaptiveCapacity(TRAINED, CapacityConfig(max_share=0.3), 8)
    with pytest.raises(UserError, match="outside"):
        AdaptiveCapacity(TRAINED, CapacityConfig(min_share=0.31), 8)


shares3 = st.lists(st.integers(0, 20), min_size=3, max_size=3).filter(sum).map(
    lambda v: tuple(x / sum(v) for x in v))


@settings(max_examples=150, deadline=None)
@given(start=shares3, fracs=st.lists(st.floats(0, 1), max_size=40), step=st.floats(0.01, 1),
       u=st.floats(0, 1), v=st.floats(0, 1), ceiling=st.sampled_from(["trained", "bounds"]))
def test_shares_always_sum_to_one_and_stay_within_bounds(start, fracs, step, u, v, ceiling):
    lo, hi = min(start) * u, max(start) + (1 - max(start)) * v  # bounds holding the start
    cfg = CapacityConfig(capacity_mode="adaptive", share_step=step, min_share=lo, max_share=hi,
                         share_ceiling=ceiling)
    s = start
    for f in fracs:
        prev, s = s, decide(s, start, f, cfg)
        assert sum(s) == pytest.approx(1, abs=1e-9)
        assert all(lo - 1e-9 <= x <= hi + 1e-9 for x in s)
        moved = sum(abs(a - b) for a, b in zip(s, prev, strict=True)) / 2
        assert moved <= step + 1e-9
        bits_delta = mean_bits(s, BITS) - mean_bits(prev, BITS)
        if f > cfg.stall_high:
            assert bits_delta <= 1e-9
        elif f < cfg.stall_low:
            assert bits_delta >= -1e-9
            if ceiling == "trained":  # up moves never raise a share past the trained one
                assert all(x <= max(t, y) + 1e-9 for x, t, y in zip(s, start, prev, strict=True))
        else:
            assert s == prev


@pytest.mark.parametrize("ceiling", ["trained", "bounds"])
def test_persistent_stalls_go_to_fewest_bits_and_no_stalls_come_back(ceiling):
    cfg = CapacityConfig(capacity_mode="adaptive", share_step=0.05, min_share=0.1,
                         share_ceiling=ceiling)
    s, seen = TRAINED, [mean_bits(TRAINED, BITS)]
    for _ in range(40):
        s = decide(s, TRAINED, 0.5, cfg)
        seen.append(mean_bits(s, BITS))
    assert all(b <= a + 1e-12 for a, b in zip(seen, seen[1:], strict=False))
    assert s == approx((0.8, 0.1, 0.1))  # as few bits as the bounds allow
    for _ in range(40):
        s = decide(s, TRAINED, 0.0, cfg)
        seen.append(mean_bits(s, BITS))
    assert all(b >= a - 1e-12 for a, b in zip(seen[41:], seen[42:], strict=False))
    assert s == approx(TRAINED if ceiling == "trained" else (0.1, 0.1, 0.8))


def test_describe_a_run_shorter_than_one_window_says_no_decisions():
    ctl = AdaptiveCapacity(TRAINED, CFG, window_steps=16)
    line = describe(ctl.record(), 3.0, "measured")
    assert "stall fractions" not in line and "()" not in line
    assert "no decisions yet (one per 16 decode steps" in line and "0.30/0.40/0.30" in line
    for i in range(16):
        ctl.observe(StepObservation(i + 1, 1000, 60, 0, 1))
    assert "1 decisions of 16 decode steps (stall fractions 0.060)" in describe(
        ctl.record(), 3.0, "measured")
