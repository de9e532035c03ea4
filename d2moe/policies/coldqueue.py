"""A lazily-updated min-heap of experts by residency score: the coldest victim in O(log n).

Cache bookkeeping only (which expert is coldest), kept apart from what the pool holds: a
popped entry is checked against the caller's view of the pool and skipped if stale.
"""

from __future__ import annotations

import heapq
from collections.abc import Container, Iterable, Mapping

from d2moe.core.jobs import ExpertKey


class ColdQueue:
    """Experts ordered by (score, key); scores are pushed when they change.

    Invariant: `latest[k]` is the last score pushed for k; heap entries with another score
    are stale and dropped when they surface. Ties go to the lower expert id.
    """

    def __init__(self) -> None:
        self.heap: list[tuple[float, ExpertKey]] = []
        self.latest: dict[ExpertKey, float] = {}

    def push(self, keys: Iterable[ExpertKey], scores: Mapping[ExpertKey, float]) -> None:
        """Record the current score of `keys` (call after their score changed)."""
        heap, latest = self.heap, self.latest
        for k in keys:
            s = scores[k]
            if latest.get(k) != s:
                latest[k] = s
                heapq.heappush(heap, (s, k))
        if len(heap) > 4 * len(latest) + 256:  # compact: drop stale entries
            self.heap = [(s, k) for k, s in latest.items()]
            heapq.heapify(self.heap)

    def pop(self, have: Mapping[ExpertKey, int], floor: int,
            exclude: Container[ExpertKey]) -> ExpertKey | None:
        """Remove and return the coldest key resident above `floor` bits and not in `exclude`.

        Excluded keys (needed by the layer being planned) stay queued; keys at or below
        `floor` are forgotten (they re-enter when their score next changes).
        """
        heap, latest = self.heap, self.latest
        held = []
        found = None
        while heap:
            s, k = heapq.heappop(heap)
            if latest.get(k) != s:
                continue
            if k in exclude:
                held.append((s, k))
            elif have.get(k, 0) > floor:
                del latest[k]
                found = k
                break
            else:
                del latest[k]
        for item in held:
            heapq.heappush(heap, item)
        return found
