"""Synthetic traces: capacities, determinism, locality, cross-layer maps, Zipf skew."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.core.errors import UserError
from d2moe.core.spec import ModelSpec, load_spec
from d2moe.traces.synth import SynthConfig, layer_maps, layer_popularity, synth_trace

TINY = load_spec("tiny")  # 4 layers, 8 experts, top-2
WIDE = ModelSpec(name="wide", layers=3, experts=16, top_k=4, hidden=64, ffn=128, heads=4,
                 kv_heads=4, vocab=256)


@st.composite
def bit_setups(draw: st.DrawFn) -> tuple[str, str, list[int], list[int]]:
    """Distinct bit-widths and capacities in tenths that sum to >= 1."""
    k = draw(st.integers(1, 4))
    bits = draw(st.lists(st.integers(1, 16), min_size=k, max_size=k, unique=True))
    tenths = draw(st.lists(st.integers(0, 10), min_size=k, max_size=k)
                  .filter(lambda xs: sum(xs) >= 10))
    return (",".join(map(str, bits)), ",".join(f"{t / 10}" for t in tenths), bits, tenths)


@settings(max_examples=40, deadline=None)
@given(setup=bit_setups(), batch=st.integers(1, 12), prefill=st.integers(0, 9),
       seed=st.integers(0, 2**16))
def test_capacities_respected_per_step(setup: tuple, batch: int, prefill: int, seed: int) -> None:
    bits_s, caps_s, bits, tenths = setup
    cfg = SynthConfig(seed=seed, prefill_tokens=prefill, decode_steps=3, batch=batch,
                      bits=bits_s, capacities=caps_s)
    t = synth_trace(TINY, cfg)
    assert (t.bits == t.bits[:, :, :1]).all()  # one bit-width per token and layer
    for step in range(t.num_steps):
        a, b = t.token_range(step)
        n = b - a
        for layer in range(t.layers):
            chosen = t.bits[a:b, layer, 0]
            assert set(chosen.tolist()) <= set(bits)
            for bw, tenth in zip(bits, tenths, strict=True):
                cap = -(-tenth * n // 10)  # ceil(c * n) in exact integer arithmetic
                assert (chosen == bw).sum() <= cap, (step, layer, bw)


def test_capacities_balance_a_big_step() -> None:
    t = synth_trace(TINY, SynthConfig(prefill_tokens=100, decode_steps=0, batch=10))
    for layer in range(t.layers):
        counts = np.bincount(t.bits[:, layer, 0], minlength=5)[2:]
        assert counts.tolist() == [300, 400, 300]  # caps sum exactly to the 1000 tokens


def test_no_bits_leaves_unknown() -> None:
    t = synth_trace(TINY, SynthConfig(bits="", capacities="", decode_steps=4, prefill_tokens=2))
    assert not t.bits.any()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**20), batch=st.integers(1, 4))
def test_same_seed_same_trace(seed: int, batch: int) -> None:
    cfg = SynthConfig(seed=seed, prefill_tokens=6, decode_steps=5, batch=batch)
    a, b = synth_trace(WIDE, cfg), synth_trace(WIDE, cfg)
    for name in ("phase_codes", "step_offsets", "experts", "weights", "bits"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert a.meta == b.meta and a.meta["generator"]["seed"] == seed
    other = synth_trace(WIDE, SynthConfig(seed=seed + 1, prefill_tokens=6, decode_steps=5,
                                          batch=batch))
    assert not np.array_equal(a.experts, other.experts)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**20), batch=st.integers(1, 4), prefill=st.integers(0, 5))
def test_locality_one_reuses_previous_experts(seed: int, batch: int, prefill: int) -> None:
    cfg = SynthConfig(seed=seed, prefill_tokens=prefill, decode_steps=6, batch=batch,
                      locality=1.0, cross_layer=0.5)
    t = synth_trace(WIDE, cfg)
    first_decode = 1 if prefill else 0
    for step in range(first_decode, t.num_steps):
        a, b = t.token_range(step)
        assert b - a == batch
        if step > first_decode:
            prev = t.experts[a - batch:a]  # previous decode step, same sequence order
        elif prefill:
            prev = t.experts[prefill - 1::prefill][:batch]  # each sequence's last prompt token
        else:
            continue
        assert np.array_equal(t.experts[a:b], prev)


def test_locality_zero_rarely_repeats() -> None:
    t = synth_trace(WIDE, SynthConfig(prefill_tokens=0, decode_steps=400, locality=0.0,
                                      cross_layer=0.0, zipf=0.0))
    same = (np.sort(t.experts[1:], axis=2) == np.sort(t.experts[:-1], axis=2)).all(axis=2)
    assert same.mean() < 0.05  # C(16,4) = 1820 sets: exact repeats are rare


def test_cross_layer_one_follows_maps() -> None:
    cfg = SynthConfig(seed=5, prefill_tokens=20, decode_steps=20, locality=0.0, cross_layer=1.0)
    t = synth_trace(WIDE, cfg)
    maps = layer_maps(WIDE, cfg)
    for layer in range(WIDE.layers - 1):
        mapped = np.sort(maps[layer][t.experts[:, layer, :]], axis=1)
        assert np.array_equal(mapped, np.sort(t.experts[:, layer + 1, :], axis=1))


def _top_share(spec: ModelSpec, cfg: SynthConfig, ranked_by: SynthConfig | None = None
               ) -> np.ndarray:
    """Per layer, the share of token-slots routed to the layer's most popular expert
    (as ranked by `ranked_by`'s popularity: at zipf 0 every expert ties)."""
    t = synth_trace(spec, cfg)
    top = layer_popularity(spec, ranked_by or cfg).argmax(axis=1)
    return (t.experts == top[None, :, None]).sum(axis=(0, 2)) / (t.num_tokens * spec.top_k)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), z=st.floats(0.0, 3.0), dz=st.floats(0.05, 2.0),
       locality=st.sampled_from([0.0, 0.5]))
