"""Check a plan against the invariants every backend relies on (used by tests and backends)."""

from __future__ import annotations

from collections.abc import Sequence

from d2moe.core.jobs import Demand, Plan, load_waits, run_waits
from d2moe.policies.view import PlanError, ResidentSet


def check_plan(plan: Plan, demands: Sequence[Demand], pool: ResidentSet, *,
               substitute_below: float = float("inf")) -> None:
    """Apply `plan` to a copy of `pool` in dependency order and raise PlanError on a breach.

    Checks: loads and evictions match the resident bits; the budget holds after every
    load; every demand runs exactly once (its tokens at the bits they were routed at, run
    at the bits the policy chose); each run's source is resident at >= its bits when it
    runs; an eviction of an expert that runs in this plan comes after the runs that still
    need those bits (`core.jobs.load_waits`); a substituted run's demand has importance
    below `substitute_below` (System 2 never substitutes a high-importance expert).
    """
    sim = ResidentSet(pool.sizes, pool.budget_bytes)
    sim.bits = dict(pool.bits)
    sim.used_bytes = pool.used_bytes
    wanted = sorted((d.key, d.asked or d.bits, d.tokens) for d in demands)
    got = sorted((r.key, r.routed_bits, r.tokens) for r in plan.runs)
    if wanted != got:
        raise PlanError(f"runs {got} do not match demands {wanted}")
    importance = {(d.key, d.asked or d.bits): d.importance for d in demands}
    for r in plan.runs:
        if r.served_by is not None and importance[(r.key, r.routed_bits)] >= substitute_below:
            raise PlanError(f"{r} substitutes a demand of importance "
                            f"{importance[(r.key, r.routed_bits)]} >= {substitute_below}")
    lw, rw = load_waits(plan), run_waits(plan)
    # Walk both queues as the backends do: a run needs its last load done; a load's
    # evictions of experts that still run in this plan need those runs done.
    i = j = 0
    while i < len(plan.loads) or j < len(plan.runs):
        moved = False
        if i < len(plan.loads):
            ld = plan.loads[i]
            if lw[i] < j:
                for ev in ld.evict:
                    sim.apply_evict(ev)
                sim.apply_load(ld)
                i += 1
                moved = True
        if j < len(plan.runs):
            run = plan.runs[j]
            if rw[j] < i:
                if sim.bits.get(run.source, 0) < run.bits:
                    raise PlanError(f"{run} starts with {run.source} at "
                                    f"{sim.bits.get(run.source, 0)} bits")
                j += 1
                moved = True
        if not moved:
            raise PlanError(f"deadlock at load {i} / run {j}")
