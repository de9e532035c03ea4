"""Which resident experts to give up when the budget is short: LRU, LFU, hottest-first.

A residency policy only keeps statistics and ranks victims; the planner decides how
much to free and whether to drop planes or evict whole experts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from d2moe.core.jobs import Demand, ExpertKey
from d2moe.policies.registry import Registry


class Residency(Protocol):
    """Keeps usage statistics and ranks eviction candidates, coldest first."""

    name: str

    def observe(self, demands: Sequence[Demand]) -> None:
        """Record one layer's demands (called once per planned layer, in order)."""

    def coldest_first(self, candidates: Iterable[ExpertKey]) -> list[ExpertKey]:
        """Candidates in eviction order: the one to give up first comes first."""


RESIDENCY: Registry[Residency] = Registry("residency")


@RESIDENCY.register("lru")
class Lru:
    """Least recently used goes first."""

    name = "lru"

    def __init__(self) -> None:
        self.tick = 0
        self.last: dict[ExpertKey, int] = {}

    def observe(self, demands: Sequence[Demand]) -> None:
        self.tick += 1
        for d in demands:
            self.last[d.key] = self.tick

    def coldest_first(self, candidates: Iterable[ExpertKey]) -> list[ExpertKey]:
        return sorted(candidates, key=lambda k: (self.last.get(k, 0), k))


@RESIDENCY.register("lfu")
class Lfu:
    """Fewest routed tokens so far goes first."""

    name = "lfu"

    def __init__(self) -> None:
        self.count: dict[ExpertKey, int] = {}

    def observe(self, demands: Sequence[Demand]) -> None:
        for d in demands:
            self.count[d.key] = self.count.get(d.key, 0) + d.tokens

    def coldest_first(self, candidates: Iterable[ExpertKey]) -> list[ExpertKey]:
        return sorted(candidates, key=lambda k: (self.count.get(k, 0), k))


@RESIDENCY.register("hottest")
class Hottest:
    """Keep the hottest: an exponentially decayed token count per expert (D2MoE's "+Budget":
    the most frequently used experts stay resident across tokens); coldest goes first.

    heat <- heat * decay**(layers elapsed since last update) + tokens. The decay is applied
    lazily per expert, so observing costs O(demands), not O(experts).
    """

    name = "hottest"

    def __init__(self, half_life_layers: float = 256.0) -> None:
        self.decay = 0.5 ** (1.0 / half_life_layers)
        self.tick = 0
        self.heat: dict[ExpertKey, tuple[float, int]] = {}  # key -> (heat, tick of update)

    def _now(self, key: ExpertKey) -> float:
        h, t = self.heat.get(key, (0.0, self.tick))
        return h * self.decay ** (self.tick - t)

    def observe(self, demands: Sequence[Demand]) -> None:
        self.tick += 1
        for d in demands:
            self.heat[d.key] = (self._now(d.key) + d.tokens, self.tick)

    def coldest_first(self, candidates: Iterable[ExpertKey]) -> list[ExpertKey]:
        return sorted(candidates, key=lambda k: (self._now(k), k))
