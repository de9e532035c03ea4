"""Sim-versus-real comparison from Event rows: errors, summary and ranking by hand."""

from __future__ import annotations

import math

import pytest

from d2moe.analysis.fidelity import (
    drift_hint,
    fidelity_row,
    from_step,
    rounds_report,
    summarize,
    summarize_rounds,
    summary_line,
)
from d2moe.core.events import Event, Timeline


def _timeline(step_us: float, steps: int = 3) -> Timeline:
    """A prefill then decode steps of one token, each `step_us` long, one run each."""
    rows = []
    for s in range(steps):
        t = s * step_us
        rows.append(Event("step", "prefill" if s == 0 else "decode", s, -1, -1, 0, 0, 1, 0, t,
                          t + step_us))
        rows.append(Event("compute", "run", s, 0, 0, 4, 4, 1, 0, t, t + step_us / 2))
    return Timeline(rows, {})


def test_error_is_relative_to_the_real_run() -> None:
    row = fidelity_row("fifo", "50%", _timeline(1000.0), _timeline(800.0))
    # decode: 2 tokens in 2 ms real (1000 tok/s), 1.6 ms simulated (1250 tok/s): +25%
    assert row.speed(row.real) == pytest.approx(1000.0)
    assert row.error_pct == pytest.approx(25.0)
    cells = row.as_table_row()
    assert cells["real cpu busy ms"] == pytest.approx(1.5) and cells["sim hit %"] == 100.0


def test_summary_and_ranking() -> None:
    rows = [fidelity_row("fifo", "25%", _timeline(1000.0), _timeline(900.0)),
            fidelity_row("hebf", "25%", _timeline(500.0), _timeline(550.0)),
            fidelity_row("fifo", "100%", _timeline(500.0), _timeline(500.0)),
            fidelity_row("hebf", "100%", _timeline(400.0), _timeline(600.0))]
    s = summarize(rows)
    errors = [100 / 0.9 - 100, 100 / 1.1 - 100, 0.0, 100 * 400 / 600 - 100]
    assert s["mean_abs_error_pct"] == pytest.approx(sum(abs(e) for e in errors) / 4)
    assert s["worst_abs_error_pct"] == pytest.approx(abs(errors[3]))
    assert s["same_ranking"] == {"25%": True, "100%": False}
    assert s["ranking"]["100%"] == {"real": ["hebf", "fifo"], "sim": ["fifo", "hebf"]}
    assert "ranking differs at 100%" in summary_line(s)
    assert math.isnan(summarize([])["mean_abs_error_pct"])
    # a tie in the simulation (within 1%) agrees with either real order
    tie = [fidelity_row("fifo", "b", _timeline(500.0), _timeline(600.0)),
           fidelity_row("hebf", "b", _timeline(400.0), _timeline(603.0))]
    assert summarize(tie)["same_ranking"] == {"b": True}


def test_rounds_pool_the_signed_errors_per_row() -> None:
    # fifo: +25% then -20% (the machine drifted both ways): bias +2.5%; hebf: +25% twice
    one = [fidelity_row("fifo", "50%", _timeline(1000.0), _timeline(800.0)),
           fidelity_row("hebf", "50%", _timeline(500.0), _timeline(400.0))]
    two = [fidelity_row("fifo", "50%", _timeline(800.0), _timeline(1000.0)),
           fidelity_row("hebf", "50%", _timeline(400.0), _timeline(320.0))]
    s = summarize_rounds([one, two])
    fifo, hebf = s["bias"]
    assert (fifo["policy"], fifo["rounds"]) == ("fifo", 2)
    assert fifo["mean_error_pct"] == pytest.approx(2.5)
    assert fifo["two_se_pct"] == pytest.approx(2 * 45.0 / math.sqrt(2) / math.sqrt(2))
    assert hebf["mean_error_pct"] == pytest.approx(25.0) and hebf["two_se_pct"] == 0.0
    assert s["mean_abs_bias_pct"] == pytest.approx(13.75)
    assert s["worst_abs_bias_pct"] == pytest.approx(25.0)
    assert s["round_mean_abs_error_pct"] == pytest.approx([25.0, 22.5])
    # round two ranks hebf first for real and in simulation; round one as well
    assert s["same_ranking_rounds"] == {"50%": 2}
    assert s["cost_ratios"]["expert runs"] == pytest.approx((1.25 ** 3 * 0.8) ** 0.25)
    text = rounds_report(s)
    assert "2 rounds pooled" in text and "worst |25.0|%" in text and "50% 2/2" in text


