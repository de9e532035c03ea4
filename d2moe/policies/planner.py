"""Turn one job order into a feasible plan under the budget.

Both queues follow the job order. When a load does not fit, victims are freed in this
preference: (1) experts neither this layer nor the prefetcher's prediction for the next
layer (`protect`) needs, coldest first; (1b) the predicted next-layer experts, least likely
first; (2) experts of this layer whose runs come earlier in the order (the eviction then
waits for their runs: the one place where the two lanes interact); (3) as a last resort, a
later job's resident expert, which then becomes a miss and is reloaded in its turn. (1) and
(1b) together are every resident expert outside the layer, so protecting the prediction
changes which victims go first, never whether a load fits; without a prediction (no
prefetcher) (1b) is empty. With `plane_drop` (MWQ), a victim whose residual planes cover the
shortfall only loses those planes (it stays resident at b1); otherwise it is evicted whole.
Invariant: every run's expert is resident at >= its bits when it starts, and used bytes
never exceed the budget (checked by `check.check_plan`).
"""

from __future__ import annotations

from collections.abc import Sequence

from d2moe.core.jobs import Demand, Evict, ExpertKey, Load, Plan, Run
from d2moe.policies.coldqueue import ColdQueue
from d2moe.policies.residency import Residency
from d2moe.policies.schedulers import Job
from d2moe.policies.view import PlanError, ResidentView, Sizes


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
        self.cold = ColdQueue()  # resident experts by residency score
        self._have: dict[ExpertKey, int] = {}  # mirror of the pool as our plans leave it
        self._expect = -1  # pool version once our last plan is applied; -1: never synced
        self._rescales = 0  # the residency's `rescales` the cold index was built at
        self._pool: tuple[Sizes, int] | None = None  # (sizes, budget) the residency was told

    def observe(self, demands: Sequence[Demand]) -> None:
        """Update the residency statistics and the cold index with one layer's demands."""
        r = self.residency
        r.observe(demands)
        if r.rescales != self._rescales:  # every score changed: re-index the resident ones
            self._rescales = r.rescales
            self.cold.push(list(self._have), r.scores)
        self.cold.push([d.key for d in demands], r.scores)

    def plan(self, order: Sequence[Job], resident: ResidentView,
             protect: Sequence[ExpertKey] = ()) -> Plan:
        """Derive the I/O and compute queues from `order` and fit the loads into the budget.

        `protect`: the experts the next layer will probably need (the keys `prefetch` will
        be asked for next), most likely first; a load evicts them only once every other
        expert outside this layer is gone, least likely first (preference (1b)), so the
        plan does not evict what its own prefetches would load back.
        """
        sizes = resident.sizes
        budget = resident.budget_bytes
        if self._pool != (sizes, budget):
            self._pool = (sizes, budget)
            self.residency.observe_pool(sizes, budget, self.plane_drop)
        plane_drop = self.plane_drop and sizes.nested
        if resident.version != self._expect:
            # the pool is not what our last plan left (first plan, warm start, another
            # policy): copy it and index every resident expert
            self._have = dict(resident.bits)
            self.cold.push(list(self._have), self.residency.scores)
        have = self._have  # projected forward as the plan unfolds; backends apply the same
        self._used, self._by_bits = resident.used_bytes, sizes.by_bits
        self._b1 = sizes.b1 if plane_drop else 0
        in_layer = {j.key for j in order}
        # (1b) least likely first, not coldest: the predicted probability estimates the one
        # thing protection is for (the next layer running the expert); the residency score
        # ranks by past use, and under LRU the next layer's experts (last run a whole step
        # ago) are the coldest of all, the pattern that made plans evict them to begin with
        self._predicted = [k for k in reversed(protect) if k not in in_layer]
        self._protected = in_layer.union(self._predicted)  # _free_cold skips these
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
                    self._free_cold(target, evicts)
                    self._free_ordered(self._predicted, target, evicts)
                    self._free_list(done, target, evicts)
                    if self._used > target:  # rarely reached: skip building the list
                        self._free_list([j.key for j in order[pos + 1:]], target, evicts)
                    if self._used > target:
                        raise PlanError(f"{job.key} at {job.need} bits ({need_bytes} B) cannot "
                                        f"fit a budget of {budget} B")
                loads.append(Load(job.key, cur, job.need, tuple(evicts)))
                ops += len(evicts) + 1
                self._used += need_bytes
                have[job.key] = job.need  # queued already: observe() pushed its new score
            done.append(job.key)
        self._expect = resident.version + ops
        runs = tuple([Run(d.key, d.bits, d.tokens, None if d.key == j.key else j.key, d.asked)
                      for j in order for d in j.demands])
        return Plan(loads=tuple(loads), runs=runs)

    def prefetch(self, plan: Plan, wanted: Sequence[tuple[ExpertKey, int]],
                 resident: ResidentView) -> Plan:
        """`plan` with prefetch loads for `wanted` (key, bits) appended to its I/O queue.

        Call right after `plan` (given the keys of `wanted` as `protect`). A prefetch may only
        evict experts that neither this layer nor another prefetch needs (coldest first); a
        prefetch that cannot fit so is skipped.
        """
        sizes, budget, have, by_bits = resident.sizes, resident.budget_bytes, self._have, \
            self._by_bits
        protect = set(self._protected) | {k for k, _ in wanted}
        self._protected = protect  # _free_cold skips these
        # bytes that evictions could free at most (every unprotected expert, whole)
        freeable = sum(by_bits[b] for k, b in have.items() if k not in protect)
        loads = list(plan.loads)
        ops = 0
        for key, bits in wanted:
            cur = have.get(key, 0)
            if cur >= bits or (cur and not sizes.nested):
                continue
            need = sizes.load(cur, bits)
            if budget - self._used + freeable < need:
                continue
            evicts: list[Evict] = []
            before = self._used
            self._free_cold(budget - need, evicts)
            if self._used > budget - need:  # every unprotected expert is in the cold index
                raise PlanError(f"prefetch of {key} found {freeable} B freeable but freed "
                                f"{before - self._used} B")
            freeable -= before - self._used
            loads.append(Load(key, cur, bits, tuple(evicts), prefetch=True))
            self.cold.push((key,), self.residency.scores)
            ops += len(evicts) + 1
            self._used += need
            have[key] = bits
        if not ops:
            return plan
        self._expect += ops
        return Plan(loads=tuple(loads), runs=plan.runs)

    def _victim_floor(self, vb: int, short: int) -> int:
        """Bits to leave a victim at: b1 when its planes cover `short` bytes, else 0."""
        b1, by_bits = self._b1, self._by_bits
        return b1 if b1 and vb > b1 and by_bits[vb] - by_bits[b1] >= short else 0

    def _lower(self, key: ExpertKey, floor: int, evicts: list[Evict]) -> None:
        vb = self._have[key]
        by_bits = self._by_bits
        evicts.append(Evict(key, vb, floor))
        self._used -= by_bits[vb] - by_bits[floor]
        if floor:
            self._have[key] = floor
        else:
            del self._have[key]

    def _free_cold(self, target: int, evicts: list[Evict]) -> None:
        """Free bytes from the coldest experts outside `_protected` (this layer and the
        prediction; in `prefetch`, also the other prefetches)."""
        have, cold = self._have, self.cold
        while self._used > target:
            victim = cold.pop(have, 0, self._protected)
            if victim is None:
                return
            floor = self._victim_floor(have[victim], self._used - target)
            self._lower(victim, floor, evicts)
            if floor:  # still resident at b1: back in the queue
                cold.push((victim,), self.residency.scores)

    def _free_ordered(self, group: Sequence[ExpertKey], target: int,
                      evicts: list[Evict]) -> None:
        """Free bytes from `group` in its order (the predicted experts, least likely first)."""
        have = self._have
        for victim in group:
            if self._used <= target:
                return
            if victim in have:
                self._lower(victim, self._victim_floor(have[victim], self._used - target),
                            evicts)

    def _free_list(self, group: Sequence[ExpertKey], target: int, evicts: list[Evict]) -> None:
        """Free bytes from the coldest of `group` (a few keys of this layer)."""
        if self._used <= target:
            return
        scores, have = self.residency.scores, self._have
        cands = [k for k in group if k in have]
        while self._used > target and cands:
            victim = min(cands, key=lambda k: (scores[k], k))
            cands.remove(victim)
            self._lower(victim, self._victim_floor(have[victim], self._used - target), evicts)
