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
from d2moe.policies.residency import Residency
from d2moe.policies.schedulers import Job
from d2moe.policies.view import PlanError, ResidentView


def make_jobs(demands: Sequence[Demand], resident: ResidentView) -> list[Job]:
    """Group a layer's demands by expert (demands arrive sorted by expert, then bits)."""
    by_key: dict[ExpertKey, list[Demand]] = {}
    for d in demands:
        by_key.setdefault(d.key, []).append(d)
    bits = resident.bits
    jobs = []
    for key, ds in by_key.items():
        need = max(d.bits for d in ds)
        jobs.append(Job(key, bits.get(key, 0), need, sum(d.tokens for d in ds),
                        max(d.importance for d in ds), tuple(ds)))
    return jobs


def plan_in_order(order: Sequence[Job], resident: ResidentView, residency: Residency, *,
                  plane_drop: bool) -> Plan:
    """Derive the I/O and compute queues from `order` and fit the loads into the budget."""
    sizes = resident.sizes
    by_bits = sizes.by_bits
    budget = resident.budget_bytes
    have = dict(resident.bits)  # our projection of the pool as the plan unfolds
    used = resident.used_bytes
    in_layer = {j.key for j in order}
    done: list[ExpertKey] = []  # keys of jobs earlier in the order (their runs come first)
    loads: list[Load] = []

    for pos, job in enumerate(order):
        cur = have.get(job.key, 0)
        if cur < job.need:
            evicts: list[Evict] = []
            if cur and not sizes.nested:  # copies: the old copy goes before the new one comes
                evicts.append(Evict(job.key, cur, 0))
                used -= by_bits[cur]
                del have[job.key]
                cur = 0
            need_bytes = sizes.load(cur, job.need)
            if used + need_bytes > budget:
                later = [j.key for j in order[pos + 1:] if j.key in have]
                groups = ([k for k in have if k not in in_layer], list(done), later)
                for group in groups:
                    ranked = residency.coldest_first(k for k in group if k in have)
                    rounds = (sizes.b1, 0) if plane_drop and sizes.nested else (0,)
                    for floor in rounds:
                        for victim in ranked:
                            if used + need_bytes <= budget:
                                break
                            vb = have.get(victim, 0)
                            if vb <= floor:
                                continue
                            evicts.append(Evict(victim, vb, floor))
                            used -= by_bits[vb] - by_bits[floor]
                            if floor:
                                have[victim] = floor
                            else:
                                del have[victim]
                    if used + need_bytes <= budget:
                        break
                if used + need_bytes > budget:
                    raise PlanError(f"{job.key} at {job.need} bits ({need_bytes} B) cannot fit "
                                    f"a budget of {budget} B")
            loads.append(Load(job.key, cur, job.need, tuple(evicts)))
            used += need_bytes
            have[job.key] = job.need
        done.append(job.key)

    runs = tuple(Run(d.key, d.bits, d.tokens) for j in order for d in j.demands)
    return Plan(loads=tuple(loads), runs=runs)
