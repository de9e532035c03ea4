"""What is resident: a read-only view for policies and the bookkeeping the backends share.

`ResidentSet` is pure accounting (no data movement, no clock), like mixtral-offloading's
cache bookkeeping: the simulator and the executor both apply a plan's loads and evictions
to one, so the budget is enforced by the same code on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from d2moe.core.jobs import Evict, ExpertKey, Load
from d2moe.core.sizes import QuantLayout, expert_bytes
from d2moe.core.spec import ModelSpec


class PlanError(RuntimeError):
    """A plan breaks an invariant (budget, bits, dependency order): a policy bug, not user input."""


@dataclass(frozen=True)
class Sizes:
    """Bytes by resident bits for one model and layout (all experts share one shape)."""

    by_bits: tuple[int, ...]  # index = bits (0..16); 0 bits -> 0 bytes
    nested: bool
    b1: int

    @classmethod
    def of(cls, spec: ModelSpec, layout: QuantLayout) -> Sizes:
        table = [0] * 17
        lo = 1 if layout.kind == "dense" else layout.b1
        hi = 16 if layout.kind == "dense" else layout.bK
        for b in range(lo, hi + 1):
            table[b] = expert_bytes(spec, b, layout)
        if layout.kind == "dense":
            table = [0] + [expert_bytes(spec, 16, layout)] * 16
        return cls(tuple(table), layout.nested, layout.b1)

    def load(self, bits_from: int, bits_to: int) -> int:
        """Bytes moved to raise from `bits_from` to `bits_to` (see core.sizes.load_bytes)."""
        if bits_to <= bits_from:
            return 0
        if self.nested and bits_from > 0:
            return self.by_bits[bits_to] - self.by_bits[bits_from]
        return self.by_bits[bits_to]


class ResidentView:
    """Read-only view of the resident pool handed to policies."""

    def __init__(self, owner: ResidentSet) -> None:
        self._owner = owner

    @property
    def bits(self) -> Mapping[ExpertKey, int]:
        return self._owner.bits

    @property
    def used_bytes(self) -> int:
        return self._owner.used_bytes

    @property
    def budget_bytes(self) -> int:
        return self._owner.budget_bytes

    @property
    def sizes(self) -> Sizes:
        return self._owner.sizes

    @property
    def version(self) -> int:
        """Changes whenever the pool changes: equal versions mean an unchanged pool."""
        return self._owner.version


class ResidentSet:
    """Which experts are resident at how many bits, under a byte budget."""

    def __init__(self, sizes: Sizes, budget_bytes: int) -> None:
        self.sizes = sizes
        self.budget_bytes = budget_bytes
        self.bits: dict[ExpertKey, int] = {}
        self.used_bytes = 0
        self.peak_bytes = 0
        self.version = 0  # bumped by every applied load or eviction
        self.view = ResidentView(self)

    def apply_evict(self, ev: Evict) -> int:
        """Lower `ev.key` to `ev.bits_to`; returns the bytes freed."""
        have = self.bits.get(ev.key, 0)
        if have != ev.bits_from or not 0 <= ev.bits_to < have:
            raise PlanError(f"evict {ev} but {ev.key} is resident at {have} bits")
        if ev.bits_to and not self.sizes.nested:
            raise PlanError(f"{ev}: a plane drop needs a nested layout")
        freed = self.sizes.by_bits[have] - self.sizes.by_bits[ev.bits_to]
        self.used_bytes -= freed
        self.version += 1
        if ev.bits_to:
            self.bits[ev.key] = ev.bits_to
        else:
            del self.bits[ev.key]
        return freed

    def apply_load(self, ld: Load) -> int:
        """Raise `ld.key` to `ld.bits_to`; returns the bytes allocated (== bytes moved)."""
        have = self.bits.get(ld.key, 0)
        if have != ld.bits_from or ld.bits_to <= have:
            raise PlanError(f"load {ld} but {ld.key} is resident at {have} bits")
        if have and not self.sizes.nested:
            raise PlanError(f"{ld}: raising in place needs a nested layout; evict first")
        nbytes = self.sizes.load(have, ld.bits_to)
        if self.used_bytes + nbytes > self.budget_bytes:
            raise PlanError(f"{ld} needs {nbytes} B but only "
                            f"{self.budget_bytes - self.used_bytes} B of the budget is free")
        self.used_bytes += nbytes
        self.version += 1
        if self.used_bytes > self.peak_bytes:
            self.peak_bytes = self.used_bytes
        self.bits[ld.key] = ld.bits_to
        return nbytes
