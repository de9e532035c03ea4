"""Prefetch by predicted heat: guess the next layer's experts from the transitions seen so far.

Beyond D2MoE (which loads on demand): before planning layer l, the policy asks for the experts
layer l+1 will probably need; the plan spares them and queues loads for them behind l's own
loads, so they stream while l computes. After the last layer it predicts layer 0 of the next
step. Prefetchers are registered by name in `PREFETCHERS`, which a preset's `prefetch` field
names.

The heat predictor's number is the probability that the next layer needs expert f (routes at
least one token to it), so `min_prob` means the same for any top-k. `observe` sees a layer as
its demands: tokens per expert (t_e), not each token's experts. Per layer pair (l, l+1) it
counts, over executions, n(e) = sum t_e (tokens routed to e at l) and

    a(e, f) = sum t_e t_f / S       (S = sum_f t_f: the routed slots of that execution of l+1)
    P(f | e) = k a(e, f) / n(e)     (k: top-k, learned as the fewest experts that one
                                     execution of a layer needed; exact after one decode step)

the share of e's tokens routed to f at l+1. As S = k T (T tokens, k experts each),
k t_e t_f / S = t_e t_f / T: exact for one token per step (decode, the case that matters:
t = 1 and P(f | e) is the share of e's executions followed by f); for a step of many tokens it
assumes that e's tokens spread over l+1's experts like all of the step's tokens. From layer
l's demands: the per-token mean p = sum_e t_e P(f | e) / sum_e t_e over the e with n(e) > 0
(an expert never seen at l gives no evidence), then

    P(f needed at l+1) = 1 - (1 - p)^T,    T = S_l / k   (1 in decode: the prediction is p)

taking the tokens as independent. For one token, p is the mean of k estimates of one event:
1 when each of the token's experts is always followed by f (any k), and averaged over
executions it is f's marginal chance of being needed (sum_e P(e) P(f | e) / k = P(f)); one
token's predictions sum to k, not to 1.

Choices, measured on the synthetic traces of docs/results/evaluation.md (decode steps,
`benchmarks/prefetch_use.py --calibration`): the mean is calibrated within 4 points in the
bins from 0.1 to 0.7 (about 90% of predictions; the 1% above 0.7 are over-confident, as they
rest on few counts) and has the lowest Brier score and log loss. Combining P(f | e) by the
token's most confident expert, or as independent causes above f's base rate (noisy-OR), is 1
when a single expert of the token is always followed by f whatever its companions (the mean
is not: it is under-confident there), but over-confident by 4-12 points between 0.3 and 0.7
on these traces. Counting executions (P(f | e) = executions of e followed by f / executions
of e: the same P(f | e) on one-token steps) is badly over-confident: the prompt's step
needs nearly every expert at every layer, so each of its pairs counts as "always followed"
(predictions of 0.9-1.0 came true 34-42% of the time); in a(e, f) the prompt weighs
t_e t_f / T, its own mix. The estimator until 2026-11-24, a(e, f) / n(e) without the factor
k, summed to 1 over l+1's experts: an expert needed by every token scored 1/k, so 0.3 was out
of reach for top-4. Experts predicted at `min_prob` or more (presets: `prefetch_min_prob`,
default 0.9) are prefetched, most likely first, at most as many as layer l needed.
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
    """Online first-order transition counts between consecutive layers (module docstring)."""

    name = "heat"

    def __init__(self, min_prob: float = 0.9) -> None:
        self.min_prob = min_prob
        # (layer, e) -> {f: a(e, f) = sum t_e t_f / S of e at `layer` then f at the next layer}
        self.counts: dict[tuple[int, int], dict[int, float]] = defaultdict(
            lambda: defaultdict(float))
        self.tokens: dict[tuple[int, int], int] = defaultdict(int)  # (layer, e) -> n(e)
        self.top_k = 0  # learned: the fewest experts one execution of a layer needed (0: none)
        self.layers = 0  # learned: highest layer seen + 1
        self._prev: tuple[int, dict[int, int]] | None = None  # last layer's (layer, tokens)

    def observe(self, layer: int, demands: Sequence[Demand]) -> None:
        now = _tokens(demands)
        self.layers = max(self.layers, layer + 1)
        if now:
            self.top_k = min(self.top_k or len(now), len(now))
        if self._prev is not None and now and self._follows(self._prev[0], layer):
            pl, prev = self._prev
            slots = sum(now.values())
            for e, te in prev.items():
                self.tokens[(pl, e)] += te
                row = self.counts[(pl, e)]
                for f, tf in now.items():
                    row[f] += te * tf / slots
        self._prev = (layer, now)

    def _follows(self, a: int, b: int) -> bool:
        return b == a + 1 or (b == 0 and a == self.layers - 1)

    def probabilities(self, layer: int, demands: Sequence[Demand]) -> dict[int, float]:
        """P(the layer after `layer` needs f | these demands), for every f seen to follow."""
        tokens, k = _tokens(demands), self.top_k
        score: dict[int, float] = defaultdict(float)
        total = 0
        for e, t in tokens.items():
            n = self.tokens.get((layer, e), 0)
            if not n:
                continue  # never seen at this layer: no evidence either way
            total += t
            for f, a in self.counts[(layer, e)].items():
                score[f] += t * min(1.0, k * a / n)  # > 1 only while the learned k is high
        if not total:
            return {}
        n_tok = max(1.0, sum(tokens.values()) / k)  # T: tokens in this execution
        return {f: 1.0 - (1.0 - min(1.0, s / total)) ** n_tok for f, s in score.items()}

    def predict(self, layer: int, demands: Sequence[Demand]) -> list[tuple[ExpertKey, float]]:
        if self.layers < 2:
            return []
        nxt = 0 if layer == self.layers - 1 else layer + 1
        prob = self.probabilities(layer, demands)
        limit = len({d.key.expert for d in demands})
        ranked = sorted(((p, f) for f, p in prob.items() if p >= self.min_prob),
                        key=lambda t: (-t[0], t[1]))[:limit]
        return [(ExpertKey(nxt, f), p) for p, f in ranked]


def _tokens(demands: Sequence[Demand]) -> dict[int, int]:
    """Tokens per expert id (an expert may have a demand per bit-width)."""
    out: dict[int, int] = defaultdict(int)
    for d in demands:
        if d.tokens:
            out[d.key.expert] += d.tokens
    return dict(out)


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
