"""Which resident experts to give up when the budget is short: LRU, LFU, hottest-first
(a long memory, clocked in layers, and a short one, clocked in steps), and an online choice
among the two and LRU (and in ghost.py, one by replaying the pool).

A residency policy only keeps statistics and scores experts (lower = colder = give up
first); the planner decides how much to free and whether to drop planes or evict whole.
Scores are plain dict lookups so that ranking stays cheap on the planner's hot path.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from d2moe.core.jobs import Demand, ExpertKey
from d2moe.policies.registry import Registry

if TYPE_CHECKING:
    from d2moe.policies.view import Sizes


class Residency(Protocol):
    """Keeps usage statistics and scores experts for eviction.

    `scores` maps an expert to how much to keep it (the lowest is evicted first; unseen
    experts score 0). It is a dict, not a method, so the planner ranks at C speed.
    """

    name: str
    scores: defaultdict[ExpertKey, float]

    @property
    def rescales(self) -> int:
        """How many times every score changed at once: the planner then re-indexes the
        resident experts, whose scores it keeps from their last change."""

    def observe(self, demands: Sequence[Demand]) -> None:
        """Record one layer's demands (called once per planned layer, in order)."""

    def observe_pool(self, sizes: Sizes, budget_bytes: int, plane_drop: bool) -> None:
        """The pool the planner fits plans into (told before its first plan, and again if
        it changes); a rule that replays the pool uses it (ghost.py), the others ignore it."""


RESIDENCY: Registry[Residency] = Registry("residency")


@RESIDENCY.register("lru")
class Lru:
    """Least recently used goes first."""

    name = "lru"
    rescales = 0

    def __init__(self) -> None:
        self.tick = 0
        self.scores: defaultdict[ExpertKey, float] = defaultdict(float)  # last use

    def observe_pool(self, sizes: Sizes, budget_bytes: int, plane_drop: bool) -> None:
        """(not used)"""

    def observe(self, demands: Sequence[Demand]) -> None:
        self.tick += 1
        for d in demands:
            self.scores[d.key] = self.tick


@RESIDENCY.register("lfu")
class Lfu:
    """Fewest routed tokens so far goes first."""

    name = "lfu"
    rescales = 0

    def __init__(self) -> None:
        self.scores: defaultdict[ExpertKey, float] = defaultdict(float)  # tokens so far

    def observe_pool(self, sizes: Sizes, budget_bytes: int, plane_drop: bool) -> None:
        """(not used)"""

    def observe(self, demands: Sequence[Demand]) -> None:
        for d in demands:
            self.scores[d.key] += d.tokens


@RESIDENCY.register("hottest")
class Hottest:
    """Keep the hottest (D2MoE's "+Budget": the most frequently used experts stay resident
    across tokens): an exponentially decayed token count, coldest goes first.

    heat(now) = sum over past demands of tokens * decay**(now - then). Stored scaled by
    decay**-now (one factor for all experts), so order needs no per-expert decay; the scale
    is renormalised before it overflows (every score at once: `rescales`).
    """

    name = "hottest"

    def __init__(self, half_life_layers: float = 256.0) -> None:
        self.growth = 0.5 ** (-1.0 / half_life_layers)  # 1/decay per layer
        self.scale = 1.0  # decay**-tick, renormalised
        self.scores: defaultdict[ExpertKey, float] = defaultdict(float)  # heat * scale
        self.rescales = 0

    def observe(self, demands: Sequence[Demand]) -> None:
        self.scale *= self.growth
        if self.scale > 1e150:
            for k in self.scores:
                self.scores[k] /= self.scale
            self.scale = 1.0
            self.rescales += 1
        for d in demands:
            self.scores[d.key] += d.tokens * self.scale

    def observe_pool(self, sizes: Sizes, budget_bytes: int, plane_drop: bool) -> None:
        """(not used)"""

    def heat_now(self, key: ExpertKey) -> float:
        """The decayed token count itself (for reports and tests)."""
        return self.scores.get(key, 0.0) / self.scale


