"""The scheduling vocabulary shared by policies, the simulator and the executor.

Per layer of each forward step, routing becomes `Demand`s; a policy turns them into a
`Plan` of `Load`s (I/O lane, in order) and `Run`s (compute lane, in order). Loads carry
the `Evict`s that must happen before they start. Nothing here knows about time.

The per-job records are immutable NamedTuples rather than frozen dataclasses: a simulated
Mixtral token creates a few hundred of them, and tuple construction and hashing run at C
speed (a frozen dataclass costs ~4x more per instance).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class ExpertKey(NamedTuple):
    """One expert of one MoE layer."""

    layer: int
    expert: int

    def __str__(self) -> str:
        return f"L{self.layer}E{self.expert}"


class Demand(NamedTuple):
    """A layer's need for one expert at one bit-width in this step.

    `tokens` is the hotness (tokens routed to the expert at these bits); `importance`
    the largest router weight among them (System 2 substitutes only low-importance misses).
    """

    key: ExpertKey
    bits: int
    tokens: int
    importance: float = 1.0
    asked: int = 0  # the bits its tokens were routed at, when a policy changed `bits` (0: same)


class Evict(NamedTuple):
    """Lower an expert's resident bits from `bits_from` to `bits_to` (0 = evict whole).

    MWQ makes a partial eviction a plane drop: the expert stays usable at `bits_to`.
    If the victim has a run in the same plan, the eviction waits for that run to end.
    """

    key: ExpertKey
    bits_from: int
    bits_to: int = 0


class Load(NamedTuple):
    """Raise an expert from `bits_from` (0 = absent) to `bits_to` resident bits.

    With MWQ only planes bits_from+1..bits_to move. `evict` runs before the load starts.
    `prefetch` marks a load for a later layer issued ahead of its demand.
    """

    key: ExpertKey
    bits_from: int
    bits_to: int
    evict: tuple[Evict, ...] = ()
    prefetch: bool = False


class Run(NamedTuple):
    """Run `tokens` tokens through an expert at `bits` (a prefix of what is resident).

    `served_by` names the resident expert that stands in for `key` when a policy
    substitutes a low-importance miss (System 2); None means the expert itself runs.
    `asked` is the bit-width its tokens were routed at when the policy runs them at other
    bits (a static or uniform bit rule, or a miss served at the bits already resident);
    0 means `bits`. The executor finds the run's tokens by (key, asked or bits).
    """

    key: ExpertKey
    bits: int
    tokens: int
    served_by: ExpertKey | None = None
    asked: int = 0

    @property
    def routed_bits(self) -> int:
        """The bit-width the run's tokens were routed at."""
        return self.asked or self.bits

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


def run_waits(plan: Plan) -> list[int]:
    """For each run, the index of the load it waits for (-1: its expert is resident).

    A run waits for the last load of its source expert in the plan.
    """
    last_load = {ld.key: i for i, ld in enumerate(plan.loads)}
    return [last_load.get(r.source, -1) for r in plan.runs]


def load_waits(plan: Plan) -> list[int]:
    """For each load, the index of the last run its evictions must wait for (-1: none).

    Evicting expert k down to `bits_to` before load i must wait for every run of k that uses
    the residency from before load i (its source is not reloaded at or after i) and needs
    more than `bits_to` bits. This is the only way the I/O lane waits on the compute lane.
    """
    sources = {r.source for r in plan.runs}
    if not any(ev.key in sources for ld in plan.loads for ev in ld.evict):
        return [-1] * len(plan.loads)  # no eviction touches an expert this plan runs
    last_load = {ld.key: i for i, ld in enumerate(plan.loads)}
    runs_of: dict[ExpertKey, list[tuple[int, int]]] = {}
    for j, r in enumerate(plan.runs):
        runs_of.setdefault(r.source, []).append((j, r.bits))
    waits = []
    for i, ld in enumerate(plan.loads):
        w = -1
        for ev in ld.evict:
            if last_load.get(ev.key, -1) >= i:
                continue  # its runs wait for a reload at or after this load
            for j, bits in runs_of.get(ev.key, ()):
                if bits > ev.bits_to and j > w:
                    w = j
        waits.append(w)
    return waits
