"""The executor asks the router live: same tokens as the resident model at the same widths
(per token or per (token, slot)), several widths of one expert in one step, and recorded
traces carry the widths."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from d2moe.core.errors import UserError  # noqa: E402
from d2moe.core.sizes import all_experts_bytes  # noqa: E402
from d2moe.executor.backend import StreamingExperts  # noqa: E402
from d2moe.executor.cmd import RunConfig, run  # noqa: E402
from d2moe.executor.pool import ExpertPool  # noqa: E402
from d2moe.model.generate import generate  # noqa: E402
from d2moe.model.load import load_tiny  # noqa: E402
from d2moe.model.tokenizer import encode  # noqa: E402
from d2moe.policies import make_policy  # noqa: E402
from d2moe.quant.store import StoreReader  # noqa: E402
from d2moe.router.capacity import capacity_counts  # noqa: E402
from d2moe.router.experts import BitRoutedExperts  # noqa: E402
from d2moe.router.gate import BitGate  # noqa: E402
from d2moe.router.store import load_router, save_router  # noqa: E402
from d2moe.sim.adaptive import RecordedRouter, RoutedSteps, capacity_source  # noqa: E402
from d2moe.traces.record import record_trace  # noqa: E402
from d2moe.traces.schema import load_trace, save_trace  # noqa: E402

PROMPT = list(encode("def fib(n):\n    return "))
NEW = 6


@pytest.fixture(scope="module", params=[0, 2], ids=["per-token", "per-slot"])
def setup(store, widths, tmp_path_factory, request):
    """An (untrained, seeded) router over 2,3,4 bits beside the store; the resident run."""
    model, spec = load_tiny()
    slots = request.param
    path = tmp_path_factory.mktemp("router") / "r"
    save_router(path, BitGate(spec.layers, spec.hidden, 3, seed=5, slots=slots),
                {"bits": [2, 3, 4], "capacities": [0.3, 0.4, 0.3], "alpha": 0.0, "window": 4,
                 "layers": spec.layers, "hidden": spec.hidden, "store": str(store),
                 "slots": slots})
    resident = BitRoutedExperts(widths, load_router(path, spec=spec))
    resident.reset()
    want = generate(model, PROMPT, NEW, backend=resident)
    return model, spec, path, want


@pytest.mark.parametrize("policy,share", [("hebf", 0.3)])
def test_executor_with_router_gives_the_resident_models_tokens(store, setup, policy, share):
    model, spec, path, want = setup
    reader = StoreReader(store)
    router = load_router(path, spec=spec, store_bits=(2, 4))
    budget = int(all_experts_bytes(spec, 4, reader.layout) * share)
    pool = ExpertPool(spec, reader.layout, budget, torch.device("cpu"))
    backend = StreamingExperts(reader, make_policy(policy), pool, bits=4, router=router)
    got = generate(model, PROMPT, NEW, backend=backend)
    tl = backend.finish()
    assert got.new_ids == want.new_ids
    runs = [e for e in tl.events if e.kind == "run"]
    assert {e.bits_to for e in runs} == {2, 3, 4}
    # prefill: one expert demanded at several widths in one step and layer
    widths: dict[tuple[int, int], set[int]] = {}
    for e in runs:
        if e.step == 0:
            widths.setdefault((e.layer, e.expert), set()).add(e.bits_to)
    assert max(len(w) for w in widths.values()) >= 2
    assert pool.accounting.peak_bytes <= budget


def test_recorded_trace_carries_the_routers_widths_for_the_simulator(widths, setup, tmp_path):
    model, spec, path, _ = setup
    backend = BitRoutedExperts(widths, load_router(path, spec=spec))
    backend.reset()
    ids = list(encode("import os\nimport sys\n\ndef main():\n    pass\n" * 2))
    trace = record_trace(model, spec, ids, prefill_tokens=16, decode_steps=8,
                         backend=backend, token_bits=backend.token_bits,
                         token_prefs=backend.token_prefs,
                         router_config=backend.chooser.describe())
    assert set(trace.bits.ravel().tolist()) <= {2, 3, 4}
    # the gate's probabilities per (token, slot): re-placed under the recorded capacities
    # and window (the simulator's code), they give exactly the recorded widths
    assert trace.prefs.shape == (*trace.bits.shape, 3) and trace.prefs.dtype == np.float32
    assert trace.meta["router_config"] == {"path": str(path), "bits": [2, 3, 4],
                                           "capacities": [0.3, 0.4, 0.3], "window": 4,
                                           "granularity": backend.chooser.granularity}
    placed = RoutedSteps(trace, 4, RecordedRouter.of(trace), 4)
    assert np.array_equal(np.concatenate([placed.step_bits(s) for s in range(len(placed))]),
                          trace.bits)
    save_trace(tmp_path / "t.npz", trace)
    assert np.array_equal(load_trace(tmp_path / "t.npz").prefs, trace.prefs)
    lo, hi = trace.token_range(0)
    per_slot = backend.chooser.granularity == "slot"
    mixed = 0
    for layer in range(spec.layers):  # prefill (16 tokens >= window 4): exact shares
        rows = trace.bits[lo:hi, layer, :] if per_slot else trace.bits[lo:hi, layer, 0]
        counts = [int((rows == b).sum()) for b in (2, 3, 4)]
        assert counts == capacity_counts((0.3, 0.4, 0.3), rows.size)
        mixed += int((trace.bits[lo:hi, layer, 0] != trace.bits[lo:hi, layer, 1]).sum())
    assert (mixed > 0) == per_slot  # per slot: a token's two experts at different widths
    demands = trace.demands(8)  # the default (8) never applies: every slot is labelled
    assert {d.bits for step in demands for layer in step for d in layer} <= {2, 3, 4}


def test_run_command_loads_the_router_and_refuses_a_mismatched_one(store, setup, tmp_path):
    _, spec, path, _ = setup
    result = run(RunConfig(store=str(store), router=str(path), max_new_tokens=2,
                           out=str(tmp_path / "o"), budget="50%"))
    assert result["timeline"].meta["router"] == str(path)
    bad = tmp_path / "bad"
    save_router(bad, BitGate(spec.layers, spec.hidden, 2), {
        "bits": [4, 6], "capacities": [1, 1], "alpha": 0.0, "layers": spec.layers,
        "hidden": spec.hidden})
    with pytest.raises(UserError, match="chooses 6 bits, the store serves 2..4"):
        run(RunConfig(store=str(store), router=str(bad), out=str(tmp_path / "o2")))
    other = tmp_path / "other"  # the same widths, trained on another checkpoint's store
    save_router(other, BitGate(spec.layers, spec.hidden, 3), {
        "bits": [2, 3, 4], "capacities": [1, 1, 1], "alpha": 0.0, "layers": spec.layers,
        "hidden": spec.hidden, "expert_sha256": "e" * 64})
    with StoreReader(store) as reader:
        assert reader.source is not None  # else nothing could be compared
    with pytest.raises(UserError, match=r"field 'expert_sha256': the router was trained on a "
                                        r"store quantized from other expert weights"):
        run(RunConfig(store=str(store), router=str(other), out=str(tmp_path / "o3")))


def test_trace_record_cli_with_router_writes_the_widths(store, setup, tmp_path):
    from d2moe.cli import main

    _, spec, path, _ = setup
    text = tmp_path / "t.py"
    text.write_text("def f(x):\n    return x + 1\n" * 4)
    out = tmp_path / "t.npz"
    assert main(["trace", "record", "--text", str(text), "--prefill-tokens", "12",
                 "--decode-steps", "3", "--router", str(path), "--out", str(out)]) == 0
    trace = load_trace(out)
    assert set(trace.bits.ravel().tolist()) <= {2, 3, 4} and trace.meta["router"] == str(path)
    assert trace.prefs.shape == (15, spec.layers, spec.top_k, 3)
    assert trace.meta["router_config"]["capacities"] == [0.3, 0.4, 0.3]
    assert main(["trace", "record", "--text", str(text), "--router", str(tmp_path)]) == 2


class _Replay:
    """Resident chooser replaying an adaptive run: the same shares from the same steps."""

    def __init__(self, router, schedule: dict[int, tuple[float, ...]], window: int) -> None:
        self.router, self.schedule, self.window = router, schedule, window

    def reset(self) -> None:
        self.step = -1
        self.router.set_capacities(self.router.capacities, window=self.window)

    def choose_index(self, layer, x, weights):
        if layer == 0:
            self.step += 1
            if self.step in self.schedule:
                self.router.set_capacities(self.schedule[self.step])
        return self.router.choose_index(layer, x, weights)


def _adaptive_run(store, model, spec, path, cfg, window: int, new: int):
    """The executor (HEBF, 30% budget) generating `new` tokens with adaptive capacity:
    (router, controller, pool, generated, timeline)."""
    from d2moe.router.adaptive import AdaptiveCapacity

    reader = StoreReader(store)
    router = load_router(path, spec=spec, store_bits=(2, 4))
    ctl = AdaptiveCapacity(router.capacities, cfg, window)
    budget = int(all_experts_bytes(spec, 4, reader.layout) * 0.3)
    pool = ExpertPool(spec, reader.layout, budget, torch.device("cpu"))
    backend = StreamingExperts(reader, make_policy("hebf"), pool, bits=4, router=router,
                               capacity=ctl)
    got = generate(model, PROMPT, new, backend=backend)
    return router, ctl, pool, got, backend.finish()


def test_executor_with_adaptive_capacity_gives_the_resident_tokens_at_the_same_widths(
        store, widths, setup):
    from d2moe.router.adaptive import CapacityConfig

    model, spec, path, _ = setup
    # stall fraction < 1 always: an up move (ceiling "bounds") at every window, timing-free
    cfg = CapacityConfig(capacity_mode="adaptive", stall_low=1.0, stall_high=1.0,
                         share_step=0.25, share_ceiling="bounds")
    window, new = 4, 13  # 12 decode steps: 3 windows
    router, ctl, pool, got, tl = _adaptive_run(store, model, spec, path, cfg, window, new)
    trained, budget = ctl.trained, pool.accounting.budget_bytes
    shares = [d.shares for d in ctl.decisions]
    assert [d.step for d in ctl.decisions] == [4, 8, 12]
    assert shares[0] == pytest.approx((0.05, 0.65, 0.3)) and shares[1] == pytest.approx(
        (0.0, 0.7, 0.3))
    # each window of decode steps holds exactly the counts of the shares decided before it
    per_window = [trained, shares[0], shares[1]]
    k = spec.top_k  # runs per decode step and layer (one per slot)
    for layer in range(spec.layers):
        for w, sh in enumerate(per_window):
            steps = range(1 + w * window, 1 + (w + 1) * window)
            chosen = [e.bits_to for e in tl.events
                      if e.kind == "run" and e.layer == layer and e.step in steps]
            want = capacity_counts(sh, window * k) if router.granularity == "slot" \
                else [n * k for n in capacity_counts(sh, window)]  # a token's k runs
            assert [chosen.count(b) for b in (2, 3, 4)] == want
    replay = _Replay(load_router(path, spec=spec), {5: shares[0], 9: shares[1]}, window)
    resident = BitRoutedExperts(widths, replay)
    resident.reset()
    want = generate(model, PROMPT, new, backend=resident)
    assert got.new_ids == want.new_ids
    assert pool.accounting.peak_bytes <= budget


def test_run_command_adaptive_mode_records_its_decisions(store, setup, tmp_path):
    from d2moe.cli import main
    from d2moe.router.adaptive import CapacityConfig

    _, _, path, _ = setup
    result = run(RunConfig(store=str(store), router=str(path), max_new_tokens=6,
                           out=str(tmp_path / "o"), budget="50%"),
                 capacity=CapacityConfig(capacity_mode="adaptive", capacity_window=2))
    cap = result["timeline"].meta["capacity"]
    assert cap["window_steps"] == 2 and len(cap["decisions"]) >= 2
    assert all(sum(d["shares"]) == pytest.approx(1) for d in cap["decisions"])
    assert "adaptive capacities" in result["summary"]
    fixed = run(RunConfig(store=str(store), router=str(path), max_new_tokens=2,
                          out=str(tmp_path / "f")), capacity=CapacityConfig(capacity_window=8))
    assert fixed["timeline"].meta["capacity"] == {"mode": "fixed", "shares": [0.3, 0.4, 0.3],
                                                  "window": 8}
    assert main(["run", "--store", str(store), "--capacity-mode", "adaptive",
                 "--out", str(tmp_path / "x")]) == 2  # no router


def _run_rows(tl, layer: int, steps: range) -> list[int]:
    """(token, slot) rows run at 2, 3 and 4 bits in `steps` of `layer`."""
    return [sum(e.tokens for e in tl.events if e.kind == "run" and e.layer == layer
                and e.step in steps and e.bits_to == b) for b in (2, 3, 4)]


def test_simulator_on_the_recorded_trace_makes_the_executors_adaptive_decisions(
        store, widths, setup):
    """The executor with adaptive capacity, then the simulator on a trace of the same tokens
    recorded with the router: the same decisions at the same steps with the same shares,
    and the same rows per width in every window (timing-free: forced up moves)."""
    from d2moe.profiles import load_profile
    from d2moe.router.adaptive import CapacityConfig
    from d2moe.sim.simulator import SimSetup, simulate

    model, spec, path, _ = setup
    window, new = 4, 13  # 12 decode steps: 3 windows
    cfg = CapacityConfig(capacity_mode="adaptive", capacity_window=window, stall_low=1.0,
                         stall_high=1.0, share_step=0.25, share_ceiling="bounds")
    _, ctl, pool, got, real = _adaptive_run(store, model, spec, path, cfg, window, new)
    budget = pool.accounting.budget_bytes
    resident = BitRoutedExperts(widths, load_router(path, spec=spec))
    resident.reset()
    trace = record_trace(model, spec, PROMPT + list(got.new_ids), prefill_tokens=len(PROMPT),
                         decode_steps=new - 1, backend=resident,
                         token_bits=resident.token_bits, token_prefs=resident.token_prefs,
                         router_config=resident.chooser.describe())
    source = capacity_source(trace, 4, cfg)
    sim = simulate(SimSetup(spec, load_profile("cpu-2core"), pool.layout, budget), source,
                   make_policy("hebf"))
    decisions = source.record()["decisions"]
    assert [d["step"] for d in decisions] == [d.step for d in ctl.decisions] == [4, 8, 12]
    assert [tuple(d["shares"]) for d in decisions] == [d.shares for d in ctl.decisions]
    for layer in range(spec.layers):
        for steps in [range(1)] + [range(1 + w * window, 1 + (w + 1) * window)
                                   for w in range(3)]:
            assert _run_rows(sim, layer, steps) == _run_rows(real, layer, steps)
