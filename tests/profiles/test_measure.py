"""`d2moe profile`: the fits by hand (lines, the lane's load work, the cold curve), the probes
of loads, and a tiny end-to-end measurement that writes a profile which loads and drives the
simulator (no timing asserted). The probes that read the backend's rows:
test_backend_probes.py."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from d2moe.cli import main
from d2moe.core.errors import UserError
from d2moe.core.spec import load_spec
from d2moe.profiles.files import load_profile, profile_from_dict, save_profile
from d2moe.profiles.load_probes import (
    COLD_IDLE_MS,
    COLD_MAX_ROUNDS,
    measure_check_GBps,
    measure_cold_loads,
    measure_evict_us,
    measure_loads,
)
from d2moe.profiles.measure import (
    ProfileConfig,
    device_name,
    lane_load_costs,
    measure_profile,
    median_profile,
    sizes_up_to,
)
from d2moe.profiles.schema import ExecutorCosts, ExpertTable, NonExpertTable
from d2moe.profiles.timing import (
    Bar,
    clear_excess,
    fit_cold_curve,
    fit_latency_bandwidth,
    interleaved_means,
)
from tests.profiles.test_profiles import hand, headed, unified

TINY = dict(tokens="1,3", bits="2,4", disk_sizes="4KiB,8KiB", repeats=1, probe_experts=2,
            progress=False)


def test_fit_recovers_a_line() -> None:
    # 50 us + bytes at 2 GB/s (2000 B/us)
    pts = [(n, 50.0 + n / 2000.0) for n in (4096, 65536, 1 << 20)]
    latency, gbps = fit_latency_bandwidth(pts)
    assert latency == pytest.approx(50.0)
    assert gbps == pytest.approx(2.0)


def test_lane_load_costs_subtract_the_reads_the_reader_makes() -> None:
    """Loads timed as the reader's reads (small levels joined) plus 20 us + bytes at 2 GB/s
    of lane work: the fit finds exactly that work. Subtracting one request per level, as
    the profile did before 2026-11-24, would take the 50 us latency of the joined levels
    off too and find less."""
    from d2moe.profiles.cost import store_reads_us
    from d2moe.quant.store import PIPELINE_MIN_BYTES

    d = unified()
    d["disk"] = {"read_GBps": 1.0, "latency_us": 50.0}
    profile = profile_from_dict(d, path="test")

    def request(n: int) -> float:
        return 50.0 + n / 1000

    raises = [(30000,), (30000, 14000), (30000, 14000, 14000), (14000,), (14000, 14000),
              (2 << 20, 1 << 20, 14000)]  # the last: two large levels read alone
    loads = [(levels, store_reads_us(levels, request, 7.0, PIPELINE_MIN_BYTES)
              + 20.0 + sum(levels) / 2000) for levels in raises]
    load_us, gbps = lane_load_costs(loads, profile, 7.0)
    assert load_us == pytest.approx(20.0)
    assert gbps == pytest.approx(2.0)


def test_lane_load_costs_round_trip_through_the_simulator_with_a_link() -> None:
    """Loads priced by the simulator (`ProfileCosts.raise_us`: each read from disk over the
    link, its latency per read, then the lane's work) fit back to that lane work exactly. Reads
    priced on the disk alone would leave the link's 10 us per read in the lane's work, which
    the simulator would then charge twice."""
    import dataclasses

    from d2moe.core.sizes import QuantLayout
    from d2moe.policies.view import Sizes
    from d2moe.sim.costs import ProfileCosts

    bare = profile_from_dict(hand(), path="test")  # disk 1 GB/s + 100 us, link 0.5 GB/s + 10 us
    work = ExecutorCosts(load_us=20.0, load_GBps=2.0, check_GBps=7.0)
    profile = dataclasses.replace(bare, executor=work)
    spec, layout = load_spec("tiny"), QuantLayout()
    costs = ProfileCosts(profile, spec, Sizes.of(spec, layout), layout)
    raises = [(0, 2), (0, 4), (2, 3), (2, 8), (4, 6), (0, 8)]
    loads = [(costs.levels(a, b), costs.raise_us(a, b)) for a, b in raises]
    assert lane_load_costs(loads, bare, 7.0) == pytest.approx((20.0, 2.0))
    # the link's latency is in the simulator's price of every read
    assert costs.raise_us(0, 2) == pytest.approx(
        bare.load_us(costs.reads(0, 2)[0], "disk") + costs.reads(0, 2)[0] / 7000
        + 20.0 + costs.levels(0, 2)[0] / 2000)


def test_interleaved_means_average_reported_times_over_enough_rounds() -> None:
    calls: dict[str, list[int]] = {"a": [], "b": []}

    def reporter(name: str, us: float):
        def fn(i: int) -> float:
            calls[name].append(i)
            return us if i >= 0 else 1e9  # the warm-up round is not counted
        return fn

    means = interleaved_means([reporter("a", 10.0), reporter("b", 30.0)], 3, lambda: None,
                              min_s=0.0)
    assert means == [10.0, 30.0] and calls["a"] == [-1, 0, 1, 2]
    # short timings repeat until each has spent min_s: 50 us x 200 rounds = 0.01 s
    means = interleaved_means([reporter("a", 50.0)], 1, lambda: None, min_s=0.01)
    timed = len(calls["a"]) - 4 - 1  # less the first call's rounds and this warm-up
    assert means == [50.0] and 200 <= timed <= 201  # float sums may need one more


def test_fit_flat_or_single_point_has_no_bandwidth_term() -> None:
    assert fit_latency_bandwidth([(4096, 10.0), (8192, 9.0)]) == (pytest.approx(9.5), math.inf)
    assert fit_latency_bandwidth([(4096, 7.0)]) == (7.0, math.inf)
    latency, gbps = fit_latency_bandwidth([(1000, 1.0), (2000, 3.0)])  # intercept < 0
    assert latency == 0.0 and 0 < gbps < math.inf


def test_clear_excess_charges_only_what_stands_above_the_noise() -> None:
    assert clear_excess([10.0, 12.0, 11.0, 9.0]) == pytest.approx(10.5)  # se 0.65
    assert clear_excess([30.0, -20.0, 25.0, -15.0]) == 0.0  # mean 5, se 13: noise
    assert clear_excess([-5.0, -6.0, -4.0]) == 0.0  # a saving is not a surcharge
    assert clear_excess([5.0]) == 0.0  # one difference: no noise estimate, no charge
    assert clear_excess([]) == 0.0
    # two samples: 13 - 8 = 5 against se sqrt(2/2 + 4/3) = 1.53
    assert clear_excess([12.0, 14.0], [8.0, 10.0, 6.0]) == pytest.approx(5.0)
    assert clear_excess([12.0, 14.0], [8.0, 10.0, 6.0], z=4.0) == 0.0


PAUSES_US = (250.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0)


def test_fit_cold_curve_takes_each_pause_mean_by_hand() -> None:
    # 20 us after 250 us, rising to 220 us at 20 ms; the thread's idle runs a little past
    # each pause (the hand-over): the curve is at the mean idle the thread saw
    def cost(idle: float) -> float:
        return 20.0 * min(1.0, idle / 250.0) + 200.0 * min(1.0, idle / 20000.0)

    pts = [(p, p + h, cost(p) + d) for p in PAUSES_US
           for h, d in ((80.0, -2.0), (100.0, 0.0), (120.0, 2.0), (100.0, 4.0))]
    curve = fit_cold_curve(pts)
    assert [idle for idle, _ in curve] == pytest.approx([p + 100.0 for p in PAUSES_US])
    assert [us for _, us in curve] == pytest.approx([cost(p) + 1.0 for p in PAUSES_US])
    # grouped by the pause made, not by the idle seen: a long hand-over stays in its group;
    # the curve follows the idle seen even where the pauses' order flips (then 40 us at 550
    # and 30 at 600 pool to 35)
    late = [(250.0, 600.0, 30.0 + d) for d in (-1.0, 1.0)] + \
        [(500.0, 550.0, 40.0 + d) for d in (-1.0, 1.0)]
    assert fit_cold_curve(late) == ((550.0, 35.0), (600.0, 35.0))
    # a pause without points is left out; warm loads as fast as cold ones: no curve at all
    assert len(fit_cold_curve(pts[4:])) == len(PAUSES_US) - 1
    assert fit_cold_curve([(1000.0, 1000.0, e) for e in (-5.0, -6.0, -4.0)]) == ()
    assert fit_cold_curve([]) == ()


def test_fit_cold_curve_rises_with_the_pause() -> None:
    # a noisy dip (20 us at 1 ms after 32 at 0.25 ms) is pooled with its neighbour: a load
    # after a longer pause is no cheaper; the pool is weighted by the points each mean has
    pts = [(250.0, 250.0, 32.0 + d) for d in (-1.0, 1.0)] + \
        [(1000.0, 1000.0, 20.0 + d) for d in (-1.0, 1.0, 0.0, 0.0)] + \
        [(5000.0, 5000.0, 90.0 + d) for d in (-1.0, 1.0)]
    assert fit_cold_curve(pts) == ((250.0, 24.0), (1000.0, 24.0), (5000.0, 90.0))


@given(st.lists(st.lists(st.floats(-50.0, 500.0), min_size=2, max_size=6), min_size=1,
                max_size=8))
def test_fit_cold_curve_rises_and_keeps_a_rising_set(groups: list[list[float]]) -> None:
    # one group of bursts per pause (250 us apart, the thread's idle 30 us past it)
    pts = [(250.0 * (k + 1), 250.0 * (k + 1) + 30.0, e)
           for k, g in enumerate(groups) for e in g]
    curve = fit_cold_curve(pts)
    pairs = list(zip(curve, curve[1:], strict=False))
    assert all(a[0] < b[0] and 0 <= a[1] <= b[1] for a, b in pairs)
    means = [max(clear_excess(g), 0.0) for g in groups]
    rising = all(a <= b for a, b in zip(means, means[1:], strict=False))
    if rising and any(round(m, 2) > 0 for m in means):
        # already rising: each pause keeps its own gated mean
        assert [us for _, us in curve] == pytest.approx([round(m, 2) for m in means],
                                                        abs=0.006)


def test_fit_cold_curve_charges_no_cost_it_cannot_tell_from_noise() -> None:
    # bursts of 40 ms loads: +-2 ms of noise and 30 ms stalls (the Mixtral-shaped probe,
    # 2026-11-24): each pause's mean stays under two standard errors, so nothing is charged
    noise = [-1500.0, 1000.0, -500.0, 2000.0, -1200.0, 800.0]
    pts = [(p, p, e) for p in (250.0, 1000.0, 5000.0, 20000.0) for e in noise]
    pts += [(250.0, 250.0, 30000.0), (1000.0, 1000.0, 30000.0), (20000.0, 20000.0, 30000.0)]
    assert fit_cold_curve(pts) == ()
    # a steady 150 us after 20 ms, +-10 us: clear of its noise, kept; 1 ms: noise, 0
    clear = [(1000.0, 1000.0, d) for d in (-10.0, 0.0, 10.0, 5.0)] + \
        [(20000.0, 20000.0, 150.0 + d) for d in (-10.0, 0.0, 10.0, 5.0)]
    assert fit_cold_curve(clear) == ((1000.0, 0.0), (20000.0, 151.25))


def test_cold_loads_time_every_idle_after_at_least_that_idle(tmp_path: Path) -> None:
    import dataclasses

    import torch

    from d2moe.core.sizes import QuantLayout
    from d2moe.profiles.probe_store import write_random_store
    from d2moe.quant.store import StoreReader

    layout = QuantLayout()
    probe = dataclasses.replace(load_spec("tiny"), layers=1, experts=2, top_k=1)
    with StoreReader(write_random_store(tmp_path / "s", probe, layout), direct=True) as reader:
        points = measure_cold_loads(reader, probe, layout, torch.device("cpu"), 4, 1,
                                    lambda: None, Bar(1, False), min_s=0.0)
        # rounds go on past the one asked for while the probe has run under min_s
        more = measure_cold_loads(reader, probe, layout, torch.device("cpu"), 4, 1,
                                  lambda: None, Bar(1, False), min_s=0.5)
    idle_ms = [ms for ms in COLD_IDLE_MS if ms]
    assert [pause for pause, _, _ in points] == [ms * 1e3 for ms in idle_ms]
    for pause_us, idle_us, extra_us in points:
        # the thread's own idle: the sleep and the hand-over, under a second more on any box
        assert pause_us <= idle_us < pause_us + 1e6 and math.isfinite(extra_us)
    # a round sleeps sum(COLD_IDLE_MS) = 41.75 ms at least: 0.5 s takes more than one, and at
    # most COLD_MAX_ROUNDS; every round gives one point per idle time
    assert len(more) % len(idle_ms) == 0
    assert len(idle_ms) < len(more) <= COLD_MAX_ROUNDS * len(idle_ms)


def test_executor_costs_round_trip_and_validation(tmp_path: Path) -> None:
    d = hand()
    d["executor"] = {"layer_us": 300.0, "load_us": 100.0, "load_GBps": 0.5, "run_us": 10.0,
                     "wake_us": 80.0}
    p = profile_from_dict(d, path="hand.yaml")
    assert p.executor == ExecutorCosts(layer_us=300.0, load_us=100.0, load_GBps=0.5,
                                       run_us=10.0, wake_us=80.0)
    assert p.executor.check_GBps == math.inf  # a profile without it: checks in load_GBps
    assert p.executor.load_extra_us(1000) == pytest.approx(100.0 + 1000 / 500.0)
    assert p.executor.load_extra_us(0) == 0.0
    save_profile(tmp_path / "p.yaml", p)
    assert load_profile(tmp_path / "p.yaml") == p
    # per-request latency: 3 requests pay the disk and link latencies three times
    assert p.load_us(1_000_000, requests=3) == pytest.approx(3 * (100 + 10) + 1_000_000 / 500)
    d["executor"] = {"layer_us": 1.0, "cold_curve_us": [[250, 12.5], [5000.0, 250.0]],
                     "first_run_us": 80.0, "layer_first_run_us": 40.0}
    cold = profile_from_dict(d, path="hand.yaml")
    assert cold.executor.cold_us(2500.0) == pytest.approx(125.0)
    assert cold.executor.layer_first_run_us == 40.0
    assert p.executor.layer_first_run_us == 0.0  # a profile without it: none
    assert p.executor.handoff_us == 0.0
    d["executor"] = {"layer_us": 1.0, "handoff_us": 30.0}
    handoff = profile_from_dict(d, path="hand.yaml")
    assert handoff.executor.handoff_us == 30.0
    save_profile(tmp_path / "h.yaml", handoff)
    assert load_profile(tmp_path / "h.yaml") == handoff
    save_profile(tmp_path / "c.yaml", cold)
    assert load_profile(tmp_path / "c.yaml") == cold
    d["executor"] = {"layer_us": 1.0, "cold_read_us": 250.0, "cold_ramp_us": 5000.0,
                     "first_run_us": 80.0, "layer_first_run_us": 40.0}
    assert profile_from_dict(d, path="old.yaml") == cold  # the key's name before 2026-11-23
    # the floor and ramp of profiles before the curve: the same function, through its corners
    d["executor"] = {"cold_floor_us": 20.0, "cold_load_us": 300.0, "cold_ramp_us": 6000.0}
    old = profile_from_dict(d, path="old.yaml").executor
    assert old.cold_curve_us == ((250.0, 32.5), (6000.0, 320.0))
    assert [old.cold_us(t) for t in (125.0, 3000.0, 60000.0)] == \
        pytest.approx([16.25, 20.0 + 150.0, 320.0])
    d["executor"] = {"cold_load_us": 50.0}  # no ramp: the whole amount after any idle time
    assert profile_from_dict(d, path="old.yaml").executor.cold_us(1.0) == 50.0
    d["executor"] = {"cold_floor_us": 0.0, "cold_load_us": 0.0}
    assert not profile_from_dict(d, path="old.yaml").executor.any_cold
    d["executor"] = {"cold_curve_us": []}  # none measured clear of the noise
    assert profile_from_dict(d, path="hand.yaml").executor == ExecutorCosts()
    for bad, where in (([[500, 1.0], [500, 2.0]], "cold_curve_us[1]"),
                       ([[500, -1.0]], "cold_curve_us[0]"), ([[0, 1.0]], "cold_curve_us[0]"),
                       ("fast", "cold_curve_us")):
        d["executor"] = {"cold_curve_us": bad}
        with pytest.raises(UserError, match=re.escape(f"executor.{where}")):
            profile_from_dict(d, path="hand.yaml")
    d["executor"] = {"cold_curve_us": [[500, 1.0]], "cold_load_us": 5.0}
    with pytest.raises(UserError, match="older cold keys"):
        profile_from_dict(d, path="hand.yaml")
    d["executor"] = {"layer_us": 1.0, "overlap_run_wait_us": 140.5}
    waited = profile_from_dict(d, path="hand.yaml")
    assert waited.executor.overlap_run_wait_us == 140.5 and p.executor.overlap_run_wait_us == 0.0
    save_profile(tmp_path / "w.yaml", waited)
    assert load_profile(tmp_path / "w.yaml") == waited
    d["executor"] = {"overlap_run_wait_us": -1.0}
    with pytest.raises(UserError, match="executor.overlap_run_wait_us"):
        profile_from_dict(d, path="hand.yaml")
    d["executor"] = {"cold_load_us": -1.0}
    with pytest.raises(UserError, match="executor.cold_load_us"):
        profile_from_dict(d, path="hand.yaml")
    d["executor"] = {"load_GBps": 0}
    with pytest.raises(UserError, match="executor.load_GBps"):
        profile_from_dict(d, path="hand.yaml")
    d["executor"] = {"check_GBps": 2.5}
    checked = profile_from_dict(d, path="hand.yaml")
    assert checked.executor.check_GBps == 2.5
    save_profile(tmp_path / "k.yaml", checked)
    assert load_profile(tmp_path / "k.yaml") == checked
    d["executor"] = {"check_GBps": 0}
    with pytest.raises(UserError, match="executor.check_GBps"):
        profile_from_dict(d, path="hand.yaml")
    d["executor"] = {"launch_us": 1.0}
    with pytest.raises(UserError, match="launch_us"):
        profile_from_dict(d, path="hand.yaml")


def test_profile_of_the_tiny_spec_loads_and_drives_the_simulator(tmp_path: Path) -> None:
    from d2moe.policies import make_policy
    from d2moe.sim import SimSetup, simulate
    from d2moe.sim.workload import steps_from_trace
    from d2moe.traces import synth_trace
    from d2moe.traces.synth import SynthConfig

    cfg = ProfileConfig(out=str(tmp_path / "cpu.yaml"), dir=str(tmp_path / "scratch"), **TINY)
    p = measure_profile(cfg, command="pytest")
    save_profile(cfg.out, p)
    q = load_profile(cfg.out)
    assert q == p and q.name == "cpu" and q.source.kind == "measured"
    assert q.source.command == "pytest" and q.source.device and q.source.date
    assert q.unified_memory and q.link is None and q.disk.read_GBps > 0
    assert isinstance(q.expert, ExpertTable) and isinstance(q.non_expert, NonExpertTable)
    assert {(r.bits, r.tokens) for r in q.expert.rows} == {(2, 1), (2, 3), (4, 1), (4, 3)}
    assert all(r.shape == "192x192" and r.latency_us > 0 for r in q.expert.rows)
    assert {r.tokens for r in q.non_expert.rows} == {1, 3}
    assert q.executor is not None and q.executor.layer_us >= 0
    curve = q.executor.cold_curve_us  # idle rising, costs rising, at the probe's pauses
    assert all(a[0] < b[0] and 0 <= a[1] <= b[1] for a, b in zip(curve, curve[1:], strict=False))
    assert all(ms * 1e3 <= idle for (idle, _), ms in zip(curve, COLD_IDLE_MS, strict=False))
    assert q.executor.first_run_us >= 0 and q.executor.layer_first_run_us >= 0
    assert q.executor.handoff_us >= 0 and q.executor.non_expert_after_load_us >= 0
    assert 0 < q.executor.overlap_compute_speed <= 1 and 0 < q.executor.overlap_io_speed <= 1
    assert 0.05 < q.executor.check_GBps < 1000  # zlib.crc32 on any machine
    plans = dict(q.executor.plan_us)  # each policy's planning, timed: the probe's (hebf) too
    assert {"fifo", "hebf", "hebf-ghost", "d2moe"} <= set(plans) and min(plans.values()) > 0
    assert "hold-in-memory" not in plans and "sub-similar" not in plans  # other layout, stats
    assert [n for n, _ in q.executor.plan_us] == sorted(plans)
    # TINY's 4 and 8 KiB, then x4 up to the tiny expert's 2-bit base level (34560 bytes)
    assert [n for n, _ in q.disk.reads] == [4096, 8192, 32768, 131072]
    assert all(us > 0 for _, us in q.disk.reads)
    spec = load_spec("tiny")
    trace = synth_trace(spec, SynthConfig(decode_steps=2, prefill_tokens=3))
    tl = simulate(SimSetup(spec, q, budget_bytes=10**6), steps_from_trace(trace, 4),
                  make_policy("hebf"))
    assert any(e.kind == "run" for e in tl.events)


def test_loads_report_each_level_and_checks_have_a_speed(tmp_path: Path) -> None:
    """The load probe gives each level's bytes (summing to the raise's), in read order."""
    import dataclasses

    import torch

    from d2moe.core.sizes import QuantLayout
    from d2moe.profiles.probe_store import write_random_store
    from d2moe.quant.store import StoreReader

    layout = QuantLayout(kind="bitplane", b1=2, bK=5)
    probe = dataclasses.replace(load_spec("tiny"), layers=1, experts=2, top_k=1)
    raises = [(0, 2), (0, 5), (3, 5)]
    with StoreReader(write_random_store(tmp_path / "s", probe, layout)) as reader:
        loads = measure_loads(reader, probe, layout, torch.device("cpu"), raises, 1,
                              lambda: None, Bar(1, False))
        want = [reader.expert_nbytes(0, 0, a, b) for a, b in raises]
        plane = reader.expert_nbytes(0, 0, 3, 4)
        base = reader.expert_nbytes(0, 0, 0, 2)
    assert [len(levels) for levels, _ in loads] == [1, 4, 2]
    assert [sum(levels) for levels, _ in loads] == want
    assert loads[1][0] == [base, plane, plane, plane] and loads[2][0] == [plane, plane]
    assert all(us > 0 for _, us in loads)
    assert 0.05 < measure_check_GBps(1 << 16, 3) < 1000
    with StoreReader(write_random_store(tmp_path / "e", probe, layout)) as reader:
        assert 0 < measure_evict_us(reader, probe, layout, torch.device("cpu"), 4, 1) < 1e5


def test_median_profile_takes_every_figure_apart() -> None:
    """Each float figure is its own median over the rounds; names, shapes and keys stay."""
    dicts = []
    for k, (bw, run, head, wake) in enumerate([(2.0, 10.0, 8.0, 50.0), (1.0, 30.0, 4.0, 70.0),
                                               (3.0, 20.0, 6.0, 60.0)]):
        d = headed()
        d["source"] = {"kind": "measured", "device": "d", "date": f"day {k}", "command": "c"}
        d["disk"]["read_GBps"] = bw
        d["expert"]["table"][0]["latency_us"] = run
        d["non_expert"]["table"][0]["head_us"] = head
        d["executor"] = {"layer_us": 1.0 + k, "wake_us": wake, "cold_curve_us": [
            [[250.0, 10.0], [1000.0, 40.0]], [[250.0, 30.0]], []][k],
            "plan_us": {"fifo": 10.0 + k, "hebf": [30.0, 10.0, 20.0][k]}
            | ({"johnson": 5.0} if k == 0 else {})}
        d["disk"]["reads"] = [[4096, 100.0 + k], [65536, [300.0, 100.0, 200.0][k]]]
        dicts.append(d)
    rounds = [profile_from_dict(d, path=f"p{k}.yaml") for k, d in enumerate(dicts)]
    m = median_profile(rounds)
    assert m.disk.reads == ((4096, 101.0), (65536, 200.0))  # each point its own median
    assert m.disk.read_GBps == 2.0 and m.disk.latency_us == rounds[0].disk.latency_us
    assert m.expert.rows[0].latency_us == 20.0 and m.expert.rows[0].bits == 2
    assert m.expert.rows[1:] == rounds[0].expert.rows[1:]  # equal in every round
    assert m.non_expert.rows[0].head_us == 6.0
    assert (m.executor.layer_us, m.executor.wake_us) == (2.0, 60.0)
    # the cold curve at the longest one's pauses: 10, 30, 0 at 250 us; 40, 30, 0 at 1 ms
    assert m.executor.cold_curve_us == ((250.0, 10.0), (1000.0, 30.0))
    # per policy, by name; a policy some round lacks is left out
    assert m.executor.plan_us == (("fifo", 11.0), ("hebf", 20.0))
    assert m.source.date == "day 2" and m.name == rounds[0].name
    assert median_profile(rounds[:1]) == rounds[0]


def test_profile_cli_writes_a_file_and_rejects_bad_input(tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.yaml"
    args = ["profile", "--out", str(out), "--dir", str(tmp_path / "s"), "--tokens", "1",
            "--bits", "4", "--disk-sizes", "4KiB,8KiB", "--repeats", "1", "--probe-experts", "2",
            "--no-progress"]
    assert main(args) == 0
    profile = load_profile(out)
    assert profile.source.kind == "measured"
    printed = capsys.readouterr().out
    assert "wrote" in printed
    ex = profile.executor  # every lane cost it measured, as the summary prints them
    assert ex.evict_us > 0 and f"eviction {ex.evict_us:.0f} us" in printed
    assert "a load after a pause " + (f"+{ex.cold_curve_us[0][1]:.0f} us after"
                                      if ex.cold_curve_us else "no more") in printed
    assert list((tmp_path / "s").iterdir()) == []  # no d2moe-probe-store/-model left behind
    assert main(args[:-1] + ["--tokens", "0,x", "--no-progress"]) == 2
    assert main(["profile", "--device", "tpu", "--out", str(out)]) == 2
    assert main(args[:-1] + ["--rounds", "0", "--no-progress"]) == 2


@pytest.mark.parametrize("in_dir", [True, False])
def test_a_profile_stopped_by_sigterm_removes_its_scratch_files(tmp_path: Path, monkeypatch,
                                                                capsys, in_dir: bool) -> None:
    import os
    import signal

    import d2moe.profiles.measure as measure

    def terminated(reader, *args, **kwargs):  # the probe store is on disk by now
        assert (reader.path / "index.json").is_file()
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the measurement")

    monkeypatch.setattr(measure, "measure_disk", terminated)
    monkeypatch.setenv("D2MOE_CACHE", str(tmp_path / "cache"))
    scratch = tmp_path / "s" if in_dir else tmp_path / "cache"
    args = ["profile", "--out", str(tmp_path / "p.yaml"), "--tokens", "1", "--bits", "4",
            "--probe-experts", "2", "--no-progress"] + (["--dir", str(scratch)] if in_dir else [])
    assert main(args) == 143
    assert capsys.readouterr().err.strip() == "terminated"
    assert list(scratch.iterdir()) == []  # was profile-XXXX/ (cache) or d2moe-probe-store/
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back after the command
    assert not (tmp_path / "p.yaml").exists()


def test_the_cpu_name_carries_its_family_and_model(monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    read = Path.read_text
    info = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
            "model name\t: AMD EPYC\n\nprocessor\t: 1\ncpu family\t: 99\n")
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: info
                        if str(self) == "/proc/cpuinfo" else read(self, *a, **k))
    assert device_name(torch.device("cpu")).startswith("AMD EPYC (family 26, model 2), ")
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "model name\t: X\n")
    assert device_name(torch.device("cpu")).startswith("X, ")  # no numbers: the name alone


def test_shipped_cpu_profile_is_measured_and_covers_the_tiny_model() -> None:
    p = load_profile("cpu-2core")
    assert p.source.kind == "measured" and "cores" in p.source.device
    assert p.unified_memory and p.executor is not None
    assert 0 < p.executor.overlap_io_speed <= 1 and 0 < p.executor.overlap_compute_speed <= 1
    tiny = load_spec("tiny")
    for bits in range(2, 9):
        assert p.run_us(tiny, bits, 1) > 0
    assert p.non_expert_us(tiny, 1) > 0 and not p.extrapolations


def test_disk_probe_sizes_reach_the_largest_level() -> None:
    assert sizes_up_to([4096, 2**20], 1000) == [4096, 2**20]
    assert sizes_up_to([4096, 2**22], 55 * 10**6) == [4096, 2**22, 2**24, 2**26]
    assert sizes_up_to([4096], 4096) == [4096]


def test_profile_cli_rejects_a_scratch_dir_under_a_file_and_huge_sizes(tmp_path: Path,
                                                                       capsys) -> None:
    (tmp_path / "f").write_text("x")
    base = ["profile", "--model-spec", "tiny", "--out", str(tmp_path / "p.yaml"),
            "--no-progress"]
    assert main(base + ["--dir", str(tmp_path / "f" / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(tmp_path / "f" / "s") in err and "field 'dir'" in err
    assert main(base + ["--disk-sizes", "1e999", "--dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "field 'disk-sizes'" in err and "too large" in err and "Traceback" not in err
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize("option,value,field", [("--repeats", "0", "repeats"),
                                                ("--probe-experts", "1", "probe-experts")])
def test_profile_names_the_count_option_that_is_too_small(tmp_path: Path, capsys, option: str,
                                                          value: str, field: str) -> None:
    assert main(["profile", "--out", str(tmp_path / "p.yaml"), "--dir", str(tmp_path / "s"),
                 "--no-progress", option, value]) == 2
    err = capsys.readouterr().err.strip()
    assert f"field '{field}': must be >= " in err and f"fix: pass {option} " in err
    assert not (tmp_path / "p.yaml").exists()
