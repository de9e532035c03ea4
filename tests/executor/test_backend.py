"""The real executor on the tiny model: the schedule never changes the math, the budget
holds, both phases run, and mismatches are clear errors."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest
import torch

from d2moe.analysis import compute_metrics
from d2moe.core.errors import UserError
from d2moe.core.events import load_timeline
from d2moe.core.sizes import QuantLayout, all_experts_bytes, expert_bytes
from d2moe.eval.ppl import dense_backend, store_matrices
from d2moe.executor.backend import StreamingExperts
from d2moe.executor.cmd import RunConfig, run
from d2moe.executor.pool import ExpertPool
from d2moe.executor.setup import check_store_layout
from d2moe.model.generate import generate
from d2moe.model.load import load_tiny
from d2moe.model.tokenizer import encode
from d2moe.policies import POLICIES, Policy, make_policy, policy_config
from d2moe.quant.reference import dequantize
from d2moe.quant.store import StoreReader
from tests.sim.test_invariants import assert_lanes_and_residency
from tests.sim.workloads import random_stats

BITS = 4
PROMPT = list(encode("def fib(n):\n    "))


@pytest.fixture(scope="module")
def store_path(tiny_store_path):
    return tiny_store_path


@pytest.fixture(scope="module")
def reference(store_path):
    """All experts resident as dense weights dequantized at BITS bits: the fully resident
    model at these bit-widths."""
    model, spec = load_tiny()
    nested = store_matrices(StoreReader(store_path))
    dense = dense_backend(spec, lambda key: dequantize(nested[key], BITS))
    gen = generate(model, PROMPT, 8, backend=dense)
    return model, spec, gen


def _budgets(spec, layout):
    one = expert_bytes(spec, BITS, layout)
    total = all_experts_bytes(spec, BITS, layout)
    return {"one expert": one, "25%": total // 4, "100%": total}


def _exact(name: str) -> bool:
    """Whether the policy runs every token at BITS on its own expert (then its tokens must
    equal the resident model's): routed or uniform-BITS bits, no substitution."""
    cfg = policy_config(name)
    return cfg.substitute == "none" and (cfg.bits == "asked" or
                                         (cfg.bits == "uniform" and cfg.uniform_bits == BITS))


CLASSIC = ("fifo", "hebf")  # every budget; the other policies one


@pytest.mark.parametrize("policy", POLICIES.names())
def test_every_policy_runs_and_the_exact_ones_give_the_resident_models_tokens(
        store_path, reference, policy):
    model, spec, want = reference
    store = StoreReader(store_path, direct=True)
    cfg = policy_config(policy)
    copies = check_store_layout(cfg, policy, store.layout, store_path)
    budgets = _budgets(spec, store.layout)
    stats = random_stats(spec.layers, spec.experts, 0)
    if policy not in CLASSIC:  # one budget: the tightest this policy accepts
        top = make_policy(policy, stats=stats).max_bits(BITS)
        budgets = ({"all": all_experts_bytes(spec, top, store.layout)} if cfg.pin else
                   {"25%": budgets["25%"]})
    for label, budget in budgets.items():
        pool = ExpertPool(spec, store.layout, budget, torch.device("cpu"), copies=copies)
        backend = StreamingExperts(store, make_policy(policy, stats=stats), pool, bits=BITS)
        got = generate(model, PROMPT, 8, backend=backend)
        tl = backend.finish()
        if _exact(policy):
            assert got.new_ids == want.new_ids, (policy, label)
        assert len(got.new_ids) == 8
        assert pool.accounting.peak_bytes <= budget
        assert pool.arena.peak_bytes <= pool.capacity_bytes
        m = compute_metrics(tl)
        assert m.peak_resident_bytes <= budget
        assert m.prefill_steps == 1 and m.decode_steps == 7
        subs = sum(e.kind == "substitute" for e in tl.events)
        assert m.runs + subs >= m.demands > 0
        if cfg.pin:
            assert m.loads == 0 and m.initial_resident_bytes > 0


def test_a_pinned_policy_over_budget_is_refused(store_path):
    _, spec = load_tiny()
    store = StoreReader(store_path)
    pool = ExpertPool(spec, store.layout, _budgets(spec, store.layout)["25%"],
                      torch.device("cpu"), copies=True)
    with pytest.raises(UserError, match="holds every expert"):
        StreamingExperts(store, make_policy("hold-in-memory"), pool, bits=8)


@pytest.mark.parametrize("policy", ["hebf", "hebf-prefetch"])
def test_rows_follow_the_simulators_rules(store_path, reference, policy):
    model, spec, _ = reference
    store = StoreReader(store_path)
    budget = _budgets(spec, store.layout)["25%"]
    pool = ExpertPool(spec, store.layout, budget, torch.device("cpu"))
    made = make_policy(policy)
    if policy == "hebf-prefetch":  # a threshold that prefetches within 8 tokens of tiny
        made = Policy(policy, replace(made.config, prefetch_min_prob=0.3))
    backend = StreamingExperts(store, made, pool, bits=BITS)
    generate(model, PROMPT, 8 if policy == "hebf-prefetch" else 4, backend=backend)
    tl = backend.finish()
    assert_lanes_and_residency(tl, policy, spec)  # the simulator's row invariants
    if policy == "hebf-prefetch":
        assert tl.of_kind("prefetch")
    loads = {(e.step, e.layer, e.expert): e.end_us for e in tl.events if e.kind == "load"}
    runs = [e for e in tl.events if e.kind == "run"]
    assert runs and loads
    for r in runs:
        if (r.step, r.layer, r.expert) in loads:
            assert r.start_us >= loads[(r.step, r.layer, r.expert)]
    assert {e.lane for e in tl.events} >= {"io", "compute", "step"}
    assert tl.meta["backend"] == "real"


def _resident_pool(spec, store):
    """A 100% pool with every expert already placed at BITS (no layer has a load)."""
    from d2moe.core.jobs import ExpertKey, Load

    pool = ExpertPool(spec, store.layout, _budgets(spec, store.layout)["100%"],
                      torch.device("cpu"))
    for layer in range(spec.layers):
        for e in range(spec.experts):
            pool.admit_stored(Load(ExpertKey(layer, e), 0, BITS),
                              store.read_planes(layer, e, 0, BITS))
    return pool


def test_plans_without_loads_are_not_handed_to_the_io_lane(store_path, reference):
    model, spec, want = reference
    store = StoreReader(store_path)
    for handoff_empty in (False, True):
        backend = StreamingExperts(store, make_policy("fifo"), _resident_pool(spec, store),
                                   bits=BITS, handoff_empty=handoff_empty)
        got = generate(model, PROMPT, 8, backend=backend)
        tl = backend.finish()
        assert got.new_ids == want.new_ids, handoff_empty
        assert not any(e.lane == "io" for e in tl.events)
        # the old behaviour (the benchmarks' baseline) hands every layer of the 8 steps over
        assert backend.io_submits == (8 * spec.layers if handoff_empty else 0)
    # under a binding budget exactly the layers with loads are handed over
    pool = ExpertPool(spec, store.layout, _budgets(spec, store.layout)["25%"],
                      torch.device("cpu"))
    backend = StreamingExperts(store, make_policy("hebf"), pool, bits=BITS)
    got = generate(model, PROMPT, 8, backend=backend)
    tl = backend.finish()
    assert got.new_ids == want.new_ids
    loaded = {(e.step, e.layer) for e in tl.events if e.kind == "load"}
    assert backend.io_submits == len(loaded) > 0


def test_row_sync_waits_inside_each_non_expert_and_run_row(store_path, reference):
    """`sync_rows` on CUDA waits for the GPU before a row's end is read; here a wait of
    2 ms stands in for the GPU's queued work: it is called once per non-expert and run
    row, and lands inside that row (no stall, load or dispatch gap holds it). On the CPU
    the option changes nothing."""
    model, spec, want = reference
    store = StoreReader(store_path)
    pool = ExpertPool(spec, store.layout, _budgets(spec, store.layout)["25%"],
                      torch.device("cpu"))
    backend = StreamingExperts(store, make_policy("hebf"), pool, bits=BITS, sync_rows=True)
    assert backend.row_sync is None  # CPU rows are synchronous already
    waits: list[tuple[float, float]] = []

    def wait() -> None:
        start = backend.clock()
        time.sleep(0.002)
        waits.append((start, backend.clock()))

    backend.row_sync = wait
    got = generate(model, PROMPT, 4, backend=backend)
    tl = backend.finish()
    assert got.new_ids == want.new_ids[:4]
    rows = [e for e in tl.events if e.kind in ("non_expert", "run")]
    assert any(e.kind == "stall" for e in tl.events)  # loads were waited for, outside waits
    assert len(waits) == len(rows)
    for e, (start, end) in zip(sorted(rows, key=lambda e: e.end_us), waits, strict=True):
        assert e.start_us <= start and end <= e.end_us, (e, start, end)
        assert e.end_us - e.start_us >= 2000, e


def test_run_command_and_its_errors(store_path, tmp_path, monkeypatch):
    import d2moe.model.generate as gen_mod

    cfg = RunConfig(store=str(store_path), max_new_tokens=4, out=str(tmp_path), budget="30%",
                    sync_rows=True)
    threads, seen, original = torch.get_num_threads(), [], gen_mod.generate

    def spy(*args, **kwargs):  # the torch thread count generation runs under
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(gen_mod, "generate", spy)
    torch.set_num_threads(2)
    try:
        result = run(cfg)
        assert seen == [1] and torch.get_num_threads() == 2  # --threads 1, then restored
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()
    assert (tmp_path / "events.npz").is_file() and (tmp_path / "bubbles.png").is_file()
    assert "tok/s" in result["summary"] and result["text"].startswith(cfg.prompt)
    meta = json.loads((tmp_path / "metrics.json").read_text())["meta"]  # formats.md's keys
    assert load_timeline(tmp_path / "events.npz").meta == meta
    assert {"prompt", "bits", "store", "non_expert_bytes"} <= meta.keys()
    assert meta["non_expert_bytes"] > 0 and meta["bits"] == cfg.bits
    assert meta["sync_rows"] is False  # asked for, but CPU rows have no GPU work to wait on
    with pytest.raises(UserError, match="smaller than one expert"):
        run(RunConfig(store=str(store_path), budget="1KiB", out=str(tmp_path)))
    with pytest.raises(UserError, match="not a nested store"):
        run(RunConfig(store=str(tmp_path), out=str(tmp_path)))
    with pytest.raises(UserError, match="device"):
        run(RunConfig(store=str(store_path), device="tpu", out=str(tmp_path)))
    with pytest.raises(UserError, match=">= 0") as err:
        RunConfig(threads=-1)
    assert err.value.field == "threads"
    with pytest.raises(UserError, match="maximum of 4096 positions") as err:
        run(RunConfig(store=str(store_path), max_new_tokens=4200, out=str(tmp_path / "long")))
    assert err.value.field == "max-new-tokens" and not (tmp_path / "long").exists()
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            run(RunConfig(store=str(store_path), device="cuda", out=str(tmp_path)))


def test_a_store_of_another_model_is_refused(tmp_path):
    from d2moe.core.spec import ModelSpec
    from d2moe.quant.store import StoreWriter

    other = ModelSpec(name="other", layers=2, experts=2, top_k=1, hidden=64, ffn=64, heads=1,
                      kv_heads=1, vocab=256)
    path = tmp_path / "other"
    StoreWriter(path, other, QuantLayout()).close()
    with pytest.raises(UserError, match="store has layers=2"):
        run(RunConfig(store=str(path), out=str(tmp_path / "o")))


def test_a_damaged_store_surfaces_on_the_compute_lane_and_stops_cleanly(store_path, tmp_path,
                                                                        reference):
    import shutil

    model, spec, _ = reference
    bad = tmp_path / "bad"
    shutil.copytree(store_path, bad)
    data = sorted(p for p in bad.iterdir() if p.name != "index.json")[0]
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF  # inside the first level of layer 0's first expert
    data.write_bytes(bytes(raw))
    store = StoreReader(bad)
    pool = ExpertPool(spec, store.layout, _budgets(spec, store.layout)["100%"],
                      torch.device("cpu"))
    backend = StreamingExperts(store, make_policy("hebf"), pool, bits=BITS)
    with pytest.raises(UserError, match="checksum mismatch"):
        generate(model, PROMPT, 4, backend=backend)
    backend.finish()  # returns: the I/O lane is not left waiting


def test_resume_keeps_the_gap_between_forwards_out_of_every_row(store_path, reference):
    """Read on the backend's own clock around the gap, so no duration threshold decides
    (one did, and failed on a loaded machine): without resume() the second prompt's layer-0
    row and its step start before the gap and end after it; with resume() both start after
    it, and step 1 closes where its work ended, before it."""
    model, spec, _ = reference
    store = StoreReader(store_path)
    for resume in (False, True):
        backend = StreamingExperts(store, make_policy("fifo"), _resident_pool(spec, store),
                                   bits=BITS)
        generate(model, PROMPT, 2, backend=backend)
        gap_start = backend.clock()
        time.sleep(0.05)  # the caller's own time: another backend's run, say
        gap_end = backend.clock()
        if resume:
            backend.resume()
        generate(model, PROMPT, 2, backend=backend)
        tl = backend.finish()
        steps = sorted((e for e in tl.events if e.lane == "step"), key=lambda e: e.start_us)
        assert [e.step for e in steps] == [0, 1, 2, 3]  # one row per step, none twice
        second = next(e for e in tl.events if e.kind == "non_expert" and e.step == 2)
        assert steps[1].end_us <= gap_start  # step 1 ends with its work either way
        if resume:
            assert second.start_us >= gap_end and steps[2].start_us >= gap_end, second
        else:  # the row (and its step) holds the whole gap
            assert second.start_us <= gap_start and second.end_us >= gap_end, second
            assert steps[2].start_us <= gap_start
        assert all(a.end_us <= b.start_us for a, b in zip(steps, steps[1:], strict=False))


def test_run_in_half_precision_halves_the_resident_weights(store_path, tmp_path):
    """--dtype: the non-expert weights, activations and KV cache in bfloat16 or float16 (a
    small GPU's memory); the experts keep their stored bits. An unknown dtype is refused."""
    sizes = {}
    for dtype in ("float32", "bfloat16", "float16"):
        out = tmp_path / dtype
        result = run(RunConfig(store=str(store_path), max_new_tokens=4, out=str(out),
                               budget="30%", dtype=dtype, progress=False))
        sizes[dtype] = json.loads((out / "metrics.json").read_text())["meta"]
        sizes[dtype] = sizes[dtype]["non_expert_bytes"]
        assert result["text"].startswith("def fib(")
    assert sizes["bfloat16"] == sizes["float16"] == sizes["float32"] // 2
    with pytest.raises(UserError, match="unknown dtype 'float64'") as err:
        RunConfig(dtype="float64")
    assert err.value.field == "dtype"
