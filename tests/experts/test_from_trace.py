"""Expert statistics from a routing trace: importance and the routing proxy of similarity."""

from __future__ import annotations

import numpy as np
import pytest

from d2moe.core.spec import load_spec
from d2moe.experts import stats_from_trace
from d2moe.experts.from_trace import TRACE_SOURCE
from d2moe.traces.schema import DECODE, PREFILL, Trace
from d2moe.traces.synth import SynthConfig, synth_trace


def test_synth_trace_gives_valid_stats():
    spec = load_spec("tiny")
    trace = synth_trace(spec, SynthConfig(prefill_tokens=16, decode_steps=32))
    stats = stats_from_trace(trace)
    assert (stats.layers, stats.experts) == (spec.layers, spec.experts)
    assert stats.source == TRACE_SOURCE and stats.meta["tokens"] == 48
    for layer in range(stats.layers):
        imp = np.asarray(stats.importance[layer])
        sim = np.asarray(stats.similarity[layer])
        assert imp.max() == 1.0 and imp.min() >= 0.0
        assert sim.shape == (spec.experts, spec.experts)
        np.testing.assert_allclose(sim, sim.T, atol=1e-12)
        assert np.all(np.diag(sim) == 1.0) and sim.min() >= 0.0 and sim.max() <= 1.0


def test_hand_made_trace_exact_values():
    # one layer, 4 experts, top-2: tokens 0 and 1 choose experts 0 and 1 with equal weights,
    # token 2 chooses 2 (heavily) and 0; expert 3 is never chosen
    experts = np.array([[[0, 1]], [[0, 1]], [[2, 0]]], dtype=np.int16)
    weights = np.array([[[0.5, 0.5]], [[0.5, 0.5]], [[0.9, 0.1]]], dtype=np.float32)
    trace = Trace("t", 4, [PREFILL, DECODE], [0, 2, 3], experts, weights,
                  np.zeros(experts.shape, np.int8))
    stats = stats_from_trace(trace)
    imp = stats.importance[0]
    # weight per token: e0 = (0.5 + 0.5 + 0.1) / 3, e1 = 1.0 / 3, e2 = 0.9 / 3, e3 = 0
    assert imp == pytest.approx((1.0, 1.0 / 1.1, 0.9 / 1.1, 0.0))
    sim = np.asarray(stats.similarity[0])
    # columns over tokens: e0 = (.5, .5, .1), e1 = (.5, .5, 0), e2 = (0, 0, .9)
    assert sim[0, 1] == pytest.approx(0.5 / (np.sqrt(0.51) * np.sqrt(0.5)))
    assert sim[0, 2] == pytest.approx(0.09 / (np.sqrt(0.51) * 0.9))
    assert sim[1, 2] == 0.0 and sim[3, 3] == 1.0 and sim[3, 0] == 0.0
