"""Prefetch by predicted heat: guess the next layer's experts from the transitions seen so far.

Beyond D2MoE (which loads on demand): after planning layer l, the policy queues loads for the
experts layer l+1 will probably need, behind l's own loads, so they stream while l computes.
The predictor counts, per layer pair (l, l+1), how often expert e at l is followed by f at
l+1 (token-weighted: a step's co-occurrence t_e * t_f / T, exact for one token per step), and
predicts P(f | layer l's demands) = sum_e t_e * P(f | e) / sum_e t_e. Experts with a predicted
probability of at least `min_prob` are prefetched, most likely first, at most as many as
layer l needed. After the last layer it predicts layer 0 of the next step. Prefetchers are
registered by name in `PREFETCHERS`, which a preset's `prefetch` field names.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

from d2moe.core.jobs import Demand, ExpertKey
from d2moe.policies.registry import Registry
from d2moe.policies.stats import ExpertStats


class Prefetcher:
    """Guesses the next layer's experts; this base class (`none`) never guesses, so every
    load is on demand. Subclasses override `observe` and `predict`."""

    name = "none"

    def observe(self, layer: int, demands: Sequence[Demand]) -> None:
        """Record layer `layer`'s demands (call in execution order)."""

    def predict(self, layer: int, demands: Sequence[Demand]) -> list[tuple[ExpertKey, float]]:
        """Likely experts of the layer after `layer` as (key, probability), most likely first."""
        return []


class HeatPredictor(Prefetcher):
    """Online first-order transition counts between consecutive layers."""

    name = "heat"

    def __init__(self, min_prob: float = 0.3) -> None:
        self.min_prob = min_prob
        # (layer, e) -> {f: weight of e at `layer` followed by f at the next layer}
        self.counts: dict[tuple[int, int], dict[int, float]] = defaultdict(
            lambda: defaultdict(float))
        self.layers = 0  # learned: highest layer seen + 1
        self._prev: tuple[int, dict[int, int]] | None = None  # last layer's (layer, tokens)

    def observe(self, layer: int, demands: Sequence[Demand]) -> None:
        now: dict[int, int] = defaultdict(int)
        for d in demands:
            now[d.key.expert] += d.tokens
        self.layers = max(self.layers, layer + 1)
        if self._prev is not None and self._follows(self._prev[0], layer):
            prev = self._prev[1]
            total = sum(now.values()) or 1
            for e, te in prev.items():
                row = self.counts[(self._prev[0], e)]
                for f, tf in now.items():
                    row[f] += te * tf / total
        self._prev = (layer, dict(now))

    def _follows(self, a: int, b: int) -> bool:
        return b == a + 1 or (b == 0 and a == self.layers - 1)

    def predict(self, layer: int, demands: Sequence[Demand]) -> list[tuple[ExpertKey, float]]:
        if self.layers < 2:
            return []
        nxt = 0 if layer == self.layers - 1 else layer + 1
        score: dict[int, float] = defaultdict(float)
        total = 0
        for d in demands:
            row = self.counts.get((layer, d.key.expert))
            total += d.tokens
            if not row:
                continue
            norm = sum(row.values())
            for f, w in row.items():
                score[f] += d.tokens * w / norm
        if not total:
            return []
        limit = len({d.key.expert for d in demands})
        ranked = sorted(((p / total, f) for f, p in score.items() if p / total >= self.min_prob),
                        key=lambda t: (-t[0], t[1]))[:limit]
        return [(ExpertKey(nxt, f), p) for p, f in ranked]


class PrefetchOptions(Protocol):
    """The prefetcher's settings in a policy's config (`presets.PolicyConfig`)."""

    prefetch_min_prob: float


# name -> factory(options, stats): a new prefetcher is one class and one registration here
PREFETCHERS: Registry[Prefetcher] = Registry("prefetcher")


@PREFETCHERS.register("none")
def _none(options: PrefetchOptions, stats: ExpertStats | None) -> Prefetcher:
    """loads on demand only"""
    return Prefetcher()


@PREFETCHERS.register("heat")
def _heat(options: PrefetchOptions, stats: ExpertStats | None) -> Prefetcher:
    """the next layer's likely experts by learned transitions (at least prefetch_min_prob)"""
    return HeatPredictor(options.prefetch_min_prob)
