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
    with pytest.raises(UserError, match="is a directory, not a trace file"):
        load_trace(tmp_path)


def test_demands_of_a_long_decode_trace() -> None:
    """Mixtral decode: 2000 one-token steps give two expert slots per layer, cached."""
    t = synth_trace(load_spec("mixtral-8x7b"), SynthConfig(prefill_tokens=0, decode_steps=2000))
    d = t.demands(4)
    assert len(d) == 2000 and sum(x.tokens for x in d[5][0]) == 2
    assert t.demands(4) is d


ROUTER = {"path": "r", "bits": [2, 3, 4], "capacities": [0.3, 0.4, 0.3],
          "granularity": "slot", "window": 16}


def _prefs_trace(granularity: str = "slot") -> Trace:
    """The hand trace with a router's gate probabilities [N, L, k, K] and its config."""
    t = _hand_trace()
    rng = np.random.default_rng(0)
    p = rng.random((4, 1, 2 if granularity == "slot" else 1, 3)).astype(np.float32)
    p = np.broadcast_to(p / p.sum(-1, keepdims=True), (4, 1, 2, 3))
    bits = np.where(t.bits == 0, 4, t.bits)
    return Trace("hand", 4, t.phase_codes, t.step_offsets, t.experts, t.weights, bits,
                 {"router_config": dict(ROUTER, granularity=granularity)}, prefs=p)


def test_router_prefs_round_trip_and_slice(tmp_path: Path) -> None:
    t = _prefs_trace()
    assert t.prefs is not None and t.prefs.dtype == np.float32 and t.prefs.shape == (4, 1, 2, 3)
    save_trace(tmp_path / "p.npz", t)
    back = load_trace(tmp_path / "p.npz")
    assert np.array_equal(back.prefs, t.prefs) and back.meta == t.meta
    assert np.array_equal(t.slice(slice(1, 2)).prefs, t.prefs[3:])
    assert _hand_trace().prefs is None  # old traces: no prefs, still valid
    save_trace(tmp_path / "old.npz", _hand_trace())
    assert load_trace(tmp_path / "old.npz").prefs is None


PREFS_BAD = [  # (field named in the error, id, change of (prefs, meta))
    ("prefs", "two-widths", lambda p, m: (p[..., :2], m)),  # the router has three
    ("prefs", "not-probabilities", lambda p, m: (p * 2, m)),
    ("prefs", "integers", lambda p, m: (p.astype(np.int8), m)),
    ("meta.router_config", "missing", lambda p, m: (p, {})),
    ("meta.router_config.bits", "decreasing",
     lambda p, m: (p, {"router_config": dict(ROUTER, bits=[4, 3, 2])})),
    ("meta.router_config.capacities", "sum-below-1",
     lambda p, m: (p, {"router_config": dict(ROUTER, capacities=[0.1, 0.1, 0.1])})),
    ("meta.router_config.granularity", "unknown",
     lambda p, m: (p, {"router_config": dict(ROUTER, granularity="expert")})),
    ("meta.router_config.window", "zero",
     lambda p, m: (p, {"router_config": dict(ROUTER, window=0)})),
]


@pytest.mark.parametrize("field,change", [pytest.param(f, c, id=i) for f, i, c in PREFS_BAD])
def test_bad_router_prefs_name_the_field(trace_file: Path, tmp_path: Path, field: str,
                                         change) -> None:
    t = _prefs_trace()
    save_trace(trace_file, t)
    prefs, meta = change(np.array(t.prefs), t.meta)
    bad = _rewrite(trace_file, tmp_path / "bad.npz", prefs=prefs, header={"meta": meta})
    with pytest.raises(UserError) as err:
        load_trace(bad)
    msg = str(err.value)
    assert f"field '{field}'" in msg and str(bad) in msg
    assert "trace record --router" in msg


def test_a_per_token_routers_prefs_repeat_over_slots_and_bits_are_its_widths() -> None:
    t = _prefs_trace("token")
    with pytest.raises(UserError, match="repeat over the token's slots"):
        Trace("hand", 4, t.phase_codes, t.step_offsets, t.experts, t.weights, t.bits,
              t.meta, prefs=_prefs_trace("slot").prefs)
    with pytest.raises(UserError, match="field 'bits'"):
        Trace("hand", 4, t.phase_codes, t.step_offsets, t.experts, t.weights,
              np.full(t.bits.shape, 8), t.meta, prefs=t.prefs)


def _member_data_offset(path: Path, name: str) -> tuple[int, int]:
    """(offset of `name`'s compressed bytes in the zip, their length)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        n, m = np.frombuffer(f.read(4), "<u2")
    return info.header_offset + 30 + int(n) + int(m), info.compress_size


def _damaged(trace_file: Path, out: Path, how: str) -> Path:
    blob = bytearray(trace_file.read_bytes())
    if how == "empty":
        blob = bytearray()
    elif how == "compressed":  # a flipped byte inside experts' deflate stream
        start, size = _member_data_offset(trace_file, "experts.npy")
        blob[start + size // 2] ^= 0xFF
    elif how == "method":  # the first member's method in the central directory: unsupported
        import zipfile

        with zipfile.ZipFile(trace_file) as z:
            blob[z.start_dir + 10] ^= 0xFF
    else:  # cut in half
        blob = blob[: len(blob) // 2]
    out.write_bytes(bytes(blob))
    return out


@pytest.mark.parametrize("how", ["empty", "compressed", "method", "truncated"])
def test_a_damaged_trace_is_a_user_error_naming_the_file(tmp_path: Path, capsys,
                                                         how: str) -> None:
    from d2moe.cli import main

    good = tmp_path / "good.npz"
    save_trace(good, synth_trace(load_spec("tiny"), SynthConfig(decode_steps=40)))
    bad = _damaged(good, tmp_path / "bad.npz", how)
    with pytest.raises(UserError, match="record or synthesize it again") as err:
        load_trace(bad)
    assert err.value.path == str(bad)
    if how == "compressed":
        assert err.value.field == "experts"
    assert main(["trace", "info", str(bad)]) == 2
    text = capsys.readouterr().err
    assert text.count("\n") == 1 and "Traceback" not in text and str(bad) in text


def test_a_text_file_is_not_a_trace(tmp_path: Path) -> None:
    text = tmp_path / "notes.npz"
    text.write_text("hello\n")
    with pytest.raises(UserError, match="not a trace .npz") as err:
        load_trace(text)
    assert "pickled" not in str(err.value) and err.value.path == str(text)
