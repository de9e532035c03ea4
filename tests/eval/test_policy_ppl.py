"""Perplexity of the tiny model served by StreamingExperts under a policy and a budget."""

from __future__ import annotations

import math

import pytest

from d2moe.core.errors import UserError

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from d2moe.core.sizes import all_experts_bytes  # noqa: E402
from d2moe.eval.policy_ppl import (  # noqa: E402
    PolicyPplConfig,
    ScoringInputs,
    open_scoring_inputs,
    policy_ppl,
    score,
    stats_for,
)
from d2moe.policies import POLICIES  # noqa: E402

CTX = 64  # 4 windows of 64 tokens: 252 scored tokens


@pytest.fixture(scope="module")
def store(tiny_store_path):
    return tiny_store_path


@pytest.fixture(scope="module")
def inputs(store):
    s = open_scoring_inputs(PolicyPplConfig(store=str(store), heldout_kib=1))
    yield ScoringInputs(s.model, s.spec, s.store, s.store_path, s.ids[:4 * CTX])
    s.store.close()


def _plain_streaming_ppl(inputs, budget_bytes):
    """perplexity() with a StreamingExperts backend built by hand (fifo)."""
    from d2moe.executor.backend import StreamingExperts
    from d2moe.executor.pool import ExpertPool
    from d2moe.model.perplexity import perplexity
    from d2moe.policies import make_policy

    pool = ExpertPool(inputs.spec, inputs.store.layout, budget_bytes, torch.device("cpu"))
    backend = StreamingExperts(inputs.store, make_policy("fifo"), pool, bits=4)
    try:
        return perplexity(inputs.model, inputs.ids, ctx=CTX, batch=4, backend=backend).ppl
    finally:
        backend.finish()


def test_full_budget_equals_the_plain_streaming_run(inputs):
    full = all_experts_bytes(inputs.spec, 4, inputs.store.layout)
    plain = _plain_streaming_ppl(inputs, full)
    windows = score(inputs, "fifo", "100%", ctx=CTX, batch=4, mode="windows")
    assert windows.ppl == plain and windows.tokens_scored == 4 * (CTX - 1)
    assert windows.budget_bytes == full
    decode = score(inputs, "hebf", "100%", ctx=CTX)  # one token per step, KV cache
    assert decode.ppl == pytest.approx(plain, rel=1e-5)
    assert decode.tokens_scored == windows.tokens_scored and decode.substitutes == 0
    assert decode.hit_rate > 0.9 and decode.expert_us > 0 and decode.runs > 0


@pytest.mark.parametrize("policy", ["fifo", "hebf"])
def test_scheduling_alone_does_not_change_the_perplexity(inputs, policy):
    full = score(inputs, policy, "100%", ctx=CTX)
    tight = score(inputs, policy, "25%", ctx=CTX)
    assert tight.ppl == pytest.approx(full.ppl, rel=1e-6)
    assert tight.hit_rate < full.hit_rate and tight.bytes_loaded > full.bytes_loaded
    assert set(tight.as_dict()) >= {"policy", "budget", "ppl", "hit_rate", "expert_us"}


@pytest.mark.skipif("sub-similar" not in POLICIES.names(), reason="no sub-similar preset")
def test_substitution_changes_the_outputs(inputs, tmp_path):
    from d2moe.experts import save_stats, stats_from_trace
    from d2moe.traces import synth_trace
    from d2moe.traces.synth import SynthConfig

    stats = stats_from_trace(synth_trace(inputs.spec, SynthConfig(decode_steps=16)))
    base = score(inputs, "hebf", "25%", ctx=CTX)
    sub = score(inputs, "sub-similar", "25%", ctx=CTX, stats=stats)
    assert sub.substitutes > 0 and sub.ppl != base.ppl and math.isfinite(sub.ppl)
    save_stats(tmp_path, stats)
    assert stats_for(inputs, "sub-similar", str(tmp_path)) == stats
    assert stats_for(inputs, "fifo", str(tmp_path)) is None  # fifo uses none


def test_config_end_to_end(store):
    r = policy_ppl(PolicyPplConfig(store=str(store), policy="fifo", budget="50%",
                                   heldout_kib=1, ctx=128, mode="windows", batch=8))
    assert r.tokens_scored == 8 * 127 and r.policy == "fifo" and r.budget == "50%"
    assert r.ppl > 1 and 0 <= r.hit_rate <= 1


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "prefill"}, "field 'mode'"),
    ({"ctx": 1}, "field 'ctx'"),
    ({"budget": "1KiB"}, "field 'budget'.*smaller than one expert"),
])
def test_bad_options(inputs, kwargs, match):
    args = {"policy": "fifo", "budget": "50%", **kwargs}
    with pytest.raises(UserError, match=match):
        score(inputs, **args)
