"""Bit rules: which bit-width a demand runs at, given the bits its tokens were routed at.

`asked` keeps the router's (or the trace's) choice: D2MoE's dual routing. `uniform` runs
every expert at one bit-width (MoQE-DynaIO, Hold-in-Memory). `static` fixes each expert's
bit-width offline by its importance (EdgeMoE): the most important share of a layer's experts
at the most bits. A rule maps (expert, routed bits) -> bits; it never looks at time or memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from d2moe.core.errors import UserError
from d2moe.core.jobs import Demand, ExpertKey
from d2moe.policies.registry import Registry
from d2moe.policies.stats import ExpertStats


class BitRule:
    """The identity rule (`asked`); subclasses override `bits`."""

    name = "asked"

    def bits(self, key: ExpertKey, asked: int) -> int:
        """The bit-width to run `key` at when its tokens were routed at `asked` bits."""
        return asked

    def max_bits(self, asked_max: int) -> int:
        """The most bits this rule can give when the workload asks at most `asked_max`."""
        return asked_max

    def min_bits(self, asked_min: int) -> int:
        """The fewest bits this rule can give when the workload asks at least `asked_min`."""
        return asked_min

    def apply(self, demands: Sequence[Demand]) -> list[Demand]:
        """The demands at this rule's bits; a changed demand remembers its routed bits."""
        if type(self).bits is BitRule.bits:  # the identity rule (asked): on the hot path
            return list(demands)
        out = []
        for d in demands:
            b = self.bits(d.key, d.bits)
            out.append(d if b == d.bits else d._replace(bits=b, asked=d.asked or d.bits))
        return out


class Uniform(BitRule):
    """Every expert at `bits` bits."""

    name = "uniform"

    def __init__(self, bits: int) -> None:
        self.uniform = bits

    def bits(self, key: ExpertKey, asked: int) -> int:
        return self.uniform

    def max_bits(self, asked_max: int) -> int:
        return self.uniform

    def min_bits(self, asked_min: int) -> int:
        return self.uniform

    def apply(self, demands: Sequence[Demand]) -> list[Demand]:
        if all(d.bits == self.uniform for d in demands):
            return list(demands)
        return super().apply(demands)


class Static(BitRule):
    """Per-expert bit-widths fixed offline by importance (EdgeMoE): per layer, experts ranked
    by importance fill `shares` of the layer in order of `choices` (most bits first)."""

    name = "static"

    def __init__(self, stats: ExpertStats | None, choices: Sequence[int],
                 shares: Sequence[float]) -> None:
        if stats is None:
            raise UserError("static per-expert bit-widths need expert importance",
                            field="expert_stats",
                            fix="pass --expert-stats FILE from `d2moe experts stats` (the "
                                "simulator derives it from the trace when none is given)")
        if len(choices) != len(shares) or abs(sum(shares) - 1.0) > 1e-6:
            raise ValueError(f"choices {choices} and shares {shares} must pair up and sum to 1")
        self.choices = tuple(choices)
        self.table: dict[ExpertKey, int] = {}
        for layer, imp in enumerate(stats.importance):
            order = sorted(range(len(imp)), key=lambda e, imp=imp: (-imp[e], e))
            bounds, acc = [], 0.0
            for share in shares:  # cumulative share boundaries, rounded to whole experts
                acc += share
                bounds.append(round(acc * len(order)))
            for rank, e in enumerate(order):
                k = next(i for i, hi in enumerate(bounds) if rank < hi or i == len(bounds) - 1)
                self.table[ExpertKey(layer, e)] = self.choices[k]

    def bits(self, key: ExpertKey, asked: int) -> int:
        return self.table.get(key, self.choices[-1])

    def max_bits(self, asked_max: int) -> int:
        return max(self.choices)

    def min_bits(self, asked_min: int) -> int:
        return min(self.choices)


class BitOptions(Protocol):
    """The rule's settings in a policy's config (`presets.PolicyConfig`)."""

    uniform_bits: int
    static_bits: tuple[int, ...]
    static_shares: tuple[float, ...]


# name -> factory(options, stats): a new rule is one class and one registration here
# (needs_stats=True when it cannot work without the statistics: PolicyConfig.needs_stats)
BIT_RULES: Registry[BitRule] = Registry("bit rule")


@BIT_RULES.register("asked")
def _asked(options: BitOptions, stats: ExpertStats | None) -> BitRule:
    """the bits each demand was routed at (dual routing)"""
    return BitRule()


@BIT_RULES.register("uniform")
def _uniform(options: BitOptions, stats: ExpertStats | None) -> BitRule:
    """every expert at uniform_bits"""
    return Uniform(options.uniform_bits)


@BIT_RULES.register("static", needs_stats=True)
def _static(options: BitOptions, stats: ExpertStats | None) -> BitRule:
    """per-expert bits fixed offline by importance (static_bits over static_shares)"""
    return Static(stats, options.static_bits, options.static_shares)
