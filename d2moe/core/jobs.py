"""The scheduling vocabulary shared by policies, the simulator and the executor.

Per layer of each forward step, routing becomes `Demand`s; a policy turns them into a
`Plan` of `Load`s (I/O lane, in order) and `Run`s (compute lane, in order). Loads carry
the `Evict`s that must happen before they start. Nothing here knows about time.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, order=True, slots=True)
class ExpertKey:
    """One expert of one MoE layer."""

    layer: int
    expert: int

    def __str__(self) -> str:
        return f"L{self.layer}E{self.expert}"


@dataclass(frozen=True, slots=True)
class Demand:
    """A layer's need for one expert at one bit-width in this step.

    `tokens` is the hotness (tokens routed to the expert at these bits); `importance`
    the largest router weight among them (System 2 substitutes only low-importance misses).
    """

    key: ExpertKey
    bits: int
    tokens: int
    importance: float = 1.0


@dataclass(frozen=True, slots=True)
class Evict:
    """Lower an expert's resident bits from `bits_from` to `bits_to` (0 = evict whole).

    MWQ makes a partial eviction a plane drop: the expert stays usable at `bits_to`.
    If the victim has a run in the same plan, the eviction waits for that run to end.
    """

    key: ExpertKey
    bits_from: int
    bits_to: int = 0


@dataclass(frozen=True, slots=True)
class Load:
    """Raise an expert from `bits_from` (0 = absent) to `bits_to` resident bits.

    With MWQ only planes bits_from+1..bits_to move. `evict` runs before the load starts.
    `prefetch` marks a load for a later layer issued ahead of its demand.
    """

    key: ExpertKey
    bits_from: int
    bits_to: int
    evict: tuple[Evict, ...] = ()
    prefetch: bool = False


@dataclass(frozen=True, slots=True)
class Run:
    """Run `tokens` tokens through an expert at `bits` (a prefix of what is resident).

    `served_by` names the resident expert that stands in for `key` when a policy
    substitutes a low-importance miss (System 2); None means the expert itself runs.
    """

    key: ExpertKey
    bits: int
    tokens: int
    served_by: ExpertKey | None = None

    @property
    def source(self) -> ExpertKey:
        """The expert whose weights actually run."""
        return self.served_by if self.served_by is not None else self.key


@dataclass(frozen=True, slots=True)
class Plan:
    """What a policy decided for one layer: the I/O queue and the compute queue, in order.

    Invariant (checked by `d2moe.policies.check.check_plan`): each run's source is resident
    at >= run.bits once the last load of that source in `loads` has finished (or already
    is); evictions never take bits a later run still needs; the budget holds throughout.
    """

    loads: tuple[Load, ...] = ()
    runs: tuple[Run, ...] = ()
    prefetches: tuple[Load, ...] = field(default=())
