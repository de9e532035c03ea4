"""The simulator runs the bit-width router's capacities: a trace's recorded gate preferences
are re-placed under the adaptive controller's shares, with the executor's timing of windows
and decisions (d2moe/sim/adaptive.py). Synthetic router traces: no torch needed."""

from __future__ import annotations

import numpy as np
import pytest

from d2moe.core.errors import UserError
from d2moe.core.sizes import QuantLayout
from d2moe.core.spec import load_spec
from d2moe.policies import make_policy
from d2moe.profiles import load_profile
from d2moe.router.adaptive import CapacityConfig, decide
from d2moe.router.capacity import capacity_counts
from d2moe.sim.adaptive import RecordedRouter, RoutedSteps, capacity_source
from d2moe.sim.simulator import SimSetup, simulate
from d2moe.sim.workload import budget_bytes, steps_from_trace
from d2moe.traces import synth_trace
from d2moe.traces.schema import Trace, save_trace
from d2moe.traces.synth import SynthConfig

TRAINED = (0.3, 0.4, 0.3)
WINDOW = 4  # decode steps per decision, tokens per capacity window
DECODE = 12  # three windows
# a stall fraction below 1 always: an up move (ceiling "bounds") every window, timing-free
FORCED = CapacityConfig(capacity_mode="adaptive", capacity_window=WINDOW, stall_low=1.0,
                        stall_high=1.0, share_step=0.25, share_ceiling="bounds")


def router_trace(granularity: str = "slot", caps=TRAINED, window: int = 8,
                 seed: int = 0) -> Trace:
    """A tiny synthetic trace as if recorded with a router: random gate preferences and the
    widths the router would have placed from them (its capacities and window)."""
    spec = load_spec("tiny")
    base = synth_trace(spec, SynthConfig(prefill_tokens=6, decode_steps=DECODE, bits="",
                                         seed=seed))
    rng = np.random.default_rng(seed)
    n, L, k = base.experts.shape
    logits = rng.normal(size=(n, L, k if granularity == "slot" else 1, 3)) * 2  # [N, L, k|1, K]
    prefs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    prefs = np.broadcast_to(prefs, (n, L, k, 3)).astype(np.float32)
    cfg = {"path": "r", "bits": [2, 3, 4], "capacities": list(caps),
           "granularity": granularity, "window": window}
    meta = dict(base.meta, router_config=cfg)
    unplaced = Trace(base.spec_name, base.num_experts, base.phase_codes, base.step_offsets,
                     base.experts, base.weights, None, meta, prefs=prefs)
    placer = RoutedSteps(unplaced, 4, RecordedRouter.of(unplaced), window)
    bits = np.concatenate([placer.step_bits(s) for s in range(unplaced.num_steps)])
    return Trace(base.spec_name, base.num_experts, base.phase_codes, base.step_offsets,
                 base.experts, base.weights, bits, meta, prefs=prefs)


def run(trace: Trace, cfg: CapacityConfig | None, engine: str = "fast", budget: str = "30%"):
    """One hebf simulation of `trace` under `cfg`; (timeline, source)."""
    spec = load_spec("tiny")
    setup = SimSetup(spec, load_profile("cpu-2core"),
                     budget_bytes=budget_bytes(budget, spec, QuantLayout(), 4), engine=engine)
    source = capacity_source(trace, 4, cfg)
    return simulate(setup, source, make_policy("hebf")), source


def run_counts(tl, layer: int, steps: range, widths=(2, 3, 4)) -> list[int]:
    """Expert runs' (token, slot) rows per width in `steps` of `layer`."""
    rows = [0] * len(widths)
    for e in tl.events:
        if e.kind == "run" and e.layer == layer and e.step in steps:
            rows[widths.index(e.bits_to)] += e.tokens
    return rows


@pytest.mark.parametrize("granularity", ["slot", "token"])
def test_fixed_mode_replays_the_recorded_widths_and_re_placing_gives_them_again(granularity):
    trace = router_trace(granularity)
    source = capacity_source(trace, 4, CapacityConfig())
    assert source.record() == {"mode": "fixed", "shares": list(TRAINED), "window": 8}
    placed = RoutedSteps(trace, 4, RecordedRouter.of(trace), 8)
    want = steps_from_trace(trace, 4)
    assert [placed.work(s) for s in range(trace.num_steps)] == want == list(source.steps)
    tl_fixed, _ = run(trace, None)
    tl_plain = simulate(SimSetup(load_spec("tiny"), load_profile("cpu-2core"),
                                 budget_bytes=tl_fixed.meta["budget_bytes"]),
                        want, make_policy("hebf"))
    assert tl_fixed.events == tl_plain.events
    # fixed mode with another window re-places, still at exact shares per window
    other = capacity_source(trace, 4, CapacityConfig(capacity_window=3))
    assert isinstance(other, RoutedSteps) and other.record()["window"] == 3


