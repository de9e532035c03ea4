"""Cases small enough to check by hand (see the arithmetic in each docstring).

Spec `t`, MWQ layout at b1=2: an expert is 7680 B at 2 bits and 15360 B at 4 bits (3840 B a plane).
LinearProfile: load = 5 us + bytes/1000; run = 2 us + tokens*bits; non-expert = 3 us.
So load(E0 @4) = 20.36 us, load(E1 @2) = 12.68 us, run(E0: 1 tok @4) = run(E1: 2 tok @2) = 6 us.
"""

from __future__ import annotations

import pytest

from d2moe.core.jobs import Demand, ExpertKey
from d2moe.core.sizes import QuantLayout
from d2moe.policies import make_policy
from d2moe.sim import SimSetup, StepWork, simulate
from tests.sim.workloads import SPEC, LinearProfile

LAYOUT = QuantLayout(kind="mwq", b1=2, bK=4)
E0_4 = Demand(ExpertKey(0, 0), 4, 1, 0.9)
E1_2 = Demand(ExpertKey(0, 1), 2, 2, 0.8)
STEPS = [StepWork("prefill", 2, [[E1_2]]), StepWork("decode", 2, [[E0_4, E1_2]])]


def log(policy: str, budget: int, engine: str = "fast") -> list[tuple[str, int, float, float]]:
    tl = simulate(SimSetup(SPEC, LinearProfile(), LAYOUT, budget, engine=engine), STEPS,
                  make_policy(policy))
    rows = [(e.kind, e.expert, e.start_us, e.end_us) for e in tl.events if e.step == 1]
    return sorted(rows, key=_order)


def _order(row):
    return (round(row[2], 6), round(row[3], 6), row[0])


def approx(rows):
    """Expected rows in the same order as `log`, with float tolerance on the times."""
    return [(k, x, pytest.approx(s), pytest.approx(e)) for k, x, s, e in sorted(rows, key=_order)]


# Step 0 (both policies): non-expert [0, 3], load E1 [3, 15.68], run E1 [15.68, 21.68].
@pytest.mark.parametrize("engine", ["fast", "simpy"])
def test_fifo_runs_in_id_order_and_stalls_on_the_cold_expert(engine):
    assert log("fifo", 10**6, engine) == approx([
        ("non_expert", -1, 21.68, 24.68),
        ("load", 0, 24.68, 45.04), ("stall", 0, 24.68, 45.04),
        ("run", 0, 45.04, 51.04), ("run", 1, 51.04, 57.04),
        ("decode", -1, 21.68, 57.04),
    ])


@pytest.mark.parametrize("engine", ["fast", "simpy"])
def test_hebf_runs_the_resident_expert_while_loading(engine):
    assert log("hebf", 10**6, engine) == approx([
        ("non_expert", -1, 21.68, 24.68),
        ("load", 0, 24.68, 45.04), ("run", 1, 24.68, 30.68),
        ("stall", 0, 30.68, 45.04), ("run", 0, 45.04, 51.04),
        ("decode", -1, 21.68, 57.04 - 6.0),
    ])


def test_tight_budget_fifo_evicts_a_later_job_and_reloads_it():
    """Budget 23039 B: E0 @4 (15360) and E1 @2 (7680) never fit together. FIFO evicts E1
    (a later job) to load E0, runs E0, then must wait for that run before evicting E0 to
    reload E1: the I/O lane waits on the compute lane."""
    assert log("fifo", 23039) == approx([
        ("non_expert", -1, 21.68, 24.68),
        ("evict", 1, 24.68, 24.68), ("load", 0, 24.68, 45.04), ("stall", 0, 24.68, 45.04),
        ("run", 0, 45.04, 51.04),
        ("evict", 0, 51.04, 51.04), ("load", 1, 51.04, 63.72), ("stall", 1, 51.04, 63.72),
        ("run", 1, 63.72, 69.72),
        ("decode", -1, 21.68, 69.72),
    ])


def test_tight_budget_hebf_runs_first_then_evicts():
    """HEBF runs resident E1 first, evicts it after its run, then loads E0."""
    assert log("hebf", 23039) == approx([
        ("non_expert", -1, 21.68, 24.68),
        ("run", 1, 24.68, 30.68),
        ("evict", 1, 30.68, 30.68), ("load", 0, 30.68, 51.04), ("stall", 0, 30.68, 51.04),
        ("run", 0, 51.04, 57.04),
        ("decode", -1, 21.68, 57.04),
    ])


def test_budget_below_one_expert_is_a_user_error():
    from d2moe.core.errors import UserError

    with pytest.raises(UserError, match="smaller than one expert"):
        simulate(SimSetup(SPEC, LinearProfile(), LAYOUT, 15359), STEPS, make_policy("hebf"))


def test_host_ram_tier_serves_a_reload():
    """Budget of one 4-bit expert; E0, E1, E0. Without a host tier the second E0 load reads
    the disk again (20.36 us); with one it crosses only the host link: 1 + 15360/1e4 us."""
    e0, e1 = Demand(ExpertKey(0, 0), 4, 1), Demand(ExpertKey(0, 1), 4, 1)
    steps = [StepWork("decode", 1, [[d]]) for d in (e0, e1, e0)]

    def loads(host_bytes):
        setup = SimSetup(SPEC, LinearProfile(), LAYOUT, 15360, host_cache_bytes=host_bytes)
        tl = simulate(setup, steps, make_policy("fifo"))
        return [round(e.dur_us, 6) for e in tl.events if e.kind == "load"]

    assert loads(0) == [20.36, 20.36, 20.36]
    assert loads(2 * 15360) == [20.36, 20.36, round(1 + 15360 / 1e4, 6)]
    assert loads(15360) == [20.36, 20.36, 20.36]  # RAM holds one expert: E1 pushed E0 out
