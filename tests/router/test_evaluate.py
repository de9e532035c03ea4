"""`d2moe eval ppl --router`'s numbers: one width scores as the dense model dequantized at it,
random allocation holds the shares it is given, and the report's random line runs at the
router's own average bits."""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from d2moe.eval.ppl import dense_backend, heldout_ids  # noqa: E402
from d2moe.model.load import load_tiny  # noqa: E402
from d2moe.model.perplexity import perplexity  # noqa: E402
from d2moe.router.evaluate import (  # noqa: E402
    RoutedPpl,
    describe,
    random_ppl,
    router_report,
    uniform_ppl,
)
from d2moe.router.gate import BitGate  # noqa: E402
from d2moe.router.store import save_router  # noqa: E402

KW = {"ctx": 64, "batch": 4}  # 512 bytes: 8 windows, 2 forwards of 256 tokens


@pytest.fixture(scope="module")
def scored():
    model, spec = load_tiny()
    return model, spec, heldout_ids("tiny", spec, 1)[:512]


def test_one_width_scores_as_the_dense_model_dequantized_at_it(scored, widths):
    model, spec, ids = scored
    ppl = {}
    for k in (0, 2):
        got = uniform_ppl(model, ids, widths, k, **KW)
        dense = dense_backend(spec, lambda key, k=k: getattr(widths, key[2])[k, key[0], key[1]])
        want = perplexity(model, ids, backend=dense, **KW)
        assert got.ppl == pytest.approx(want.ppl, rel=1e-5)
        assert got.tokens_scored == want.tokens_scored == 8 * 63
        assert got.avg_bits == widths.bits[k] and got.label == f"uniform {widths.bits[k]}"
        one_hot = tuple(float(i == k) for i in range(3))
        assert got.shares == (one_hot,) * spec.layers
        ppl[k] = got.ppl
    assert ppl[0] > ppl[2]  # 2 bits score worse than 4


@pytest.mark.parametrize("per_slot", [False, True])
def test_random_allocation_holds_each_layers_shares_and_is_seeded(scored, widths, per_slot):
    model, spec, ids = scored
    shares = tuple(((0.25, 0.5, 0.25), (0.5, 0.25, 0.25))[layer % 2]
                   for layer in range(spec.layers))
    got = random_ppl(model, ids, widths, shares, seed=1, per_slot=per_slot, **KW)
    assert got.shares == shares  # 256 (or 256 * k) rows a forward: exact counts
    want_bits = sum(2 * a + 3 * b + 4 * c for a, b, c in shares) / spec.layers
    assert got.avg_bits == pytest.approx(want_bits)
    assert random_ppl(model, ids, widths, shares, seed=1, per_slot=per_slot,
                      **KW).ppl == got.ppl
    other = random_ppl(model, ids, widths, shares, seed=2, per_slot=per_slot, **KW)
    assert other.shares == shares and other.ppl != got.ppl  # another placement, same shares


def test_describe_averages_the_layers_shares():
    r = RoutedPpl("router r", 9.87654, 2.95, ((0.2, 0.5, 0.3), (0.4, 0.3, 0.3)), 100)
    assert describe(r, (2, 3, 4)) == ("router r: perplexity 9.8765 at 2.950 average bits "
                                      "(2: 30.0%, 3: 40.0%, 4: 30.0%)")


def test_report_compares_the_router_with_random_at_its_shares_and_each_width(store, tmp_path):
    _, spec = load_tiny()
    path = tmp_path / "r"
    save_router(path, BitGate(spec.layers, spec.hidden, 3, seed=5, slots=2),
                {"bits": [2, 3, 4], "capacities": [0.3, 0.4, 0.3], "alpha": 0.0, "window": 4,
                 "layers": spec.layers, "hidden": spec.hidden, "store": str(store),
                 "slots": 2})
    lines = router_report("tiny", "", str(path), heldout_kib=1, **KW)  # store from router.json
    labels = [line.split(":")[0] for line in lines]
    assert labels == [f"router {path}", "random", "uniform 2", "uniform 3", "uniform 4"]
    tail = [re.search(r"at ([\d.]+) average bits (\(.*\))$", line).groups() for line in lines]
    assert tail[1] == tail[0]  # random: the router's measured shares, so its average bits
    assert [t[0] for t in tail[2:]] == ["2.000", "3.000", "4.000"]