@pytest.mark.parametrize("engine", ["fast", "simpy"])
@pytest.mark.parametrize("granularity", ["slot", "token"])
def test_adaptive_decisions_follow_the_rule_and_each_window_holds_its_shares(engine,
                                                                             granularity):
    trace = router_trace(granularity)
    tl, source = run(trace, FORCED, engine)
    decisions = source.record()["decisions"]
    assert [d["step"] for d in decisions] == [4, 8, 12]
    shares, want = TRAINED, []
    for _ in decisions:
        shares = decide(shares, TRAINED, 0.0, FORCED)
        want.append(shares)
    assert [tuple(d["shares"]) for d in decisions] == [pytest.approx(w) for w in want]
    rows = 2 if granularity == "slot" else 1  # capacity rows per token
    k = trace.top_k
    per_window = [TRAINED, want[0], want[1]]  # a decision applies from the next step
    for layer in range(trace.layers):
        for w, sh in enumerate(per_window):
            steps = range(1 + w * WINDOW, 1 + (w + 1) * WINDOW)
            counts = capacity_counts(sh, WINDOW * rows)
            assert run_counts(tl, layer, steps) == [c * k // rows for c in counts]
        # the prefill (6 tokens >= the window of 4): one batch at the trained capacities
        assert run_counts(tl, layer, range(1)) == [
            c * k // rows for c in capacity_counts(TRAINED, 6 * rows)]


def test_adaptive_decisions_use_the_stall_fraction_of_the_simulated_rows():
    cfg = CapacityConfig(capacity_mode="adaptive", capacity_window=WINDOW, stall_high=0.02,
                         stall_low=0.01, share_step=0.1)
    trace = router_trace()
    tl, source = run(trace, cfg, budget="20%")
    record = source.record()
    assert record["window_steps"] == WINDOW and len(record["decisions"]) == 3
    shares = TRAINED
    for i, d in enumerate(record["decisions"]):
        steps = range(1 + i * WINDOW, 1 + (i + 1) * WINDOW)
        stall = sum(e.end_us - e.start_us for e in tl.events
                    if e.step in steps and e.kind == "stall")
        wall = sum(e.end_us - e.start_us for e in tl.events
                   if e.step in steps and e.lane == "step")
        assert d["stall_fraction"] == pytest.approx(stall / wall)
        shares = decide(shares, TRAINED, stall / wall, cfg)
        assert d["shares"] == pytest.approx(list(shares))
    assert any(d["stall_fraction"] > 0.02 for d in record["decisions"])  # it did move down


def test_simulate_command_adaptive_mode_prints_and_records_the_decisions(tmp_path):
    from d2moe.cli import main
    from d2moe.sim.cmd import SimulateConfig, run_simulations

    path = tmp_path / "t.npz"
    save_trace(path, router_trace())
    cfg = SimulateConfig(model_spec="tiny", profile="cpu-2core", trace=str(path),
                         policy="hebf", budget="30%", out=str(tmp_path / "o"))
    result = run_simulations(cfg, capacity=FORCED)
    assert "adaptive capacities, 3 decisions" in result["table"]
    assert "decode runs (simulated)" in result["table"]
    assert len(result["timelines"][0].meta["capacity"]["decisions"]) == 3
    fixed = run_simulations(cfg)
    assert "fixed capacities 0.30/0.40/0.30 (window 8)" in fixed["table"]
    assert main(["simulate", "--model-spec", "tiny", "--profile", "cpu-2core", "--trace",
                 str(path), "--policy", "hebf", "--capacity-mode", "adaptive",
                 "--capacity-window", "4", "--out", str(tmp_path / "c")]) == 0


def test_adaptive_mode_needs_prefs_and_capacities_summing_to_one(tmp_path, capsys):
    from d2moe.cli import main

    plain = synth_trace(load_spec("tiny"), SynthConfig(prefill_tokens=4, decode_steps=4))
    with pytest.raises(UserError, match="no router preferences") as err:
        capacity_source(plain, 4, FORCED)
    assert err.value.field == "prefs" and "trace record --router" in err.value.fix
    with pytest.raises(UserError) as err:
        capacity_source(plain, 4, CapacityConfig(capacity_window=4))
    assert "--capacity-window" in str(err.value)
    assert capacity_source(plain, 4, CapacityConfig()).record() is None  # fixed: as before
    slack = router_trace(caps=(1.0, 1.0, 1.0))
    with pytest.raises(UserError, match="sum to 3") as err:
        capacity_source(slack, 4, FORCED)
    assert err.value.field == "capacity-mode"
    for trace, name in ((plain, "plain"), (slack, "slack")):
        save_trace(tmp_path / f"{name}.npz", trace)
        assert main(["simulate", "--model-spec", "tiny", "--trace", str(tmp_path / f"{name}.npz"),
                     "--capacity-mode", "adaptive", "--out", str(tmp_path / name)]) == 2
    err_text = capsys.readouterr().err
    assert "field 'prefs'" in err_text and "field 'capacity-mode'" in err_text
