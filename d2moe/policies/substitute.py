"""Importance-driven substitution (System 2): serve a low-importance miss from what is resident.

A demand is a *miss* when its expert is not resident at the bits it needs, and *low
importance* when every token routed there has a router weight below `below` (its demand's
importance is the largest such weight). Two ways to serve one without a load:
- `similar`: run its tokens on the most similar expert of the same layer that is resident
  (similarity computed offline, `policies/stats.py`); among equally similar ones, prefer an
  expert this layer already runs (reuse), then the lower id;
- `lower` (MWQ): run the expert itself at the lower bit-width already resident (nested
  layouts only: a lower bit-width is a prefix of the planes in memory).
High-importance demands are never substituted. Modes are registered by name in
`SUBSTITUTIONS`, which a preset's `substitute` field names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from d2moe.core.errors import UserError
from d2moe.core.jobs import Demand, ExpertKey
from d2moe.policies.registry import Registry
from d2moe.policies.stats import ExpertStats
from d2moe.policies.view import ResidentView


@dataclass(frozen=True)
class Substitution:
    """A demand served by `source` at `demand.bits` (its `asked` keeps the routed bits)."""

    source: ExpertKey
    demand: Demand


class Substituter:
    """Splits a layer's demands into those planned normally and those substituted; this
    base class (`none`) substitutes nothing, subclasses override `serve`."""

    name = "none"

    def __init__(self, below: float) -> None:
        self.below = below

    def split(self, demands: Sequence[Demand], resident: ResidentView
              ) -> tuple[list[Demand], list[Substitution]]:
        """(demands to plan, substitutions) for one layer."""
        if type(self).serve is Substituter.serve:  # `none`: on the hot path
            return list(demands), []
        have = resident.bits
        nested = resident.sizes.nested
        keep: list[Demand] = []
        subs: list[Substitution] = []
        used = {d.key.expert for d in demands if have.get(d.key, 0) >= d.bits}
        for d in demands:
            cur = have.get(d.key, 0)
            sub = None
            if cur < d.bits and d.importance < self.below:
                sub = self.serve(d, cur, have, nested, used)
            if sub is None:
                keep.append(d)
            else:
                subs.append(sub)
                used.add(sub.source.expert)
        return keep, subs

    def serve(self, d: Demand, cur: int, have: Mapping[ExpertKey, int], nested: bool,
              used: set[int]) -> Substitution | None:
        """How to serve the low-importance miss `d` (resident at `cur` bits, maybe 0) from
        `have`, given the layer's experts already in `used`; None plans it normally."""
        return None


class Lower(Substituter):
    """The expert itself at the lower bit-width already resident (nested layouts only)."""

    name = "lower"

    def serve(self, d: Demand, cur: int, have: Mapping[ExpertKey, int], nested: bool,
              used: set[int]) -> Substitution | None:
        if not (nested and cur):
            return None
        return Substitution(d.key, d._replace(bits=cur, asked=d.asked or d.bits))


class Similar(Substituter):
    """The most similar resident expert of the layer, for a miss with nothing resident."""

    name = "similar"

    def __init__(self, below: float, stats: ExpertStats | None,
                 min_similarity: float = 0.0) -> None:
        if stats is None:
            raise UserError("substitution by similar experts needs expert similarity",
                            field="expert_stats",
                            fix="pass --expert-stats FILE from `d2moe experts stats` (the "
                                "simulator derives it from the trace when none is given)")
        super().__init__(below)
        self.stats = stats
        self.min_similarity = min_similarity

    def serve(self, d: Demand, cur: int, have: Mapping[ExpertKey, int], nested: bool,
              used: set[int]) -> Substitution | None:
        """The most similar resident expert of `d`'s layer (ties: one already in use)."""
        if cur:
            return None
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


class SubstituteOptions(Protocol):
    """The mode's settings in a policy's config (`presets.PolicyConfig`)."""

    substitute_below: float


# name -> factory(options, stats): a new mode is one class and one registration here
# (needs_stats=True when it cannot work without the statistics: PolicyConfig.needs_stats)
SUBSTITUTIONS: Registry[Substituter] = Registry("substitution mode")


@SUBSTITUTIONS.register("none")
def _none(options: SubstituteOptions, stats: ExpertStats | None) -> Substituter:
    """every miss loaded"""
    return Substituter(options.substitute_below)


@SUBSTITUTIONS.register("lower")
def _lower(options: SubstituteOptions, stats: ExpertStats | None) -> Substituter:
    """a low-importance miss at the bits already resident (nested layouts)"""
    return Lower(options.substitute_below)


@SUBSTITUTIONS.register("similar", needs_stats=True)
def _similar(options: SubstituteOptions, stats: ExpertStats | None) -> Substituter:
    """a low-importance miss on the most similar resident expert (needs expert stats)"""
    return Similar(options.substitute_below, stats)
