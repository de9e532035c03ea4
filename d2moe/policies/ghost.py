"""Residency chosen by replaying the pool: each candidate rule keeps a ghost of the pool at
the real budget, planned by a planner of its own (plane drops included), and the rule whose
ghost has lately loaded the fewest bytes gives the scores in use.

`hot-adaptive` (residency.py) rates the rules by how high they rank the experts asked for,
over all of a layer's experts; at a tight budget only the few that stay resident matter,
and that rating picked recency where the heat memories kept more (evaluation.md, "HEBF's
residency memory"). A ghost rates a rule by the thing the budget decides: what it would
have had to load. The ghosts are accounting only (`view.ResidentSet`): no data moves.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from d2moe.core.jobs import Demand, ExpertKey
from d2moe.policies.planner import Planner, make_jobs
from d2moe.policies.residency import RESIDENCY, HotRecent, Hottest, Lru, Residency
from d2moe.policies.view import ResidentSet, Sizes


@RESIDENCY.register("hot-ghost")
class HotGhost:
    """Keep what whichever of a long heat memory (`Hottest`), a short one (`HotRecent`) or
    recency (`Lru`) would lately have loaded least for, replayed at this budget.

    Each rule drives a ghost pool (a `ResidentSet` of the real budget and sizes, planned by
    a `Planner` with the real plane drops, in expert order, without prefetch); its cost is
    an exponential average over layers (weight `alpha`) of the bytes its plan loaded. The
    scores in use are the cheapest ghost's rule's; a switch changes every score at once
    (a rescale). Until the planner tells the pool (`observe_pool`), the rules only count.
    """

    name = "hot-ghost"

    def __init__(self, alpha: float = 0.01) -> None:
        self.alpha = alpha
        self.rules: tuple[Residency, ...] = (Hottest(), HotRecent(), Lru())
        self.cost = [0.0] * len(self.rules)  # each ghost's averaged bytes loaded per layer
        self.using = 0  # index into `rules`
        self.switches = 0
        self.scores: defaultdict[ExpertKey, float] = self.rules[0].scores
        self.ghosts: list[tuple[Planner, ResidentSet]] = []

    @property
    def rescales(self) -> int:
        """The switches and the rules' own rescales: each changed every score in use."""
        return self.switches + sum(r.rescales for r in self.rules)

    def observe_pool(self, sizes: Sizes, budget_bytes: int, plane_drop: bool) -> None:
        """Start the ghosts, empty, at this pool's budget (again when it changes)."""
        self.ghosts = [(Planner(rule, plane_drop=plane_drop), ResidentSet(sizes, budget_bytes))
                       for rule in self.rules]

    def observe(self, demands: Sequence[Demand]) -> None:
        if not self.ghosts:
            for rule in self.rules:
                rule.observe(demands)
            return
        for i, (planner, pool) in enumerate(self.ghosts):
            planner.observe(demands)  # (its rule observes here)
            loaded = 0
            have = pool.bits
            if any(have.get(d.key, 0) < d.bits for d in demands):  # else no loads, no evictions
                plan = planner.plan(make_jobs(demands, pool.view), pool.view)
                for ld in plan.loads:
                    for ev in ld.evict:
                        pool.apply_evict(ev)
                    loaded += pool.apply_load(ld)
            self.cost[i] += self.alpha * (loaded - self.cost[i])
        best = min(range(len(self.rules)), key=self.cost.__getitem__)
        if self.cost[best] < self.cost[self.using]:
            self.using, self.switches = best, self.switches + 1
            self.scores = self.rules[best].scores
