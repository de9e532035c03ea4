"""The oracle (Belady / MIN) residency bound of a trace: the fewest fetches any cache can do.

Model (what the bound is about):
- Requests: steps in order, layers in order; a layer's request is the set of distinct experts
  it demands (an expert asked at several bit-widths is one request at its widest).
- Whole-expert granularity: every resident expert takes one slot of
  `slot = sizes.by_bits[the widest bits any demand in the trace asks]`, and the cache holds
  `floor(budget_bytes / slot)` experts. No plane drops, no partial experts.
- A layer is served with all of its experts resident together: its misses are fetched and
  none of its own experts may be evicted to make room while it is served.
- MIN (Belady 1966): on a miss with a full cache, evict the resident expert whose next
  request is furthest in the future (never again = infinitely far). With batched requests
  this stays optimal; tests check it against an exhaustive search.

Counting matches `analysis.metrics`: a demand is a (step, layer, expert) with a run; it is a
hit when it was not fetched for that layer. For one uniform bit-width with whole-copy loads
(the `copies` layout) it bounds every policy that keeps a layer's experts resident together:
fetches <= that policy's loads + prefetches + preloads (each a fetch moved earlier).
`steps_from_runs` rebuilds the requests from a timeline's `run` rows, so the bound also
applies to a real run, or to a policy that substitutes (its substituted demands need no
fetch: the bound over what it did run stays a bound).
"""

from __future__ import annotations

import gc
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from d2moe.core.events import Timeline
from d2moe.core.jobs import Demand, ExpertKey
from d2moe.policies.view import Sizes
from d2moe.sim.simulator import StepWork

NEVER = 1 << 62  # next-use index of an expert never requested again

NOTE = ("Belady/MIN at whole-expert granularity: each expert takes one slot at the widest "
        "bits the trace asks, a layer's experts are resident together; the fewest fetches "
        "(and most hits) any such cache of that many slots can achieve on this trace")


@dataclass(frozen=True)
class OracleResult:
    """The optimal cache's counts on one trace at one budget."""

    demands: int  # distinct (step, layer, expert) requests
    hits: int  # demands served without a fetch
    hit_rate: float  # hits / demands; 1.0 when there is no demand (as in metrics)
    fetches: int  # demands - hits: every miss fetches once
    bytes_loaded: int  # fetches * slot bytes
    capacity_experts: int  # floor(budget_bytes / slot)
    slot_bytes: int
    note: str = NOTE


def requests(steps: Sequence[StepWork]) -> tuple[list[list[tuple[int, int]]], int]:
    """Per (step, layer), in order, its distinct experts as (layer, expert); and the max bits."""
    groups: list[list[tuple[int, int]]] = []
    top = 0
    for step in steps:
        for demands in step.layers:
            groups.append(list(dict.fromkeys(d.key for d in demands)))
            top = max(top, max((d.bits for d in demands), default=0))
    return groups, top


def next_uses(groups: Sequence[Sequence[tuple[int, int]]]) -> list[list[int]]:
    """For each request, the index of the next group requesting the same expert (or NEVER).

    One backward pass: `last[key]` is the earliest group after the current one that asks key.
    """
    last: dict[tuple[int, int], int] = {}
    out: list[list[int]] = [[] for _ in groups]
    for g in range(len(groups) - 1, -1, -1):
        out[g] = [last.get(k, NEVER) for k in groups[g]]
        for k in groups[g]:
            last[k] = g
    return out


def min_fetches(groups: Sequence[Sequence[tuple[int, int]]], capacity: int) -> int:
    """Fetches of MIN on the groups with `capacity` slots: O(n log n) with a lazy heap.

    Invariant: `resident[k]` is k's next request; a heap entry (-use, k) is live iff
    `resident.get(k) == use` (an expert's next use only grows, so stale entries never match).
    """
    widest = max((len(g) for g in groups), default=0)
    if widest > capacity:
        raise ValueError(f"the cache holds {capacity} experts but a layer demands {widest} "
                         f"distinct experts at once: raise the budget to at least {widest} slots")
    nxt = next_uses(groups)
    resident: dict[tuple[int, int], int] = {}
    heap: list[tuple[int, tuple[int, int]]] = []
    fetches = 0
    for g, keys in enumerate(groups):
        misses = [k for k in keys if k not in resident]
        fetches += len(misses)
        for _ in range(len(resident) + len(misses) - capacity):
            while True:  # the live entry furthest in the future; this group's own are at g
                use, victim = heapq.heappop(heap)
                if resident.get(victim) == -use:
                    break
            if -use == g:  # cannot happen when capacity >= the group's size
                raise AssertionError("MIN would evict an expert of the layer being served")
            del resident[victim]
        for k, use in zip(keys, nxt[g], strict=True):
            resident[k] = use
            heapq.heappush(heap, (-use, k))
    return fetches


def belady(steps: Sequence[StepWork], sizes: Sizes, budget_bytes: int) -> OracleResult:
    """The MIN bound of `steps` at `budget_bytes` (see the module docstring for the model)."""
    was = gc.isenabled()
    gc.disable()  # no cycles are made; collections would rescan every live tuple (as simulate)
    try:
        return _belady(steps, sizes, budget_bytes)
    finally:
        if was:
            gc.enable()


def _belady(steps: Sequence[StepWork], sizes: Sizes, budget_bytes: int) -> OracleResult:
    groups, top = requests(steps)
    slot = sizes.by_bits[top] if top else sizes.by_bits[sizes.b1]
    if slot <= 0:
        raise ValueError(f"no expert size at {top} bits in this layout")
    capacity = budget_bytes // slot
    demands = sum(len(g) for g in groups)
    fetches = min_fetches(groups, capacity)
    hits = demands - fetches
    return OracleResult(demands=demands, hits=hits,
                        hit_rate=hits / demands if demands else 1.0, fetches=fetches,
                        bytes_loaded=fetches * slot, capacity_experts=capacity, slot_bytes=slot)


def steps_from_runs(timeline: Timeline) -> list[StepWork]:
    """The requests a timeline's `run` rows made: per (step, layer), each expert that ran
    on its own weights, at the bits it ran (`bits_to`: what was resident for it)."""
    ran: dict[tuple[int, int], dict[int, Demand]] = {}
    phase: dict[int, tuple[str, int]] = {}
    layers = 0
    for e in timeline.events:
        if e.kind == "run":
            at = ran.setdefault((e.step, e.layer), {})
            old = at.get(e.expert)
            bits = max(e.bits_to, old.bits if old else 0)
            at[e.expert] = Demand(ExpertKey(e.layer, e.expert), bits, e.tokens)
            layers = max(layers, e.layer + 1)
        elif e.kind in ("prefill", "decode"):
            phase[e.step] = (e.kind, e.tokens)
    count = 1 + max((s for s, _ in ran), default=-1)
    return [StepWork(*phase.get(s, ("decode", 0)),
                     [sorted(ran.get((s, layer), {}).values()) for layer in range(layers)])
            for s in range(count)]
