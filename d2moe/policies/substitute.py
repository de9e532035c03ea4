"""Importance-driven substitution (System 2): serve a low-importance miss from what is resident.

A demand is a *miss* when its expert is not resident at the bits it needs, and *low
importance* when every token routed there has a router weight below `below` (its demand's
importance is the largest such weight). Two ways to serve one without a load:
- `similar`: run its tokens on the most similar expert of the same layer that is resident
  (similarity computed offline, `policies/stats.py`); among equally similar ones, prefer an
  expert this layer already runs (reuse), then the lower id;
- `lower` (MWQ): run the expert itself at the lower bit-width already resident (nested
  layouts only: a lower bit-width is a prefix of the planes in memory).
High-importance demands are never substituted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from d2moe.core.jobs import Demand, ExpertKey
from d2moe.policies.stats import ExpertStats
from d2moe.policies.view import ResidentView

MODES = ("none", "similar", "lower")


@dataclass(frozen=True)
class Substitution:
    """A demand served by `source` at `demand.bits` (its `asked` keeps the routed bits)."""

    source: ExpertKey
    demand: Demand


class Substituter:
    """Splits a layer's demands into those planned normally and those substituted."""

    def __init__(self, mode: str, below: float, stats: ExpertStats | None,
                 min_similarity: float = 0.0) -> None:
        if mode not in MODES:
            raise ValueError(f"substitution mode {mode!r} not in {MODES}")
        if mode == "similar" and stats is None:
            from d2moe.core.errors import UserError

            raise UserError("substitution by similar experts needs expert similarity",
                            field="expert_stats",
                            fix="pass --expert-stats FILE from `d2moe experts stats` (the "
                                "simulator derives it from the trace when none is given)")
        self.mode, self.below, self.stats = mode, below, stats
        self.min_similarity = min_similarity

    def split(self, demands: Sequence[Demand], resident: ResidentView
              ) -> tuple[list[Demand], list[Substitution]]:
        """(demands to plan, substitutions) for one layer."""
        if self.mode == "none":
            return list(demands), []
        have = resident.bits
        nested = resident.sizes.nested
        keep: list[Demand] = []
        subs: list[Substitution] = []
        used = {d.key.expert for d in demands if have.get(d.key, 0) >= d.bits}
        for d in demands:
            cur = have.get(d.key, 0)
            if cur >= d.bits or d.importance >= self.below:
                keep.append(d)
            elif self.mode == "lower" and nested and cur:
                subs.append(Substitution(d.key, d._replace(bits=cur, asked=d.asked or d.bits)))
            elif self.mode == "similar" and not cur:
                sub = self._similar(d, have, nested, used)
                if sub is None:
                    keep.append(d)
                else:
                    subs.append(sub)
                    used.add(sub.source.expert)
            else:
                keep.append(d)
        return keep, subs

    def _similar(self, d: Demand, have: Mapping[ExpertKey, int], nested: bool,
                 used: set[int]) -> Substitution | None:
        """The most similar resident expert of `d`'s layer (ties: one already in use)."""
        assert self.stats is not None
        layer = d.key.layer
        best = None
        for sim, f in self.stats.ranked_substitutes(d.key):
            if sim < self.min_similarity or (best is not None and sim < best[0]):
                break
            bits = have.get(ExpertKey(layer, f), 0)
            if bits and (best is None or (f in used and best[1] not in used)):
                best = (sim, f, bits)
        if best is None:
            return None
        _, f, bits = best
        run_bits = min(d.bits, bits) if nested else bits  # copies: only the copy in memory
        return Substitution(ExpertKey(layer, f),
                            d._replace(bits=run_bits, asked=d.asked or d.bits))
