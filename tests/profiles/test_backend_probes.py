"""The probes that run the real backend and read its rows (`profiles.backend_probes`): the
lanes' fixed costs, the overlap speeds, the excesses after loads and of a layer's first run,
the non-expert rows, by hand; and the decode rows every profile gets."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from d2moe.core.events import Event
from d2moe.core.spec import load_spec
from d2moe.profiles.backend_probes import (
    MIN_ALONE,
    after_load_excess,
    decode_runs,
    lane_costs_from_rows,
    layer_first_run_excess,
    measure_non_expert,
    non_expert_per_layer,
    overlap_speeds_from_rows,
    resident_probe_spec,
)
from d2moe.profiles.timing import Bar, clear_excess


def _row(kind: str, layer: int, expert: int, start: float, end: float) -> Event:
    lane = {"load": "io", "step": "step"}.get(kind, "compute")
    return Event(lane, kind, 0, layer, expert, 0, 4, 1, 0, start, end)


def test_lane_costs_from_rows_by_hand() -> None:
    rows = [
        _row("non_expert", 0, -1, 0, 10),
        _row("load", 0, 1, 12, 40),  # the stall on it ends 5 us after the load: wake 5
        _row("run", 0, 0, 14, 20),   # head: 14 - 10 = 4
        _row("stall", 0, 1, 22, 45),
        _row("run", 0, 1, 46, 50),
        _row("non_expert", 1, -1, 53, 60),  # tail: 53 - 50 = 3
        _row("run", 1, 2, 64, 70),  # head 4
        _row("run", 1, 3, 72, 80),  # gap between runs 2 (also 20 -> 22 is no run pair)
    ]
    costs = lane_costs_from_rows(rows)
    # layer_us: head 4 + tail 3 less the run_us that the simulator charges the last run too
    # only layer 0 has a next non-expert row and it loads: layer_us from it, no hand-off
    assert costs == {"layer_us": 4 + 3 - 2, "run_us": 2.0, "wake_us": 5.0, "handoff_us": 0.0}
    assert lane_costs_from_rows([]) == {"layer_us": 0.0, "run_us": 0.0, "wake_us": 0.0,
                                        "handoff_us": 0.0}


def test_lane_costs_split_layers_with_and_without_loads_by_hand() -> None:
    rows = [
        _row("non_expert", 0, -1, 0, 10),
        _row("run", 0, 0, 13, 20),   # no loads: head 3
        _row("run", 0, 1, 22, 30),   # gap 2
        _row("non_expert", 1, -1, 34, 40),  # tail 4: dispatch 7
        _row("load", 1, 2, 50, 60),
        _row("stall", 1, 2, 49, 62),  # loads: head 9
        _row("run", 1, 2, 62, 70),
        _row("non_expert", 2, -1, 75, 80),  # tail 5: dispatch 14
        _row("run", 2, 0, 81, 90),  # the last layer: no next non-expert row, not counted
    ]
    costs = lane_costs_from_rows(rows)
    # layer_us from the layer without loads (7 less run_us 2); the one with loads pays 7 more
    assert costs == {"layer_us": 5.0, "run_us": 2.0, "wake_us": 2.0, "handoff_us": 7.0}


def _step_row(kind: str, step: int, layer: int, tokens: int, start: float, end: float) -> Event:
    lane = "compute" if kind in ("run", "stall", "non_expert") else "io"
    return Event(lane, kind, step, layer, 0, 0, 4, tokens, 0, start, end)


def test_lane_costs_read_decode_layers_of_every_timeline_by_hand() -> None:
    # the resident timeline: step 1 decodes two layers without loads; step 2 is the next
    # generation's prefill (after resume(): the gap before it is no dispatch, and its
    # layers are not decode layers)
    resident = [
        _step_row("non_expert", 1, 0, 1, 0, 10),
        _step_row("run", 1, 0, 1, 13, 20),  # head 3
        _step_row("non_expert", 1, 1, 1, 22, 30),  # tail 2: dispatch 5
        _step_row("run", 1, 1, 1, 34, 40),  # head 4; the next row opens a prefill
        _step_row("non_expert", 2, 0, 8, 5000, 5100),
        _step_row("run", 2, 0, 8, 5190, 5300),
        _step_row("non_expert", 2, 1, 8, 5310, 5400),
    ]
    # the loaded timeline, its own step numbers: step 1 layer 0 loads, layer 1 does not;
    # step 2 layer 0 follows (a decode step's first layer after the last one)
    loaded = [
        _step_row("non_expert", 1, 0, 1, 0, 10),
        _step_row("load", 1, 0, 0, 15, 30),
        _step_row("stall", 1, 0, 1, 20, 33),  # head 10, wake 3
        _step_row("run", 1, 0, 1, 33, 40),
        _step_row("non_expert", 1, 1, 1, 45, 50),  # tail 5: dispatch 15
        _step_row("run", 1, 1, 1, 54, 60),  # head 4
        _step_row("non_expert", 2, 0, 1, 63, 70),  # tail 3: dispatch 7
    ]
    costs = lane_costs_from_rows(resident, loaded)
    # without loads: dispatches 5 and 7 (mean 6); with loads: 15 -> hand-off 9; no run
    # pairs, so run_us 0 and layer_us the whole mean
    assert costs == {"layer_us": 6.0, "run_us": 0.0, "wake_us": 3.0, "handoff_us": 9.0}
    # each timeline keyed on its own: merged into one, the steps would collide
    assert lane_costs_from_rows(resident + loaded) != costs


def test_decode_rows_come_whatever_tokens_asks(tmp_path: Path) -> None:
    """The lanes' costs and the overlap speeds are read from decode steps, so a profile
    whose tables skip one token still has them (before: lane costs 0, overlap speeds 1)."""
    import torch

    from d2moe.core.sizes import QuantLayout

    rows = measure_non_expert(load_spec("tiny"), QuantLayout(), torch.device("cpu"), (3,), 1,
                              tmp_path, Bar(1, False))
    assert [n for n, _, _ in rows.non_expert] == [3]
    for timeline in (rows.resident_rows, rows.loaded_rows):
        assert any(e.kind == "non_expert" and e.tokens == 1 for e in timeline)
    assert any(e.kind == "load" for e in rows.loaded_rows)
    costs = lane_costs_from_rows(rows.resident_rows, rows.loaded_rows)
    assert costs["layer_us"] > 0 and costs["wake_us"] >= 0


def test_overlap_speeds_by_hand() -> None:
    load = Event("io", "load", 1, 0, 3, 0, 4, 0, 100, 0.0, 20.0)
    run = Event("compute", "run", 1, 0, 5, 4, 4, 1, 0, 5.0, 25.0)
    # load: 10 us nominal, 5 alone + 15 beside the run -> (10 - 5) / 15; run: 15 nominal,
    # took 20 beside the load -> waited 5
    speeds = overlap_speeds_from_rows([load, run], lambda e, idle: 10.0,
                                      lambda e, first, plan_first: 15.0)
    assert speeds == {"overlap_io_speed": round(5 / 15, 3), "overlap_compute_speed": 1.0,
                      "overlap_run_wait_us": 5.0}
    apart = run._replace(start_us=20.0, end_us=35.0)  # never beside each other
    assert overlap_speeds_from_rows([load, apart], lambda e, idle: 10.0,
                                    lambda e, first, plan_first: 15.0) == \
        {"overlap_io_speed": 1.0, "overlap_compute_speed": 1.0, "overlap_run_wait_us": 0.0}


def test_overlap_speeds_compare_with_the_same_rows_jobs_alone() -> None:
    """A slow stretch (every job alone 1.5x its nominal time) is not read as contention once
    a lane has MIN_ALONE jobs alone; with fewer the nominal times stand."""
    load = Event("io", "load", 1, 0, 3, 0, 4, 0, 100, 0.0, 20.0)
    run = Event("compute", "run", 1, 0, 5, 4, 4, 1, 0, 5.0, 40.0)
    alone = [Event("io", "load", 2 + k, 0, 3, 0, 4, 0, 100, 100.0 * k + 100, 100.0 * k + 115)
             for k in range(MIN_ALONE)]
    alone += [Event("compute", "run", 2 + k, 0, 5, 4, 4, 1, 0, 100.0 * k + 500,
                    100.0 * k + 530) for k in range(MIN_ALONE)]

    def speeds(rows):
        return overlap_speeds_from_rows(rows, lambda e, idle: 10.0,
                                        lambda e, first, plan_first: 20.0)

    # scaled x1.5: load (15 - 5) / 15 beside the run; the run took 35 against 30
    assert speeds([load, run, *alone]) == {"overlap_io_speed": 0.667,
                                           "overlap_compute_speed": 1.0,
                                           "overlap_run_wait_us": 5.0}
    # one job alone short of the count: (10 - 5) / 15, and 35 against 20
    fewer = [e for e in alone if e.step != 2]
    assert speeds([load, run, *fewer]) == {"overlap_io_speed": 0.333,
                                           "overlap_compute_speed": 1.0,
                                           "overlap_run_wait_us": 15.0}


def test_the_loaded_probe_counts_its_loads_beside_runs() -> None:
    from d2moe.profiles.backend_probes import _loads_beside_runs

    run = Event("compute", "run", 1, 0, 5, 4, 4, 1, 0, 10.0, 20.0)
    loads = [Event("io", kind, 1, 0, 3, 0, 4, 0, 100, start, end) for kind, start, end in (
        ("load", 0.0, 10.0),  # ends as the run starts: alone
        ("load", 5.0, 11.0), ("prefetch", 19.0, 30.0), ("load", 12.0, 18.0),  # beside
        ("load", 20.0, 25.0))]  # starts as the run ends: alone
    assert _loads_beside_runs([*loads, run]) == 3
    assert _loads_beside_runs(loads) == 0


def test_overlap_speed_keeps_the_lanes_total_time_through_a_stall() -> None:
    """Nine loads of nominal 40 us took 45 beside a long run, a tenth stalled to 190: the
    speed is the ratio of sums, 400 / 595, so ten loads at 40 / speed take the real 595 us
    in all (least squares weighted the stall 18-fold: 0.438)."""
    run = Event("compute", "run", 1, 0, 5, 4, 4, 1, 0, 0.0, 1000.0)
    loads, t = [], 0.0
    for took in [45.0] * 9 + [190.0]:
        loads.append(Event("io", "load", 1, 0, 3, 0, 4, 0, 100, t, t + took))
        t += took
    got = overlap_speeds_from_rows([*loads, run], lambda e, idle: 40.0,
                                   lambda e, first, plan_first: 1000.0)
    assert got["overlap_io_speed"] == round(400 / 595, 3)
    assert 10 * 40.0 / got["overlap_io_speed"] == pytest.approx(595.0, rel=1e-3)


@given(st.lists(st.tuples(st.floats(1, 50), st.floats(1, 50), st.integers(-1, 3)),
                min_size=1, max_size=5),
       st.floats(0.1, 1.0), st.floats(0.0, 30.0))
def test_overlap_speeds_recover_the_fluid_model(jobs, io_speed, wait_us) -> None:
    """Rows made by the simulator's fluid model at a known I/O speed and run wait give them
    back."""
    from d2moe.sim.contention import fluid_schedule

    loads_us = [a for a, _, _ in jobs]
    runs_us = [b for _, b, _ in jobs]
    rw = [d if d < k else -1 for k, (_, _, d) in enumerate(jobs)]  # run k waits on a load
    ls, le, rs, re = fluid_schedule(loads_us, runs_us, rw, [-1] * len(jobs), 0.0, 0.0,
                                    io_speed, 1.0, run_wait_us=wait_us)
    rows = [Event("io", "load", 1, 0, k, 0, 4, 0, k, ls[k], le[k]) for k in range(len(jobs))]
    rows += [Event("compute", "run", 1, 0, 10 + k, 4, 4, 1, 0, rs[k], re[k])
             for k in range(len(jobs))]
    got = overlap_speeds_from_rows(rows, lambda e, idle: loads_us[e.bytes],
                                   lambda e, first, plan_first: runs_us[e.expert - 10])
    most = max(min(le[i], re[j]) - max(ls[i], rs[j])
               for i in range(len(jobs)) for j in range(len(jobs)))
    assume(most <= 0 or most > 1e-3)  # a sliver of overlap: rounding decides its speed
    if most > 0:
        assert got["overlap_io_speed"] == pytest.approx(io_speed, abs=2e-3)
        assert got["overlap_compute_speed"] == 1.0
        assert got["overlap_run_wait_us"] == pytest.approx(wait_us, abs=0.01)
    else:
        assert got == {"overlap_io_speed": 1.0, "overlap_compute_speed": 1.0,
                       "overlap_run_wait_us": 0.0}


def test_after_load_excess_by_hand() -> None:
    resident = [_step_row("non_expert", s, layer, 1, 0, us)
                for s, per in ((1, (10, 11, 9)), (2, (10, 9, 11))) for layer, us in
                enumerate((30, *per))]
    # loads in layer 0 of step 1 and layer 1 of step 2: rows (1, 1) and (2, 2) follow them
    loaded = [_step_row("load", 1, 0, 0, 0, 5), _step_row("load", 2, 1, 0, 0, 5)]
    loaded += [_step_row("non_expert", s, layer, 1, 0, us)
               for s, per in ((1, (19, 10, 9)), (2, (11, 11, 10))) for layer, us in
               enumerate((40, *per))]
    # after: 19, 11 against the resident layers >= 1 (mean 10): +9, +1, mean 5
    assert after_load_excess(loaded, resident) == 0.0  # two samples: 5 is within 2 se (8)
    assert after_load_excess(loaded * 6, resident * 6) == pytest.approx(5.0)
    assert after_load_excess([r for r in loaded if r.kind == "load"] + resident,
                             resident) == 0.0  # the same rows after loads: nothing extra
    loaded.append(_step_row("non_expert", 3, 1, 4, 0, 99))  # a 4-token step: not a decode
    assert after_load_excess(loaded * 6, resident * 6) == pytest.approx(5.0)
    # a load in step 1's last layer: step 2's layer-0 row (40, head included) follows it and
    # is measured against the resident layer-0 rows (30): +10; mean of +9, +1, +10
    loaded.append(_step_row("load", 1, 3, 0, 0, 5))
    assert after_load_excess(loaded * 6, resident * 6) == pytest.approx(20 / 3, abs=0.01)


def test_layer_first_run_excess_by_hand() -> None:
    rows = [
        _step_row("non_expert", 0, 0, 3, 0, 10),  # a prefill step (3 tokens): not counted
        _step_row("run", 0, 0, 2, 10, 40), _step_row("run", 0, 0, 1, 40, 41),
        _step_row("non_expert", 1, 0, 1, 50, 60),  # decode: runs of 12 then 8 us
        _step_row("run", 1, 0, 1, 61, 73), _step_row("run", 1, 0, 1, 74, 82),
        _step_row("non_expert", 1, 1, 1, 83, 90),  # runs of 14 then 10, 6 us
        _step_row("run", 1, 1, 1, 91, 105), _step_row("run", 1, 1, 1, 106, 116),
        _step_row("run", 1, 1, 1, 117, 123),
        _step_row("non_expert", 2, 0, 1, 130, 140),  # a stall: not counted
        _step_row("stall", 2, 0, 0, 141, 150), _step_row("run", 2, 0, 1, 150, 190),
        _step_row("run", 2, 0, 1, 190, 191),
        _step_row("non_expert", 2, 1, 1, 200, 210),  # one run: not counted
        _step_row("run", 2, 1, 1, 211, 300),
    ]
    # firsts 12 and 14 (mean 13), laters 8, 10, 6 (mean 8): 5 us
    assert layer_first_run_excess(rows) == 5.0
    assert layer_first_run_excess(rows[:3]) == 0.0  # no decode layer with two runs
    faster_first = [rows[3], _step_row("run", 1, 0, 1, 61, 69), _step_row("run", 1, 0, 1, 70, 82)]
    assert layer_first_run_excess(faster_first) == 0.0  # never below 0


def test_preempted_decode_runs_are_left_out_of_the_first_run_excess() -> None:
    def layer(step: int, first_us: float, later_us: float) -> list:
        t = step * 1000.0
        return [_step_row("non_expert", step, 0, 1, t, t + 10),
                _step_row("run", step, 0, 1, t + 10, t + 10 + first_us),
                _step_row("run", step, 0, 1, t + 20 + first_us, t + 20 + first_us + later_us)]

    rows = [r for s, (f, lt) in enumerate([(60, 48), (62, 50), (58, 49), (61, 47)] * 4)
            for r in layer(s, f, lt)]
    assert layer_first_run_excess(rows) == pytest.approx(11.75)  # 60.25 against 48.5
    # a first run preempted (338 us, over 3x the later runs' median) and a later one (300):
    # left out; kept, the 338 would have hidden the excess in its noise
    hit = rows + layer(16, 338, 49) + layer(17, 60, 300)
    firsts, laters = decode_runs(hit)
    assert max(firsts) == 62 and max(laters) == 50 and len(firsts) == 17 and len(laters) == 17
    assert layer_first_run_excess(hit) == pytest.approx(11.75, abs=0.1)
    assert clear_excess([60, 62, 58, 61] * 4 + [338, 60],
                        [48, 50, 49, 47] * 4 + [49, 300]) == 0.0  # what keeping them gave
    # first runs that cost several later ones (cheap later runs) are each kind's normal
    dear = [r for s, (f, lt) in enumerate([(200, 48), (210, 50), (190, 49), (205, 47)] * 4)
            for r in layer(s, f, lt)]
    assert layer_first_run_excess(dear) == pytest.approx(201.25 - 48.5)


def test_non_expert_per_layer_keeps_the_step_head_apart() -> None:
    rows = [_step_row("non_expert", s, layer, 1, 0, us)
            for s in (1, 2) for layer, us in ((0, 30), (1, 10), (2, 12), (3, 8))]
    # layers >= 1: 10; layer 0 takes 20 more (the step's head)
    assert non_expert_per_layer(rows, [1]) == [(1, 10.0, 20.0)]
    # a one-layer model: its one row per step, head included (was a KeyError)
    one = [r for r in rows if r.layer == 0]
    assert non_expert_per_layer(one, [1]) == [(1, 30.0, 0.0)]


def test_resident_probe_spec_is_whole_when_small() -> None:
    from d2moe.core.sizes import QuantLayout

    tiny = load_spec("tiny")
    assert resident_probe_spec(tiny, QuantLayout()) == tiny
    cut = resident_probe_spec(load_spec("mixtral-8x7b"), QuantLayout(b1=2, bK=4))
    assert (cut.layers, cut.experts, cut.top_k) == (2, 4, 2)
    assert resident_probe_spec(tiny, QuantLayout(), cap_bytes=1).layers == 2

