"""Turn one job order into a feasible plan under the budget.

Both queues follow the job order. When a load does not fit, victims are freed in this
preference: (1) experts this layer does not need, coldest first; (2) experts of this layer
whose runs come earlier in the order (the eviction then waits for their runs: the one
place where the two lanes interact); (3) as a last resort, a later job's resident expert,
which then becomes a miss and is reloaded in its turn. With `plane_drop` (MWQ), a victim
first loses its residual planes (down to b1) before anything is evicted whole.
Invariant: every run's expert is resident at >= its bits when it starts, and used bytes
never exceed the budget (checked by `check.check_plan`).
"""

from __future__ import annotations

from collections.abc import Sequence

from d2moe.core.jobs import Demand, Evict, ExpertKey, Load, Plan, Run
from d2moe.policies.coldqueue import ColdQueue
from d2moe.policies.residency import Residency
from d2moe.policies.schedulers import Job
from d2moe.policies.view import PlanError, ResidentView


def make_jobs(demands: Sequence[Demand], resident: ResidentView) -> list[Job]:
    """Group a layer's demands by expert (demands arrive sorted by expert, then bits)."""
    bits = resident.bits
    jobs: list[Job] = []
    for d in demands:
        if jobs and jobs[-1].key == d.key:  # same expert at another bit-width
            j = jobs[-1]
            jobs[-1] = Job(j.key, j.have, max(j.need, d.bits), j.tokens + d.tokens,
                           max(j.importance, d.importance), (*j.demands, d))
        else:
            jobs.append(Job(d.key, bits.get(d.key, 0), d.bits, d.tokens, d.importance, (d,)))
    return jobs


class Planner:
    """Fits one job order into the budget; keeps a cold-expert index across layers."""

    def __init__(self, residency: Residency, *, plane_drop: bool) -> None:
        self.residency = residency
        self.plane_drop = plane_drop
        self.cold = ColdQueue()  # all resident experts
        self.droppable = ColdQueue()  # those above b1 (plane-drop candidates)
        self._have: dict[ExpertKey, int] = {}  # mirror of the pool as our plans leave it
        self._expect = -1  # pool version once our last plan is applied; -1: never synced

    def observe(self, demands: Sequence[Demand]) -> None:
        """Update the residency statistics and the cold index with one layer's demands."""
        self.residency.observe(demands)
        keys = [d.key for d in demands]
        self.cold.push(keys, self.residency.scores)
        if self.plane_drop:
            self.droppable.push(keys, self.residency.scores)

    def plan(self, order: Sequence[Job], resident: ResidentView) -> Plan:
        """Derive the I/O and compute queues from `order` and fit the loads into the budget."""
        sizes = resident.sizes
        budget = resident.budget_bytes
        plane_drop = self.plane_drop and sizes.nested
        if resident.version != self._expect:
            # the pool is not what our last plan left (first plan, warm start, another
            # policy): copy it and index every resident expert
            self._have = dict(resident.bits)
            self.cold.push(list(self._have), self.residency.scores)
            if plane_drop:
                self.droppable.push([k for k, b in self._have.items() if b > sizes.b1],
                                    self.residency.scores)
        have = self._have  # projected forward as the plan unfolds; backends apply the same
        self._used, self._by_bits = resident.used_bytes, sizes.by_bits
        self._in_layer = {j.key for j in order}
        ops = 0
        done: list[ExpertKey] = []  # keys of jobs earlier in the order (their runs come first)
        loads: list[Load] = []
        for pos, job in enumerate(order):
            cur = have.get(job.key, 0)
            if cur < job.need:
                evicts: list[Evict] = []
                if cur and not sizes.nested:  # copies: old copy goes before the new one comes
                    self._lower(job.key, 0, evicts)
                    cur = 0
                need_bytes = sizes.load(cur, job.need)
                target = budget - need_bytes
                if self._used > target:
                    if plane_drop:
                        self._free_cold(self.droppable, sizes.b1, target, evicts)
                    self._free_cold(self.cold, 0, target, evicts)
                    if self._used > target:
                        later = [j.key for j in order[pos + 1:]]
                        for group in (done, later):
                            for floor in ((sizes.b1, 0) if plane_drop else (0,)):
                                self._free_list(group, floor, target, evicts)
                    if self._used > target:
                        raise PlanError(f"{job.key} at {job.need} bits ({need_bytes} B) cannot "
                                        f"fit a budget of {budget} B")
                loads.append(Load(job.key, cur, job.need, tuple(evicts)))
                ops += len(evicts) + 1
                self._used += need_bytes
                have[job.key] = job.need  # queued already: observe() pushed its new score
            done.append(job.key)
        self._expect = resident.version + ops
        runs = tuple([Run(d.key, d.bits, d.tokens) for j in order for d in j.demands])
        return Plan(loads=tuple(loads), runs=runs)

    def _lower(self, key: ExpertKey, floor: int, evicts: list[Evict]) -> None:
        vb = self._have[key]
        by_bits = self._by_bits
        evicts.append(Evict(key, vb, floor))
        self._used -= by_bits[vb] - by_bits[floor]
        if floor:
            self._have[key] = floor
        else:
            del self._have[key]

    def _free_cold(self, queue: ColdQueue, floor: int, target: int,
                   evicts: list[Evict]) -> None:
        """Lower the coldest experts this layer does not need to `floor` bits."""
        have, by_bits, in_layer, used = self._have, self._by_bits, self._in_layer, self._used
        while used > target and queue.latest:
            victim = queue.pop(have, floor, in_layer)
            if victim is None:
                break
            vb = have[victim]
            evicts.append(Evict(victim, vb, floor))
            used -= by_bits[vb] - by_bits[floor]
            if floor:
                have[victim] = floor
            else:
                del have[victim]
        self._used = used

    def _free_list(self, group: Sequence[ExpertKey], floor: int, target: int,
                   evicts: list[Evict]) -> None:
        """Lower the coldest of `group` (a few keys of this layer) to `floor` bits."""
        if self._used <= target:
            return
        scores, have = self.residency.scores, self._have
        cands = [k for k in group if have.get(k, 0) > floor]
        while self._used > target and cands:
            victim = min(cands, key=lambda k: (scores[k], k))
            cands.remove(victim)
            self._lower(victim, floor, evicts)
