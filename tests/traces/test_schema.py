"""Trace format: round trips, demand grouping, validation errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from d2moe.core.errors import UserError
from d2moe.core.jobs import Demand, ExpertKey
from d2moe.core.spec import load_spec
from d2moe.traces.schema import Trace, load_trace, save_trace
from d2moe.traces.synth import SynthConfig, synth_trace


def _hand_trace() -> Trace:
    """2 steps, 1 layer, top-2 of 4 experts; step 0 has 3 tokens, step 1 has 1."""
    experts = np.array([[[0, 1]], [[1, 2]], [[0, 1]], [[3, 0]]])
    weights = np.array([[[0.6, 0.4]], [[0.7, 0.3]], [[0.9, 0.1]], [[0.5, 0.5]]])
    bits = np.array([[[2, 2]], [[3, 3]], [[2, 0]], [[0, 0]]])
    return Trace("hand", 4, [0, 1], [0, 3, 4], experts, weights, bits, {"source": "hand"})


def test_demands_golden() -> None:
    d = _hand_trace().demands(4)
    k = ExpertKey
    # step 0: (0,2) tokens 0 and 2 (max weight 0.9); (1,2) token 0; (1,3) token 1;
    # (1,4) token 2's unknown bits -> default 4; (2,3) token 1
    assert d[0][0] == [
        Demand(k(0, 0), 2, 2, pytest.approx(0.9)), Demand(k(0, 1), 2, 1, pytest.approx(0.4)),
        Demand(k(0, 1), 3, 1, pytest.approx(0.7)), Demand(k(0, 1), 4, 1, pytest.approx(0.1)),
        Demand(k(0, 2), 3, 1, pytest.approx(0.3)),
    ]
    assert d[1][0] == [Demand(k(0, 0), 4, 1, 0.5), Demand(k(0, 3), 4, 1, 0.5)]
    assert [x.bits for x in _hand_trace().demands(8)[1][0]] == [8, 8]


def test_demands_cached_per_default_bits() -> None:
    t = _hand_trace()
    assert t.demands(4) is t.demands(4)
    assert t.demands(4) is not t.demands(3)


def test_accessors_and_slice() -> None:
    t = _hand_trace()
    assert (t.num_steps, t.num_tokens, t.layers, t.top_k) == (2, 4, 1, 2)
    assert [t.phase(0), t.phase(1)] == ["prefill", "decode"]
    assert [t.tokens(0), t.tokens(1)] == [3, 1]
    tail = t.slice(slice(1, 2))
    assert tail.num_steps == 1 and tail.phase(0) == "decode"
    assert tail.demands(4)[0] == t.demands(4)[1]
    assert t.slice(1).demands(4)[0] == t.demands(4)[0]
    with pytest.raises(UserError, match="steps"):
        t.slice(0)


def test_round_trip(tmp_path: Path) -> None:
    spec = load_spec("tiny")
    t = synth_trace(spec, SynthConfig(seed=3, prefill_tokens=5, decode_steps=7, batch=2))
    path = tmp_path / "t.npz"
    save_trace(path, t)
    back = load_trace(path)
    for name in ("phase_codes", "step_offsets", "experts", "weights", "bits"):
        assert np.array_equal(getattr(back, name), getattr(t, name)), name
    assert back.meta == t.meta and back.spec_name == "tiny"
    assert back.demands(4) == t.demands(4)
    back.check_spec(spec)
    with pytest.raises(UserError, match="spec.layers"):
        back.check_spec(load_spec("llama-moe-3.5b"))


def test_from_steps_matches_constructor() -> None:
    t = _hand_trace()
    steps = [(int(t.phase_codes[s]), t.experts[a:b], t.weights[a:b], t.bits[a:b])
             for s in range(t.num_steps) for a, b in [t.token_range(s)]]
    again = Trace.from_steps("hand", 4, steps)
    assert again.demands(4) == t.demands(4)


def _rewrite(path: Path, out: Path, **changes: object) -> Path:
    """Copy a trace file with some arrays (or header keys via header=...) replaced."""
    with np.load(path) as z:
        arrays = {n: z[n] for n in z.files}
    header = json.loads(str(arrays["header"]))
    header.update(changes.pop("header", {}))  # type: ignore[arg-type]
    arrays["header"] = np.array(json.dumps(header))
    for name, value in changes.items():
        if value is None:
            del arrays[name]
        else:
            arrays[name] = np.asarray(value)
    np.savez(out, **arrays)
    return out


@pytest.fixture()
def trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.npz"
    save_trace(path, _hand_trace())
    return path


BAD = {
    "version": dict(header={"version": 2}),
    "format": dict(header={"format": "other"}),
    "header.extra": dict(header={"extra": 1}),
    "experts": dict(experts=np.array([[[0, 1]], [[1, 4]], [[0, 1]], [[3, 0]]])),
    "weights": dict(weights=np.ones((3, 1, 2), np.float32)),
    "bits": dict(bits=np.full((4, 1, 2), 17, np.int8)),
    "phase": dict(phase=np.array([0, 2], np.int8)),
    "step_offsets": dict(step_offsets=np.array([0, 4, 4])),
    "surplus": dict(surplus=np.zeros(3)),
}


@pytest.mark.parametrize("field", sorted(BAD))
def test_validation_names_field(trace_file: Path, tmp_path: Path, field: str) -> None:
    bad = _rewrite(trace_file, tmp_path / "bad.npz", **BAD[field])
    with pytest.raises(UserError) as err:
        load_trace(bad)
    msg = str(err.value)
    assert f"field '{field}'" in msg and str(bad) in msg and "fix:" in msg


@pytest.mark.parametrize("field,kwargs", [
    ("step_offsets", dict(step_offsets=[0, 3, 3])),  # non-monotone end / wrong total
    ("experts", dict(experts=np.array([[[1, 1]], [[1, 2]], [[0, 1]], [[3, 0]]]))),  # repeat
    ("weights", dict(weights=np.full((4, 1, 2), -0.1))),
    ("weights", dict(weights=np.full((4, 1, 2), np.nan))),
])
def test_constructor_validation(field: str, kwargs: dict) -> None:
    t = _hand_trace()
    args = dict(phase=t.phase_codes, step_offsets=t.step_offsets, experts=t.experts,
                weights=t.weights, bits=t.bits)
    args.update(kwargs)
    with pytest.raises(UserError, match=f"field '{field}'"):
        Trace("hand", 4, **args)


def test_layers_mismatch_with_header(trace_file: Path, tmp_path: Path) -> None:
    bad = _rewrite(trace_file, tmp_path / "bad.npz",
                   header={"spec": {"name": "hand", "layers": 2, "experts": 4, "top_k": 2}})
    with pytest.raises(UserError, match="layers=2"):
        load_trace(bad)


def test_not_a_trace(tmp_path: Path) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="junk.npz"):
        load_trace(junk)
    with pytest.raises(UserError, match="no such file"):
        load_trace(tmp_path / "missing.npz")


def test_demands_of_a_long_decode_trace() -> None:
    """Mixtral decode: 2000 one-token steps give two expert slots per layer, cached."""
    t = synth_trace(load_spec("mixtral-8x7b"), SynthConfig(prefill_tokens=0, decode_steps=2000))
    d = t.demands(4)
    assert len(d) == 2000 and sum(x.tokens for x in d[5][0]) == 2
    assert t.demands(4) is d
