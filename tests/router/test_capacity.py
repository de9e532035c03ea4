"""Capacities: exact counts, the overflow rule, decode windows, determinism."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from d2moe.core.errors import UserError  # noqa: E402
from d2moe.router.capacity import (  # noqa: E402
    CapacityWindow,
    assign,
    capacity_counts,
    check_capacities,
    parse_bits,
)


@pytest.mark.parametrize("caps", [(0.3, 0.4, 0.3), (0.25, 0.25, 0.25, 0.25), (0.5, 0.5, 0.0)])
@pytest.mark.parametrize("tokens", [1, 7, 64, 1000, 4080])
def test_counts_sum_to_the_batch_and_never_exceed_floor_plus_one(caps, tokens):
    n = capacity_counts(caps, tokens)
    assert sum(n) == tokens
    for c, k in zip(caps, n, strict=True):
        assert int(c * tokens) <= k <= int(c * tokens) + 1
        assert c > 0 or k == 0


@pytest.mark.parametrize("seed", range(5))
def test_assignment_fills_every_width_exactly_and_overflow_falls_to_the_next_preference(seed):
    gen = torch.Generator().manual_seed(seed)
    t, caps = 1000, (0.3, 0.4, 0.3)
    probs = torch.softmax(torch.randn(t, 3, generator=gen) * 2 + torch.tensor([0, 0, 1.5]), -1)
    idx = assign(probs, capacity_counts(caps, t))
    counts = torch.bincount(idx, minlength=3).tolist()
    assert counts == capacity_counts(caps, t) == [300, 400, 300]
    pref = torch.argsort(-probs, dim=1, stable=True)
    full = [c >= n for c, n in zip(counts, capacity_counts(caps, t), strict=True)]
    for tok in range(t):
        rank = pref[tok].tolist().index(int(idx[tok]))
        # every width this token preferred more is full (it was over capacity there)
        assert all(full[w] for w in pref[tok, :rank].tolist())
    # the tokens that got their first choice 4 bits are the most confident for it
    first4 = (pref[:, 0] == 2)
    got4 = idx == 2
    assert probs[got4, 2].min() >= probs[first4 & ~got4, 2].max()
    assert torch.equal(assign(probs, capacity_counts(caps, t)), idx)  # deterministic


def test_unlimited_capacities_give_every_token_its_first_choice():
    probs = torch.softmax(torch.randn(200, 3), -1)
    idx = assign(probs, capacity_counts((1.0, 1.0, 1.0), 200))
    assert torch.equal(idx, probs.argmax(-1))


def test_decode_calls_share_a_window_with_exact_shares():
    win = CapacityWindow((0.25, 0.5, 0.25), window=8)
    got = [int(win.place(0, torch.tensor([[0.1, 0.1, 0.8]]))) for _ in range(16)]
    # every token prefers the widest: 2 per window of 8 get it, then 4 the middle, 2 the least
    for w in (got[:8], got[8:]):
        assert sorted(w) == [0, 0, 1, 1, 1, 1, 2, 2]
    assert got[:2] == [2, 2]
    win.reset()
    assert int(win.place(0, torch.tensor([[0.1, 0.1, 0.8]]))) == 2


def test_bad_capacities_and_bits_are_user_errors():
    with pytest.raises(UserError, match="sum to >= 1"):
        check_capacities((0.3, 0.3, 0.3), 3)
    with pytest.raises(UserError, match="one capacity per bit-width"):
        check_capacities((0.5, 0.5), 3)
    with pytest.raises(UserError, match="increasing"):
        parse_bits("4,3")
    assert parse_bits("5-8") == (5, 6, 7, 8)


@pytest.mark.parametrize("seed", range(3))
def test_numpy_and_torch_inputs_run_the_same_rule(seed):
    """The simulator re-places recorded preferences (numpy) with the router's code (torch)."""
    import numpy as np

    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(300, 3, generator=gen), -1)
    probs[::7] = probs[0]  # ties: the earlier token wins in both
    counts = capacity_counts((0.3, 0.4, 0.3), 300)
    idx_t = assign(probs, counts)
    idx_n = assign(probs.numpy(), counts)
    assert idx_t.dtype == torch.long and isinstance(idx_n, np.ndarray)
    assert idx_n.tolist() == idx_t.tolist()
    wt, wn = CapacityWindow((0.3, 0.4, 0.3), 8), CapacityWindow((0.3, 0.4, 0.3), 8)
    for t in range(0, 300, 3):  # calls of 3 rows share the running window
        assert wt.place(1, probs[t:t + 3]).tolist() == wn.place(1, probs[t:t + 3].numpy()).tolist()
