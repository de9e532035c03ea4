"""Every registered preset runs in the simulator through `d2moe simulate`'s own path (policy
statistics derived from the trace), and the pinned baselines refuse budgets they exceed."""

from __future__ import annotations

import pytest

from d2moe.analysis import compute_metrics
from d2moe.core.errors import UserError
from d2moe.policies import POLICIES, policy_config
from d2moe.sim.cmd import SimulateConfig, build_policy, prepare, simulate_policy


@pytest.fixture(scope="module")
def roomy():
    return prepare(SimulateConfig(model_spec="tiny", profile="cpu-2core", budget="300%",
                                  steps=12))


@pytest.mark.parametrize("name", POLICIES.names())
def test_each_preset_simulates(roomy, name):
    m = compute_metrics(simulate_policy(roomy, build_policy(roomy, name)))
    assert m.decode_steps == 11 and m.decode_tokens_per_s > 0
    if policy_config(name).pin:
        assert m.loads == 0 and m.hit_rate == 1.0 and m.initial_resident_bytes > 0
    else:
        assert m.loads > 0 and m.initial_resident_bytes == 0


def test_pinned_presets_refuse_a_budget_they_exceed():
    tight = prepare(SimulateConfig(model_spec="tiny", profile="cpu-2core", budget="50%",
                                   steps=4))
    with pytest.raises(UserError, match="holds every expert"):
        simulate_policy(tight, build_policy(tight, "hold-in-memory"))


def test_a_policy_running_below_the_stored_b1_is_refused_before_it_runs(tmp_path):
    """edgemoe runs its least important experts at 2 bits whatever the trace asks: with
    --store-bits 3:8 that is refused up front, as running above it is (not mid-run by the
    costs)."""
    from d2moe.core.spec import load_spec
    from d2moe.traces import save_trace, synth_trace
    from d2moe.traces.synth import SynthConfig

    path = tmp_path / "t4.npz"
    save_trace(path, synth_trace(load_spec("tiny"), SynthConfig(bits="4", capacities="1",
                                                                decode_steps=4)))
    prep = prepare(SimulateConfig(model_spec="tiny", profile="cpu-2core", trace=str(path),
                                  b1=3, budget="300%"))
    assert compute_metrics(simulate_policy(prep, build_policy(prep, "fifo"))).decode_steps == 4
    with pytest.raises(UserError, match=r"policy edgemoe runs experts at 2\.\.4 bits but its "
                                        r"copies layout stores 3\.\.8"):
        simulate_policy(prep, build_policy(prep, "edgemoe"))
