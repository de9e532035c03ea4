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


def test_copies_emulated_on_the_nested_store_load_as_the_executor_does(monkeypatch):
    """A real run of a copies baseline reads the bitplane store's levels as the store reader
    reads any raise (executor.setup.check_store_layout): replayed with `emulate_copies`,
    matryoshka-free's loads (LRU on copies, one 4-bit width) are fifo's exactly. On a store
    of copies (the default) each is one read: shorter where the levels are large enough to
    be read alone (here from 1000 B, as a Mixtral expert's are from 1 MiB), the same where
    the reader joins them (the tiny model's levels at the real threshold)."""
    from dataclasses import replace

    from d2moe.core.jobs import Demand, ExpertKey
    from d2moe.core.sizes import QuantLayout
    from d2moe.core.spec import load_spec
    from d2moe.policies import make_policy
    from d2moe.profiles import load_profile
    from d2moe.sim import SimSetup, StepWork, simulate
    from d2moe.sim import costs as sim_costs

    spec = load_spec("tiny")
    steps = [StepWork("decode", 1, [[Demand(ExpertKey(layer, (s + layer) % spec.experts), 4,
                                            1, 0.9)] for layer in range(spec.layers)])
             for s in range(12)]
    setup = SimSetup(spec, load_profile("cpu-2core"), QuantLayout(), 10**6)

    def loads(name: str, emulate: bool) -> list[tuple[int, int, float]]:
        tl = simulate(replace(setup, emulate_copies=emulate), steps, make_policy(name))
        return [(e.step, e.expert, round(e.end_us - e.start_us, 6)) for e in tl.events
                if e.kind == "load"]

    fifo = loads("fifo", True)  # the tiny model's levels joined: one read per load
    assert fifo == loads("fifo", False)  # nested policies: the flag changes nothing
    assert loads("matryoshka-free", True) == fifo == loads("matryoshka-free", False)
    monkeypatch.setattr(sim_costs, "PIPELINE_MIN_BYTES", 1000)  # each level read alone
    fifo = loads("fifo", True)
    assert fifo == loads("fifo", False)
    assert loads("matryoshka-free", True) == fifo
    copies = loads("matryoshka-free", False)
    assert [r[:2] for r in copies] == [r[:2] for r in fifo]
    assert all(c[2] < f[2] for c, f in zip(copies, fifo, strict=True))