@RESIDENCY.register("hot-recent")
class HotRecent(Hottest):
    """Keep the hottest over a short memory: the decayed token count of `Hottest`, but the
    heat halves every `half_life_steps` decode steps whatever the model's depth.

    A step begins when a layer's demands come at a layer no deeper than the last one's
    (planning goes layer 0, 1, ... once per step). `Hottest`'s clock is layers: 256 of them
    are 8 steps of a 32-layer model, 64 of the 4-layer tiny one. Simulated on synthetic
    routing, 2 steps lost less than the long memory where tokens reuse their predecessors'
    experts (0.75x FIFO at worst against 0.62x) and gained less where they do not
    (docs/results/evaluation.md, "HEBF's residency memory").
    """

    name = "hot-recent"

    def __init__(self, half_life_steps: float = 2.0) -> None:
        super().__init__(half_life_layers=half_life_steps)  # its clock ticks once per step
        self.last_layer = -1

    def observe(self, demands: Sequence[Demand]) -> None:
        if not demands:
            return
        layer = demands[0].key.layer
        if layer <= self.last_layer:  # a new step: age every heat by one step
            super().observe(())
        self.last_layer = layer
        scale = self.scale
        for d in demands:
            self.scores[d.key] += d.tokens * scale


@RESIDENCY.register("hot-adaptive")
class HotAdaptive:
    """Keep what whichever of three memories, the hottest over a long one (`Hottest`), over
    a short one (`HotRecent`) or the most recent (`Lru`), has lately predicted demand best.

    Before a layer's demands are counted, each rule rates how high it ranked the experts now
    asked for among the layer's experts seen so far (the percentile: 1 = its hottest, ties
    half); an exponential average over layers (weight `alpha`) keeps each rule's record, and
    the scores in use are the best rule's. Long wins where routing has little locality,
    recency where tokens reuse their predecessors' experts (docs/results/evaluation.md,
    "HEBF's residency memory"). A switch changes every score at once: a rescale.
    """

    name = "hot-adaptive"

    def __init__(self, alpha: float = 0.01) -> None:
        self.alpha = alpha
        self.rules = (Hottest(), HotRecent(), Lru())
        self.record = [0.5, 0.5, 0.5]  # each rule's averaged percentile of the demanded experts
        self.using = 0  # index into `rules`
        self.switches = 0
        self.seen: defaultdict[int, dict[ExpertKey, None]] = defaultdict(dict)  # per layer
        self.scores = self.rules[0].scores

    @property
    def rescales(self) -> int:
        """The switches and the rules' own rescales: each changed every score in use."""
        return self.switches + sum(r.rescales for r in self.rules)

    def observe_pool(self, sizes: Sizes, budget_bytes: int, plane_drop: bool) -> None:
        """(not used)"""

    def observe(self, demands: Sequence[Demand]) -> None:
        if demands:
            seen = self.seen[demands[0].key.layer]
            if len(seen) > 1:
                for i, rule in enumerate(self.rules):
                    self.record[i] += self.alpha * (_percentile(rule.scores, seen, demands)
                                                    - self.record[i])
            for d in demands:
                seen[d.key] = None
        for rule in self.rules:
            rule.observe(demands)
        best = max(range(len(self.rules)), key=self.record.__getitem__)
        if self.record[best] > self.record[self.using]:
            self.using, self.switches = best, self.switches + 1
            self.scores = self.rules[best].scores


def _percentile(scores: dict[ExpertKey, float], keys: dict[ExpertKey, None],
                demands: Sequence[Demand]) -> float:
    """How high `scores` ranks the demanded experts among the other `keys`, averaged over
    the distinct experts asked: 1 when each is above all of them, 0 when below all, ties
    counted half. `keys` holds at least two experts."""
    values = sorted(scores.get(k, 0.0) for k in keys)
    asked = dict.fromkeys(d.key for d in demands)
    total = 0.0
    for key in asked:
        s = scores.get(key, 0.0)
        below, upto = bisect_left(values, s), bisect_right(values, s)
        known = key in keys  # then `values` holds its own score once: not a rival
        total += (below + 0.5 * (upto - below - known)) / (len(values) - known)
    return total / len(asked)
