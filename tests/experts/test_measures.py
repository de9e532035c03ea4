"""The shared arithmetic: importance from routing, cosine similarity matrices."""

from __future__ import annotations

import numpy as np
import pytest

from d2moe.experts.measures import (
    RoutingTally,
    cosine_gram,
    importance_from,
    mean_token_cosine,
    off_diagonal_mean,
)


def test_importance_is_share_times_mean_weight_normalised_per_layer():
    tally = RoutingTally(layers=2, experts=3)
    tally.add(0, np.array([[0, 1], [0, 2]]), np.array([[0.75, 0.25], [0.5, 0.5]]))
    tally.add(1, np.array([[2, 1]]), np.array([[0.6, 0.4]]))
    imp = tally.importance()
    # layer 0: share x mean weight = (2/2 x 0.625, 1/2 x 0.25, 1/2 x 0.5) = (1.25, .25, .5)/2
    np.testing.assert_allclose(imp[0], [1.0, 0.2, 0.4])
    np.testing.assert_allclose(imp[1], [0.0, 0.4 / 0.6, 1.0])  # expert 0 never routed: 0
    assert tally.tokens.tolist() == [2, 1]


def test_importance_of_a_layer_without_routing_is_all_one():
    imp = importance_from(np.zeros((1, 4)), np.zeros((1, 4)), np.zeros(1))
    assert imp.tolist() == [[1.0] * 4]


def test_mean_token_cosine_symmetric_diagonal_one_in_range():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 16))
    outs = np.stack([base, 2 * base, -base, rng.normal(size=(50, 16))])  # [E=4, T, D]
    sim = mean_token_cosine(outs)
    assert sim.shape == (4, 4)
    np.testing.assert_allclose(sim, sim.T)
    assert np.all(np.diag(sim) == 1.0) and sim.min() >= -1 and sim.max() <= 1
    assert sim[0, 1] == pytest.approx(1.0)  # scaled: same direction on every token
    assert sim[0, 2] == pytest.approx(-1.0)
    assert abs(sim[0, 3]) < 0.3  # unrelated random outputs
    assert off_diagonal_mean(np.eye(3)) == 0.0


def test_cosine_gram_zero_vector_and_clipping():
    vecs = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    cos = cosine_gram(vecs @ vecs.T)
    assert cos[0, 1] == pytest.approx(2 ** -0.5)
    assert cos[2].tolist() == [0.0, 0.0, 1.0]  # no signal: unlike everything but itself
