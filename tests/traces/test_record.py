"""Recording a trace from the tiny model's real routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d2moe.core.errors import UserError
from d2moe.model.load import load_tiny
from d2moe.model.tokenizer import encode
from d2moe.traces import load_trace, save_trace
from d2moe.traces.record import record_trace

TEXT = encode("import os\n\ndef main(argv):\n    for name in argv:\n        print(name)\n")


def test_recorded_routing_equals_one_full_forward(tmp_path):
    model, spec = load_tiny()
    trace = record_trace(model, spec, TEXT, prefill_tokens=16, decode_steps=12, bits=4)
    assert trace.num_steps == 13 and trace.phase(0) == "prefill" and trace.phase(1) == "decode"
    assert trace.experts.shape == (28, spec.layers, spec.top_k)
    assert (trace.bits == 4).all()
    seen = []
    with torch.no_grad():
        model(torch.tensor([TEXT[:28]]), observer=lambda layer, ids, w: seen.append(ids))
    full = torch.stack(seen, dim=1).numpy()  # [T, L, k]
    assert np.array_equal(np.sort(trace.experts, axis=-1), np.sort(full, axis=-1))
    save_trace(tmp_path / "t.npz", trace)
    assert load_trace(tmp_path / "t.npz").demands(4) == trace.demands(4)


def test_more_steps_than_the_models_positions_are_refused():
    model, spec = load_tiny()
    with pytest.raises(UserError, match="maximum of 4096 positions") as err:
        record_trace(model, spec, TEXT * 100, prefill_tokens=64, decode_steps=4100)
    assert err.value.field == "decode-steps" and "--decode-steps 4032" in str(err.value)


def test_too_short_a_text_is_a_user_error():
    model, spec = load_tiny()
    with pytest.raises(UserError, match="tokens"):
        record_trace(model, spec, TEXT[:10], prefill_tokens=8, decode_steps=8)