def test_zipf_skew_grows_top_share(seed: int, z: float, dz: float, locality: float) -> None:
    def cfg(zipf: float) -> SynthConfig:
        return SynthConfig(seed=seed, prefill_tokens=50, decode_steps=50, zipf=zipf,
                           locality=locality, cross_layer=0.0)

    # same seed, same Gumbel noise: raising zipf only lowers the other experts' keys
    hi = cfg(z + dz)
    assert (_top_share(TINY, hi) >= _top_share(TINY, cfg(z), ranked_by=hi)).all()


def test_zipf_levels() -> None:
    flat = _top_share(TINY, SynthConfig(prefill_tokens=400, decode_steps=0, zipf=0.0,
                                        locality=0.0, cross_layer=0.0))
    steep = _top_share(TINY, SynthConfig(prefill_tokens=400, decode_steps=0, zipf=3.0,
                                         locality=0.0, cross_layer=0.0))
    assert np.allclose(flat, 1 / 8, atol=0.04)  # uniform: each expert gets 1/E of the slots
    assert (steep > 0.45).all()  # near the 1/k ceiling: the top expert is in almost every top-k


def test_weights_are_sorted_softmax() -> None:
    t = synth_trace(WIDE, SynthConfig(decode_steps=10, prefill_tokens=3))
    assert np.allclose(t.weights.sum(axis=2), 1.0, atol=1e-5)
    assert (np.diff(t.weights, axis=2) <= 0).all()


@pytest.mark.parametrize("field,kwargs", [
    ("capacities", dict(capacities="0.3,0.3,0.3")),
    ("capacities", dict(capacities="0.5,0.5")),
    ("bits", dict(bits="2,2,4")),
    ("bits", dict(bits="0,3,4")),
    ("bits", dict(bits="two")),
    ("locality", dict(locality=1.5)),
    ("batch", dict(batch=0)),
    ("decode_steps", dict(prefill_tokens=0, decode_steps=0)),
])
def test_config_errors_name_field(field: str, kwargs: dict) -> None:
    with pytest.raises(UserError, match=f"field '{field}'"):
        SynthConfig(**kwargs)


def test_step_layout() -> None:
    t = synth_trace(TINY, SynthConfig(prefill_tokens=7, decode_steps=3, batch=2))
    assert [t.phase(s) for s in range(t.num_steps)] == ["prefill"] + ["decode"] * 3
    assert [t.tokens(s) for s in range(t.num_steps)] == [14, 2, 2, 2]
    assert math.isclose(float(t.weights[0, 0].sum()), 1.0, rel_tol=1e-6)


def test_a_bar_advances_by_every_stage_and_changes_nothing() -> None:
    from d2moe.core.spec import load_spec
    from d2moe.traces.synth import synth_units
    from tests.conftest import CountingBar

    spec, cfg = load_spec("tiny"), SynthConfig(decode_steps=5, batch=2)
    bar = CountingBar()
    with_bar = synth_trace(spec, cfg, bar)
    assert bar.n == synth_units(spec) == spec.layers + 2
    plain = synth_trace(spec, cfg)
    assert np.array_equal(with_bar.experts, plain.experts)
    assert np.array_equal(with_bar.weights, plain.weights)
    assert np.array_equal(with_bar.bits, plain.bits)


@pytest.mark.parametrize("zipf", [1e6, 50.5, math.inf, math.nan, -0.1])
def test_zipf_outside_0_to_50_is_refused(zipf: float) -> None:
    with pytest.raises(UserError, match=r"field 'zipf': must be in \[0, 50\]"):
        SynthConfig(zipf=zipf)


def test_zipf_at_its_bound_keeps_the_draw_finite_and_ranked() -> None:
    """At zipf 50 no weight underflows to 0 (no log 0 warning), so a fresh token's top-k are
    the layer's top-k ranks, not ties broken by expert id."""
    spec = ModelSpec(name="many", layers=2, experts=4096, top_k=4, hidden=64, ffn=64, heads=1,
                     kv_heads=1, vocab=16)
    cfg = SynthConfig(zipf=50.0, prefill_tokens=8, decode_steps=0, locality=0.0,
                      cross_layer=0.0, bits="")
    with np.errstate(all="raise"):
        t = synth_trace(spec, cfg)
        ranks = np.argsort(-layer_popularity(spec, cfg), axis=1, kind="stable")[:, :4]
    for layer in range(spec.layers):
        assert set(t.experts[:, layer, :].ravel()) == set(ranks[layer])
