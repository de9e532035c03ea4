"""Job orders for one layer: FIFO (expert-ID), HEBF (hottest expert, bits first), Johnson.

A `Job` gathers a layer's demands for one expert. Each scheduler returns the jobs in one
order; the planner derives both queues from it (loads: the jobs that need one, in that
order; runs: all jobs, in that order), so compute never waits on a load queued behind
a later job's load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from d2moe.core.jobs import Demand, ExpertKey
from d2moe.policies.registry import Registry


class Job(NamedTuple):
    """One expert's work in a layer: resident at `have` bits, needed at `need` bits."""

    key: ExpertKey
    have: int
    need: int
    tokens: int  # hotness: tokens routed to it in this step, all bit-widths together
    importance: float
    demands: tuple[Demand, ...]

    @property
    def missing(self) -> bool:
        return self.have < self.need


class Costs(Protocol):
    """Estimated durations a scheduler may use (Johnson's rule needs them)."""

    def load_us(self, key: ExpertKey, bits_from: int, bits_to: int) -> float:
        """Estimated us to raise `key` from `bits_from` to `bits_to`."""
        ...

    def run_us(self, key: ExpertKey, bits: int, tokens: int) -> float:
        """Estimated us to run `key` at `bits` on `tokens` tokens."""
        ...


class Scheduler(Protocol):
    """Orders a layer's jobs. Pure: no clock, no simulator, no torch."""

    name: str

    def order(self, jobs: Sequence[Job], costs: Costs) -> list[Job]:
        """The jobs in the one order both lanes follow."""
        ...


SCHEDULERS: Registry[Scheduler] = Registry("scheduler")


@SCHEDULERS.register("fifo")
class Fifo:
    """Expert-ID order, each missing expert loaded on demand (the baseline)."""

    name = "fifo"

    def order(self, jobs: Sequence[Job], costs: Costs) -> list[Job]:
        return sorted(jobs, key=lambda j: j.key)


@SCHEDULERS.register("hebf")
class Hebf:
    """Hottest-expert-bit-first (D2MoE): resident experts run first, hottest first; the
    I/O queue streams the rest hottest first, higher bit-widths first among equals.

    Higher bits first among equally hot experts matches Johnson's rule in the I/O-bound
    regime (all jobs load longer than they run: longest run first), since run cost grows
    with bits.
    """

    name = "hebf"

    def order(self, jobs: Sequence[Job], costs: Costs) -> list[Job]:
        def rank(j: Job) -> tuple[bool, int, int, ExpertKey]:
            return (j.missing, -j.tokens, -j.need, j.key)

        return sorted(jobs, key=rank)


def _johnson(jobs: Sequence[Job], costs: Costs) -> list[Job]:
    """Johnson's rule for the two-machine flow shop (load, then run): optimal makespan
    without a memory limit. Set 1 (load < run) by load ascending, then set 2 (load >= run)
    by run descending; ties by expert id."""
    first, second = [], []
    for j in jobs:
        a = costs.load_us(j.key, j.have, j.need) if j.missing else 0.0
        b = sum(costs.run_us(j.key, d.bits, d.tokens) for d in j.demands)
        (first if a < b else second).append((a, b, j))
    first.sort(key=lambda t: (t[0], t[2].key))
    second.sort(key=lambda t: (-t[1], t[2].key))
    return [t[2] for t in first + second]


@SCHEDULERS.register("johnson")
class Johnson:
    """Johnson's rule order: the optimal two-stage order with no memory limit (a reference)."""

    name = "johnson"

    def order(self, jobs: Sequence[Job], costs: Costs) -> list[Job]:
        return _johnson(jobs, costs)
