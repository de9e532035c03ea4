"""Policies: a scheduler, a residency rule and options, registered under one name.

A `Policy` is what the simulator and the executor call, through the same hooks: `reset()`
before a run, `preload(experts, resident)` once, and `plan(layer, demands, resident, costs)`
per layer. The baselines of the evaluation are presets here, each one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from d2moe.core.jobs import Demand, ExpertKey, Load, Plan
from d2moe.core.sizes import QuantLayout
from d2moe.policies import ghost as _ghost  # noqa: F401  (registers residency "hot-ghost")
from d2moe.policies.bitrules import BIT_RULES, BitRule
from d2moe.policies.planner import Planner, make_jobs
from d2moe.policies.prefetch import PREFETCHERS, Prefetcher
from d2moe.policies.registry import Registry
from d2moe.policies.residency import RESIDENCY, Residency
from d2moe.policies.schedulers import SCHEDULERS, Costs, Job, Scheduler
from d2moe.policies.stats import ExpertStats
from d2moe.policies.substitute import SUBSTITUTIONS, Substituter, Substitution
from d2moe.policies.view import ResidentView


@dataclass(frozen=True)
class PolicyConfig:
    """A named combination; the registry below maps preset names to these.

    `layout` is the storage a baseline implies ("" keeps the run's; "copies" is one RTN
    copy per bit-width over the run's range; "copies:B1:BK" a fixed range; "nested" the
    run's layout when nested, else bitplane). `bits` is the bit rule (`bitrules.py`):
    asked, uniform (at `uniform_bits`) or static (by importance: `static_bits` most bits
    first, filling `static_shares` of each layer). `pin` loads every expert before the
    first step (Hold-in-Memory). `prefetch` names a prefetcher (`prefetch.py`: none or
    heat); `substitute` a substitution mode (`substitute.py`: none, similar or lower), for
    demands whose router weight is below `substitute_below`.
    """

    scheduler: str
    residency: str
    plane_drop: bool
    layout: str = ""
    bits: str = "asked"
    uniform_bits: int = 0
    static_bits: tuple[int, ...] = (4, 3, 2)
    static_shares: tuple[float, ...] = (0.3, 0.4, 0.3)
    pin: bool = False
    prefetch: str = "none"
    # 0.9: best of 0.3/0.5/0.7/0.9 in every cell of benchmarks/prefetch_use.py (evaluation.md)
    prefetch_min_prob: float = 0.9
    substitute: str = "none"
    substitute_below: float = 0.3

    @property
    def needs_stats(self) -> bool:
        """Whether the policy needs offline expert statistics (importance, similarity): as
        its parts built with them (bit rule, substitution mode, prefetcher) declare in their
        registries (`register(..., needs_stats=True)`). Schedulers and residency rules are
        built without statistics."""
        return (BIT_RULES.needs_stats(self.bits, field="bits")
                or SUBSTITUTIONS.needs_stats(self.substitute, field="substitute")
                or PREFETCHERS.needs_stats(self.prefetch, field="prefetch"))

    def quant_layout(self, run: QuantLayout) -> QuantLayout:
        """The storage layout this policy runs on, given the run's own layout."""
        kind, _, rng = self.layout.partition(":")
        if not kind:
            return run
        if kind == "nested":
            return run if run.nested else replace(run, kind="bitplane")
        if rng:
            b1, bk = (int(v) for v in rng.split(":"))
            return replace(run, kind=kind, b1=b1, bK=bk)
        return replace(run, kind=kind)


class Policy:
    """A pure decision object: demands + resident view (+ cost estimates) -> Plan.

    Hooks, called by the simulator and the executor alike: `reset()` before a run,
    `preload(experts, resident)` once before the first step, `plan(layer, demands,
    resident, costs)` per layer.
    """

    def __init__(self, name: str, config: PolicyConfig, stats: ExpertStats | None = None
                 ) -> None:
        self.name = name
        self.config = config
        self.stats = stats
        self.scheduler: Scheduler = SCHEDULERS.create(config.scheduler)
        self.bit_rule = _bit_rule(config, stats)
        self.reset()

    def reset(self) -> None:
        """Forget all statistics (call before each independent run)."""
        cfg = self.config
        self.residency: Residency = RESIDENCY.create(cfg.residency)
        self.planner = Planner(self.residency, plane_drop=cfg.plane_drop)
        self.substituter: Substituter = SUBSTITUTIONS.factory(
            cfg.substitute, field="substitute")(cfg, self.stats)
        self.prefetcher: Prefetcher = PREFETCHERS.factory(cfg.prefetch, field="prefetch")(
            cfg, self.stats)

    def max_bits(self, asked_max: int) -> int:
        """The most bits a run can use when the workload asks at most `asked_max`."""
        return self.bit_rule.max_bits(asked_max)

    def min_bits(self, asked_min: int) -> int:
        """The fewest bits a run can use when the workload asks at least `asked_min`."""
        return self.bit_rule.min_bits(asked_min)

    def preload(self, experts: Sequence[ExpertKey], resident: ResidentView) -> list[Load]:
        """Loads to apply before the first step: every expert at the uniform bits when
        pinned (Hold-in-Memory), else none. Backends check they fit the budget."""
        if not self.config.pin:
            return []
        bits = self.bit_rule.max_bits(self.config.uniform_bits)
        have = resident.bits
        return [Load(k, have.get(k, 0), bits) for k in experts if have.get(k, 0) < bits]

    def plan(self, layer: int, demands: Sequence[Demand], resident: ResidentView,
             costs: Costs) -> Plan:
        """Plan one layer: bit rule, substitution, job order, fit into the budget, prefetch."""
        demands = self.bit_rule.apply(demands)
        self.planner.observe(demands)
        keep, subs = self.substituter.split(demands, resident)
        jobs = make_jobs(keep, resident)
        if subs:
            jobs = _with_substitutes(jobs, subs, resident)
        if len(jobs) > 1:
            jobs = self.scheduler.order(jobs, costs)
        # predict before planning (it reads only the demands), so the layer's own loads
        # spare the experts its prefetches are about to ask for (planner.py, (1b))
        self.prefetcher.observe(layer, demands)
        guess = self.prefetcher.predict(layer, demands)
        wanted: list[tuple[ExpertKey, int]] = []
        if guess:
            bits = max(d.bits for d in demands)
            wanted = [(k, self.bit_rule.bits(k, bits)) for k, _ in guess]
        plan = self.planner.plan(jobs, resident, protect=[k for k, _ in wanted])
        if wanted:
            plan = self.planner.prefetch(plan, wanted, resident)
        return plan

    def __repr__(self) -> str:
        return f"Policy({self.name}: {self.config})"


def _bit_rule(cfg: PolicyConfig, stats: ExpertStats | None) -> BitRule:
    return BIT_RULES.factory(cfg.bits, field="bits")(cfg, stats)


def _with_substitutes(jobs: list[Job], subs: Sequence[Substitution], resident: ResidentView
                      ) -> list[Job]:
    """Add each substituted demand to its source's job (a resident job when the source is
    not otherwise needed); the planner then runs it as `Run(key, ..., served_by=source)`."""
    at = {j.key: i for i, j in enumerate(jobs)}
    have = resident.bits
    for sub in subs:
        d = sub.demand
        if sub.source in at:
            i = at[sub.source]
            j = jobs[i]
            jobs[i] = j._replace(tokens=j.tokens + d.tokens, demands=(*j.demands, d))
        else:
            h = have.get(sub.source, 0)
            at[sub.source] = len(jobs)
            jobs.append(Job(sub.source, h, d.bits, d.tokens, d.importance, (d,)))
    return jobs


POLICIES: Registry[Policy] = Registry("policy")


def _preset(name: str, doc: str, scheduler: str, residency: str, plane_drop: bool,
            **options: Any) -> None:
    cfg = PolicyConfig(scheduler, residency, plane_drop, **options)

    def factory(stats: ExpertStats | None = None) -> Policy:
        return Policy(name, cfg, stats)

    factory.config = cfg  # type: ignore[attr-defined]  # read without building (needs_stats)
    POLICIES.register(name, doc)(factory)


# The schedulers and residency rules, each with on-demand loading.
_preset("fifo", "expert-ID order, on-demand loads, LRU residency (the LRU-cached baseline)",
        "fifo", "lru", False)
_preset("fifo-lfu", "expert-ID order, on-demand loads, LFU residency (the LFU-cached baseline)",
        "fifo", "lfu", False)
_preset("hebf", "hottest-expert-bit-first order, hottest retained, MWQ plane drops",
        "hebf", "hottest", True)
_preset("hebf-lru", "HEBF order with LRU residency and plane drops", "hebf", "lru", True)
_preset("hebf-recent", "HEBF order, the hottest over a short memory (heat halves every 2 "
        "steps) retained, plane drops", "hebf", "hot-recent", True)
_preset("hebf-adaptive", "HEBF order, retained by a long or short heat memory or recency, "
        "whichever lately predicted demand best, plane drops", "hebf", "hot-adaptive", True)
_preset("hebf-ghost", "HEBF order, retained by a long or short heat memory or recency, "
        "whichever would lately have loaded least, replayed at this budget; plane drops",
        "hebf", "hot-ghost", True)
_preset("johnson", "Johnson's-rule order (optimal without a memory limit), hottest retained",
        "johnson", "hottest", True)
# The baselines of D2MoE's evaluation (method.md), and D2MoE itself.
_preset("hold-in-memory", "every expert INT8 (RTN copy), loaded before the first step",
        "fifo", "lru", False, layout="copies:8:8", bits="uniform", uniform_bits=8, pin=True)
_preset("hold-in-memory-int4", "every expert INT4, resident (RTN, not AWQ: AWQ is not "
        "implemented)", "fifo", "lru", False, layout="copies:4:4", bits="uniform",
        uniform_bits=4, pin=True)
_preset("matryoshka-free", "routed bit-widths as separate RTN copies, loaded on demand (LRU)",
        "fifo", "lru", False, layout="copies")
_preset("edgemoe", "static per-expert bit-widths by importance (4/3/2 bits for 30/40/30%), "
        "copies, heat prefetch, LRU", "fifo", "lru", False, layout="copies", bits="static",
        prefetch="heat")
_preset("moqe-dynaio", "one uniform bit-width (INT4 copies), loaded on demand (LRU)",
        "fifo", "lru", False, layout="copies:4:4", bits="uniform", uniform_bits=4)
_preset("d2moe", "D2MoE: routed bits, nested store, HEBF order, hottest retained, plane drops",
        "hebf", "hottest", True, layout="nested")
_preset("d2moe-adaptive", "D2MoE with hebf-adaptive's residency (a long or short heat memory "
        "or recency, whichever lately predicted demand best)", "hebf", "hot-adaptive", True,
        layout="nested")
_preset("d2moe-ghost", "D2MoE with hebf-ghost's residency (whichever of a long or short heat "
        "memory or recency would lately have loaded least, replayed at this budget)", "hebf",
        "hot-ghost", True, layout="nested")
# Ablation, one part at a time (the paper's +Router, +MWQ, +HEBF, +Budget); the last is d2moe.
_preset("ablate-base", "ablation base: uniform INT4 copies, FIFO order, LRU", "fifo", "lru",
        False, layout="copies:4:4", bits="uniform", uniform_bits=4)
_preset("ablate+router", "+Router: routed bit-widths (as RTN copies)", "fifo", "lru", False,
        layout="copies")
_preset("ablate+mwq", "+MWQ: routed bit-widths from the nested store", "fifo", "lru", False,
        layout="nested")
_preset("ablate+hebf", "+HEBF: hottest-expert-bit-first order", "hebf", "lru", True,
        layout="nested")
# System 2 and the project's additions.
_preset("sub-similar", "HEBF + substitute a low-importance miss by the most similar resident "
        "expert (System 2)", "hebf", "hottest", True, substitute="similar")
_preset("sub-lower", "HEBF + serve a low-importance miss at the bits already resident (MWQ)",
        "hebf", "hottest", True, layout="nested", substitute="lower")
_preset("hebf-prefetch", "HEBF + prefetch of the next layer's experts by predicted heat",
        "hebf", "hottest", True, prefetch="heat")


def make_policy(name: str, stats: ExpertStats | None = None) -> Policy:
    """Build a fresh policy by registry name (raises UserError on an unknown name)."""
    return POLICIES.create(name, stats=stats)


def policy_config(name: str, *, field: str = "policy") -> PolicyConfig:
    """A preset's configuration without building it (a UserError naming `field`, the
    option the name came from, on an unknown name)."""
    return POLICIES.factory(name, field=field).config  # type: ignore[attr-defined]
