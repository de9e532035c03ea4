"""`d2moe validate --router`: the real run asks the router live, the recorded trace carries its
widths and gate probabilities, and the simulator replays them (fixed) or re-places them under
the controller's shares (adaptive) with the same decisions at the same steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("safetensors")

from d2moe.cli import main  # noqa: E402
from d2moe.core.errors import UserError  # noqa: E402
from d2moe.core.events import load_timeline  # noqa: E402
from d2moe.core.sizes import all_experts_bytes, parse_budget  # noqa: E402
from d2moe.executor.validate import ValidateConfig, validate  # noqa: E402
from d2moe.model.load import load_tiny  # noqa: E402
from d2moe.quant.store import StoreReader  # noqa: E402
from d2moe.router.adaptive import CapacityConfig  # noqa: E402
from d2moe.router.gate import BitGate  # noqa: E402
from d2moe.router.store import save_router  # noqa: E402
from d2moe.traces import load_trace  # noqa: E402


@pytest.fixture(scope="module", params=[2, 0], ids=["per-slot", "per-token"])
def router_path(store, tmp_path_factory, request):
    """An untrained, seeded router over 2,3,4 bits (capacities 0.3/0.4/0.3, window 4)."""
    _, spec = load_tiny()
    path = tmp_path_factory.mktemp("vrouter") / "r"
    save_router(path, BitGate(spec.layers, spec.hidden, 3, seed=5, slots=request.param),
                {"bits": [2, 3, 4], "capacities": [0.3, 0.4, 0.3], "alpha": 0.0, "window": 4,
                 "layers": spec.layers, "hidden": spec.hidden, "store": str(store),
                 "slots": request.param})
    return path


def _cfg(store, router_path, out, **kw):
    base = dict(store=str(store), router=str(router_path), profile="cpu-2core",
                policies="fifo,hebf", budgets="30%,100%", max_new_tokens=5, bits=3,
                out=str(out), plot_steps=1)
    return ValidateConfig(**(base | kw))


def test_validate_with_router_fixed_mode(store, router_path, tmp_path):
    out = tmp_path / "v"
    result = validate(_cfg(store, router_path, out))
    pairs = [(r.policy, r.budget) for r in result["rows"]]
    assert pairs == [("fifo", "30%"), ("hebf", "30%"), ("fifo", "100%"), ("hebf", "100%")]
    data = json.loads((out / "fidelity.json").read_text())
    assert [(b["policy"], b["budget"]) for b in data["router_rows"]] == pairs
    for row, b in zip(data["rows"], data["router_rows"], strict=True):
        assert 2 <= row["real bits"] <= 4 and 2 <= row["sim bits"] <= 4
        # fixed mode replays the recorded widths: the same decode average bits
        assert b["sim_bits"] == pytest.approx(b["real_bits"])
    assert data["router_config"]["bits"] == [2, 3, 4]
    table = (out / "table.txt").read_text()
    assert "real bits" in table and "sim bits" in table and "router" in table.splitlines()[0]
    # percentages are of all experts at the router's widest width (4 bits), not --bits 3
    with StoreReader(store) as reader:
        _, spec = load_tiny()
        want = parse_budget("30%", all_experts_bytes(spec, 4, reader.layout))
    real = load_timeline(out / "events-real-fifo-30pct.npz")
    sim = load_timeline(out / "events-sim-fifo-30pct.npz")
    assert real.meta["budget_bytes"] == sim.meta["budget_bytes"] == want
    assert real.meta["capacity"] == sim.meta["capacity"] == {
        "mode": "fixed", "shares": [0.3, 0.4, 0.3], "window": 4}
    # the trace carries the router's widths per (token, slot) and its probabilities;
    # the simulator ran the very same (expert, width) runs, step by step
    trace = load_trace(out / "trace.npz")
    assert trace.prefs.shape == (*trace.bits.shape, 3)
    assert set(trace.bits.ravel().tolist()) <= {2, 3, 4}
    assert trace.meta["router_config"]["capacities"] == [0.3, 0.4, 0.3]
    runs = lambda tl: sorted((e.step, e.layer, e.expert, e.bits_to, e.tokens)  # noqa: E731
                             for e in tl.events if e.kind == "run")
    assert runs(real) == runs(sim)
    slots = np.array([e.tokens for e in real.events if e.kind == "run" and e.step >= 1])
    assert slots.sum() == trace.bits[trace.token_range(1)[0]:].size  # every decode slot ran


def test_validate_with_router_adaptive_mode_same_decisions(store, router_path, tmp_path):
    out = tmp_path / "a"
    # stall fraction < 1 always: an up move (ceiling "bounds") at every window, timing-free
    cap = CapacityConfig(capacity_mode="adaptive", capacity_window=3, stall_low=1.0,
                         stall_high=1.0, share_step=0.25, share_ceiling="bounds")
    result = validate(_cfg(store, router_path, out, max_new_tokens=10, budgets="30%",
                           policies="hebf,fifo"), capacity=cap)
    assert len(result["router_rows"]) == 2
    for b in result["router_rows"]:
        assert b["real_decisions"] == b["sim_decisions"] == 3 and b["same_decisions"]
        assert b["real_decision_steps"] == b["sim_decision_steps"] == [3, 6, 9]
        assert b["real_shares"] == b["sim_shares"] == pytest.approx([0.0, 0.45, 0.55])
    real = load_timeline(out / "events-real-hebf-30pct.npz")
    sim = load_timeline(out / "events-sim-hebf-30pct.npz")
    got = [[tuple(d["shares"]) for d in tl.meta["capacity"]["decisions"]] for tl in (real, sim)]
    assert got[0] == got[1]
    report = (out / "table.txt").read_text()
    assert "3 real / 3 simulated decisions (same count)" in report
    data = json.loads((out / "fidelity.json").read_text())
    assert data["capacity_config"]["capacity_mode"] == "adaptive"
    assert data["router_rows"][0]["same_decisions"] is True


def test_validate_router_errors(store, router_path, tmp_path):
    out = str(tmp_path / "x")
    # adaptive (or a capacity window) without a router: exit 2 before any work
    assert main(["validate", "--store", str(store), "--capacity-mode", "adaptive",
                 "--out", out]) == 2
    with pytest.raises(UserError, match="capacity-window"):
        validate(ValidateConfig(store=str(store), out=out),
                 capacity=CapacityConfig(capacity_window=8))
    # a router the store cannot serve
    _, spec = load_tiny()
    bad = tmp_path / "bad"
    save_router(bad, BitGate(spec.layers, spec.hidden, 2), {
        "bits": [4, 6], "capacities": [0.5, 0.5], "alpha": 0.0, "layers": spec.layers,
        "hidden": spec.hidden})
    with pytest.raises(UserError, match="chooses 6 bits, the store serves 2..4"):
        validate(_cfg(store, bad, out))
    assert main(["validate", "--store", str(store), "--router", str(bad), "--out", out]) == 2
    assert not (tmp_path / "x" / "table.txt").exists()
