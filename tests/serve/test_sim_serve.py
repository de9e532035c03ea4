"""Serving on the simulator, end to end: tiny spec, the measured cpu-2core profile."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from d2moe.cli import main
from d2moe.core.errors import UserError
from d2moe.core.events import load_timeline
from d2moe.core.sizes import QuantLayout
from d2moe.core.spec import load_spec
from d2moe.policies import make_policy
from d2moe.profiles import load_profile
from d2moe.serve.arrivals import ArrivalConfig, Request, make_requests
from d2moe.serve.cmd import ServeConfig, serve
from d2moe.serve.metrics import serve_metrics
from d2moe.serve.routing import SynthRouting, TraceRouting, forward_tokens, step_demands
from d2moe.serve.sim import serve_sim
from d2moe.sim.simulator import SimSetup
from d2moe.sim.workload import budget_bytes
from d2moe.traces import save_trace, synth_trace
from d2moe.traces.synth import SynthConfig

SPEC = load_spec("tiny")
ARRIVALS = ArrivalConfig(rate=50, requests=6, prompt_tokens="3:9", output_tokens="1:5", seed=2)


def _setup(budget="50%"):
    layout = QuantLayout()
    return SimSetup(SPEC, load_profile("cpu-2core"), layout,
                    budget_bytes(budget, SPEC, layout, 4))


@pytest.mark.parametrize("max_batch", [1, 3])
def test_every_request_is_served_and_steps_match_the_batcher(max_batch):
    reqs = make_requests(ARRIVALS)
    tl = serve_sim(_setup(), make_policy("hebf"), reqs, SynthRouting(SPEC), max_batch=max_batch,
                   bits=4)
    m = serve_metrics(tl)
    assert m.requests == len(reqs) and m.output_tokens == sum(r.output_tokens for r in reqs)
    assert m.latency_p99_ms >= m.latency_p50_ms > 0 and m.ttft_p50_ms > 0
    steps = [e for e in tl.events if e.lane == "step"]
    prefill_tokens = sum(e.tokens for e in steps if e.kind == "prefill")
    decode_tokens = sum(e.tokens for e in steps if e.kind == "decode")
    assert prefill_tokens == sum(r.prompt_tokens for r in reqs)
    assert decode_tokens == sum(r.output_tokens - 1 for r in reqs)
    assert max(e.tokens for e in steps if e.kind == "decode") <= max_batch
    for a, b in zip(steps, steps[1:], strict=False):  # steps never overlap
        assert a.end_us <= b.start_us
    ends = {e.step: e.end_us for e in tl.events if e.kind == "request"}
    assert max(ends.values()) == pytest.approx(steps[-1].end_us)
    assert tl.meta["max_batch"] == max_batch and tl.meta["backend"] == "sim"
    # deterministic: the same rows again
    again = serve_sim(_setup(), make_policy("hebf"), reqs, SynthRouting(SPEC),
                      max_batch=max_batch, bits=4)
    assert again.events == tl.events


def test_step_demands_count_every_token_and_slot():
    r = Request(0, 0.0, 5, 4)
    rt = SynthRouting(SPEC).for_request(r)
    assert rt.experts.shape == (forward_tokens(r), SPEC.layers, SPEC.top_k)
    layers = step_demands(SPEC, [rt, rt], "prefill", 4)
    assert len(layers) == SPEC.layers
    for layer, ds in enumerate(layers):
        assert sum(d.tokens for d in ds) == 2 * forward_tokens(r) * SPEC.top_k
        assert [(d.key.expert, d.bits) for d in ds] == sorted((d.key.expert, d.bits) for d in ds)
        assert all(d.key.layer == layer and d.bits == 4 for d in ds)
        for d in ds:
            hit = rt.experts[:, layer, :] == d.key.expert
            assert d.importance == pytest.approx(rt.weights[:, layer, :][hit].max())


def test_trace_routing_cycles_through_the_rows(tmp_path):
    trace = synth_trace(SPEC, SynthConfig(prefill_tokens=4, decode_steps=3, bits=""))
    reqs = [Request(0, 0.0, 4, 3), Request(1, 0.0, 2, 2)]  # 6 rows, then 3 rows (wraps)
    src = TraceRouting(trace, reqs)
    assert np.array_equal(src.for_request(reqs[0]).experts, trace.experts[:6])
    assert np.array_equal(src.for_request(reqs[1]).experts, trace.experts[[6, 0, 1]])
    path = tmp_path / "t.npz"
    save_trace(path, trace)
    res = serve(ServeConfig(trace=str(path), policy="fifo", out=str(tmp_path / "o")),
                ArrivalConfig(requests=4, rate=100, prompt_tokens="2", output_tokens="3"))
    assert res["metrics"]["fifo"].requests == 4


def test_cli_writes_timelines_and_summary(tmp_path, capsys):
    out = tmp_path / "serve"
    assert main(["serve", "--requests", "5", "--rate", "30", "--prompt-tokens", "4:8",
                 "--output-tokens", "2:4", "--max-batch", "2", "--policy", "fifo,hebf",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "p99 lat ms" in text and "fifo" in text and "hebf" in text
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == {"fifo", "hebf"} and len(summary["requests"]) == 5
    tl = load_timeline(out / "events-hebf.npz")
    assert len(tl.of_kind("request")) == 5 and len(tl.of_kind("first_token")) == 5
    assert serve_metrics(tl).as_dict() == pytest.approx(summary["policies"]["hebf"],
                                                        nan_ok=True)


@pytest.mark.parametrize("kw,field", [({"backend": "gpu"}, "backend"),
                                      ({"max_batch": 0}, "max_batch"),
                                      ({"policy": " , "}, "policy"),
                                      ({"backend": "real", "trace": "t.npz"}, "trace")])
def test_bad_options_are_user_errors(kw, field, tmp_path):
    with pytest.raises(UserError, match=field):
        serve(ServeConfig(out=str(tmp_path), **kw), ARRIVALS)


def test_budget_below_one_expert_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="budget"):
        serve(ServeConfig(budget="10B", out=str(tmp_path)), ARRIVALS)


def test_sim_serving_never_imports_torch(tmp_path):
    code = ("import sys\nimport d2moe.serve.cmd, d2moe.serve.sim, d2moe.serve.metrics\n"
            "from d2moe.serve.arrivals import ArrivalConfig\n"
            "from d2moe.serve.cmd import ServeConfig, serve\n"
            "serve(ServeConfig(out='o', policy='fifo', progress=False), "
            "ArrivalConfig(requests=2))\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, check=True)
    assert out.stdout.strip() == "False"


def test_negative_threads_is_one_line(tmp_path, capsys):
    from d2moe.cli import main

    assert main(["serve", "--backend", "real", "--threads", "-1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("d2moe serve: error: field 'threads': must be >= 0, got -1 "
                   "(fix: pass 1, or 0 for default)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend,kw,flag", [
    ("real", {"profile": "nope"}, "--profile"), ("real", {"model_spec": "mixtral-8x7b"},
                                                 "--model-spec"),
    ("real", {"trace": "t.npz"}, "--trace"), ("sim", {"model": "/some/ckpt"}, "--model"),
    ("sim", {"store": "/some/store"}, "--store"), ("sim", {"direct_io": False},
                                                    "--no-direct-io"),
    ("sim", {"threads": 2}, "--threads")])
def test_an_option_of_the_other_backend_is_refused_not_ignored(tmp_path, backend, kw, flag):
    """docs/serve.md's table: each backend's own options, changed under the other, fail."""
    other = "sim" if backend == "real" else "real"
    with pytest.raises(UserError, match=rf"{flag} is read by --backend {other} only.*fix: "
                                        rf"drop {flag}, or use --backend {other}"):
        ServeConfig(backend=backend, out=str(tmp_path), **kw)
    ServeConfig(backend=other, out=str(tmp_path), **kw)  # its own backend takes it
