"""Policies: a scheduler plus a residency rule plus options, registered under one name.

A `Policy` is what the simulator and the executor call, through the same two hooks:
`reset()` before a run and `plan(layer, demands, resident, costs)` per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from d2moe.core.jobs import Demand, Plan
from d2moe.policies.planner import Planner, make_jobs
from d2moe.policies.registry import Registry
from d2moe.policies.residency import RESIDENCY, Residency
from d2moe.policies.schedulers import SCHEDULERS, Costs, Scheduler
from d2moe.policies.view import ResidentView


@dataclass(frozen=True)
class PolicyConfig:
    """A named combination; the registry below maps preset names to these."""

    scheduler: str
    residency: str
    plane_drop: bool


class Policy:
    """A pure decision object: demands + resident view (+ cost estimates) -> Plan."""

    def __init__(self, name: str, config: PolicyConfig) -> None:
        self.name = name
        self.config = config
        self.scheduler: Scheduler = SCHEDULERS.create(config.scheduler)
        self.reset()

    def reset(self) -> None:
        """Forget all statistics (call before each independent run)."""
        self.residency: Residency = RESIDENCY.create(self.config.residency)
        self.planner = Planner(self.residency, plane_drop=self.config.plane_drop)

    def plan(self, layer: int, demands: Sequence[Demand], resident: ResidentView,
             costs: Costs) -> Plan:
        """Plan one layer: order its jobs, then fit their loads into the budget."""
        self.planner.observe(demands)
        jobs = make_jobs(demands, resident)
        if len(jobs) > 1:
            jobs = self.scheduler.order(jobs, costs)
        return self.planner.plan(jobs, resident)

    def __repr__(self) -> str:
        return f"Policy({self.name}: {self.config})"


POLICIES: Registry[Policy] = Registry("policy")


def _preset(name: str, doc: str, scheduler: str, residency: str, plane_drop: bool) -> None:
    cfg = PolicyConfig(scheduler, residency, plane_drop)
    POLICIES.register(name, doc)(lambda: Policy(name, cfg))


_preset("fifo", "expert-ID order, on-demand loads, LRU residency", "fifo", "lru", False)
_preset("fifo-lfu", "expert-ID order, on-demand loads, LFU residency", "fifo", "lfu", False)
_preset("hebf", "hottest-expert-bit-first order, hottest retained, MWQ plane drops",
        "hebf", "hottest", True)
_preset("hebf-lru", "HEBF order with LRU residency and plane drops", "hebf", "lru", True)
_preset("johnson", "Johnson's-rule order (optimal without a memory limit), hottest retained",
        "johnson", "hottest", True)


def make_policy(name: str) -> Policy:
    """Build a fresh policy by registry name (raises UserError on an unknown name)."""
    return POLICIES.create(name)
