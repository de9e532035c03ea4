"""The arithmetic of expert statistics, in numpy: routing importance and cosine similarity.

Shared by the calibration run on a real model (`calibration.py`) and the trace proxy
(`from_trace.py`), so both define importance the same way.
"""

from __future__ import annotations

import numpy as np


class RoutingTally:
    """Per-layer routed-token counts and router-weight sums, accumulated batch by batch."""

    def __init__(self, layers: int, experts: int) -> None:
        self.counts = np.zeros((layers, experts), dtype=np.int64)  # [L, E] routed slots
        self.weight = np.zeros((layers, experts), dtype=np.float64)  # [L, E] Σ router weight
        self.tokens = np.zeros(layers, dtype=np.int64)  # [L] tokens seen

    def add(self, layer: int, ids: np.ndarray, weights: np.ndarray) -> None:
        """One batch of a layer's routing: ids and weights [T, k]."""
        ids = np.asarray(ids, dtype=np.int64)
        E = self.counts.shape[1]
        flat_w = np.asarray(weights, dtype=np.float64).reshape(-1)
        self.counts[layer] += np.bincount(ids.reshape(-1), minlength=E)[:E]
        self.weight[layer] += np.bincount(ids.reshape(-1), weights=flat_w, minlength=E)[:E]
        self.tokens[layer] += ids.shape[0]

    def importance(self) -> np.ndarray:
        """[L, E] in [0, 1]: routed-token share x mean router weight, the layer's max = 1."""
        return importance_from(self.counts, self.weight, self.tokens)


def importance_from(counts: np.ndarray, weight_sums: np.ndarray,
                    tokens: np.ndarray) -> np.ndarray:
    """Importance [L, E] from routed slots, router-weight sums [L, E] and tokens per layer [L].

    Per expert: share = routed tokens / tokens, mean weight = weight sum / routed tokens, and
    importance = share x mean weight (= the expert's mean router weight per token), divided by
    the layer's largest so the most important expert of each layer is 1. An expert never
    routed to is 0; a layer with no routing at all is all 1 (nothing to rank).
    """
    counts = np.asarray(counts, dtype=np.float64)
    share = counts / np.maximum(np.asarray(tokens, dtype=np.float64), 1)[:, None]
    mean_w = np.divide(weight_sums, counts, out=np.zeros_like(counts), where=counts > 0)
    raw = share * mean_w  # [L, E]
    top = raw.max(axis=1, keepdims=True)
    return np.divide(raw, top, out=np.ones_like(raw), where=top > 0)


def cosine_gram(gram: np.ndarray) -> np.ndarray:
    """A Gram matrix [..., E, E] of vectors -> their cosines, clipped to [-1, 1], diagonal 1.

    A zero vector (an expert with no signal) has cosine 0 with every other one.
    """
    gram = np.asarray(gram, dtype=np.float64)
    norm = np.sqrt(np.clip(np.diagonal(gram, axis1=-2, axis2=-1), 0, None))  # [..., E]
    denom = norm[..., :, None] * norm[..., None, :]
    cos = np.divide(gram, denom, out=np.zeros_like(gram), where=denom > 0)
    cos = np.clip(cos, -1.0, 1.0)
    idx = np.arange(gram.shape[-1])
    cos[..., idx, idx] = 1.0
    return cos


def mean_token_cosine(outputs: np.ndarray) -> np.ndarray:
    """outputs [E, T, D] (every expert on the same T tokens) -> [E, E] with entry (e, f) the
    mean over tokens of cosine(out_e[t], out_f[t]); symmetric, clipped, diagonal 1."""
    out = np.asarray(outputs, dtype=np.float64)
    norm = np.linalg.norm(out, axis=2, keepdims=True)  # [E, T, 1]
    unit = np.divide(out, norm, out=np.zeros_like(out), where=norm > 0)
    sim = np.einsum("etd,ftd->ef", unit, unit) / max(out.shape[1], 1)
    sim = np.clip((sim + sim.T) / 2, -1.0, 1.0)
    np.fill_diagonal(sim, 1.0)
    return sim


def off_diagonal_mean(sim: np.ndarray) -> float:
    """Mean of the off-diagonal entries of one layer's [E, E] similarity (0 when E = 1)."""
    sim = np.asarray(sim, dtype=np.float64)
    E = sim.shape[0]
    if E < 2:
        return 0.0
    return float((sim.sum() - np.trace(sim)) / (E * (E - 1)))