def test_drift_hint_only_when_every_cost_moved_one_way() -> None:
    slow = drift_hint({"loads": 1.5, "expert runs": 1.36, "non-expert": 1.45})
    assert slow is not None and "1.36-1.50x" in slow and "slower" in slow
    fast = drift_hint({"loads": 0.77, "expert runs": 0.75, "non-expert": 0.78})
    assert fast is not None and "faster" in fast
    assert drift_hint({"loads": 1.5, "expert runs": 1.0, "non-expert": 1.45}) is None  # a cost
    assert drift_hint({"loads": 1.1, "expert runs": 1.12}) is None  # within 15%
    assert drift_hint({"loads": 2.0}) is None  # one cost: cannot tell
    s = summarize([fidelity_row("fifo", "b", _timeline(1500.0), _timeline(1000.0))])
    assert "slower now" not in summary_line(s)  # one cost (expert runs) only


def test_from_step_keeps_the_asked_steps_starting_at_zero() -> None:
    tl = from_step(_timeline(800.0, steps=4), 1, 2)
    assert sorted({e.step for e in tl.events}) == [1, 2]
    assert min(e.start_us for e in tl.events) == 0.0
    assert max(e.end_us for e in tl.events) == 1600.0


def test_cost_ratios_name_the_cost_that_moved() -> None:
    def tl(load_us: float, run_us: float) -> Timeline:
        rows = [Event("step", "prefill", 0, -1, -1, 0, 0, 1, 0, 0.0, 5000.0),
                Event("io", "load", 0, 0, 1, 0, 4, 0, 100, 0.0, 4000.0),  # prefill: not counted
                Event("step", "decode", 1, -1, -1, 0, 0, 1, 0, 5000.0, 9000.0),
                Event("io", "load", 1, 0, 2, 0, 4, 0, 100, 5000.0, 5000.0 + load_us),
                Event("compute", "run", 1, 0, 2, 4, 4, 1, 0, 7000.0, 7000.0 + run_us),
                Event("compute", "non_expert", 1, 0, -1, 0, 0, 1, 0, 8000.0, 8100.0)]
        return Timeline(rows, {})

    row = fidelity_row("fifo", "50%", tl(1500.0, 400.0), tl(1000.0, 500.0))
    assert row.cost_ratios == pytest.approx({"loads": 1.5, "expert runs": 0.8,
                                             "non-expert": 1.0, "loads alone": 1.5})
    s = summarize([row, fidelity_row("hebf", "50%", tl(1000.0, 500.0), tl(1000.0, 500.0))])
    assert s["cost_ratios"]["loads"] == pytest.approx(1.5 ** 0.5)
    assert "loads 1.22x (alone 1.22x), expert runs 0.89x, non-expert 1.00x" in summary_line(s)


def test_loads_split_by_what_ran_beside_them_in_the_real_run() -> None:
    """Decode loads paired in plan order: the first ran alone (a run overlaps 5% of it), the
    second beside a run; real / simulated time of each group."""
    def tl(first: tuple[float, float], second: tuple[float, float], expert: int = 2) -> Timeline:
        rows = [Event("step", "decode", 1, -1, -1, 0, 0, 1, 0, 0.0, 9000.0),
                Event("io", "load", 1, 0, 1, 0, 4, 0, 100, *first),
                Event("io", "load", 1, 0, expert, 0, 4, 0, 100, *second),
                Event("compute", "run", 1, 0, 1, 4, 4, 1, 0, 950.0, 2500.0)]
        return Timeline(rows, {})

    real = tl((0.0, 1000.0), (1000.0, 3000.0))  # run beside: 50 us of the first, all the next
    ratios = fidelity_row("fifo", "50%", real, tl((0.0, 800.0), (800.0, 2400.0))).cost_ratios
    assert ratios["loads alone"] == pytest.approx(1000.0 / 800.0)
    assert ratios["loads beside runs"] == pytest.approx(2000.0 / 1600.0)
    other = fidelity_row("fifo", "50%", real, tl((0.0, 800.0), (800.0, 2400.0), expert=3))
    assert "loads alone" not in other.cost_ratios  # another plan: no pairs
    s = summary_line(summarize([fidelity_row("fifo", "50%", real,
                                             tl((0.0, 800.0), (800.0, 2400.0)))]))
    assert "loads 1.25x (alone 1.25x, beside runs 1.25x)" in s
