"""Sweep cells: one (trace, profile, budget, policy) each, run in a worker process.

`run_cell` is what a worker (a local process or a Ray task) executes; it returns the cell's
row. The prepared workload (spec, profile, trace, steps, budget) is cached per worker, so
the policies of one (trace, profile, budget) share it when they land on the same worker.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from d2moe.core.errors import UserError
from d2moe.sim.cmd import Prepared, SimulateConfig
from d2moe.sweep.grid import Grid, TraceEntry

TRACES_DIR = "traces"


@dataclass(frozen=True)
class Cell:
    """One simulation of the sweep: everything a worker needs, picklable."""

    trace: TraceEntry
    trace_file: str  # the .npz the simulation reads (a synthetic trace is written once)
    profile: str
    budget: str
    policy: str
    bits: int
    layout: str
    b1: int
    bK: int
    group: int
    host_cache: str
    steps: int
    engine: str
    capacity: Any = None  # CapacityConfig for router traces, or None (the recorded widths)

    @property
    def cell_id(self) -> str:
        """A stable id: a hash of the trace, profile, budget, policy and shared options, and
        of the grid's model_spec where it replaces a .npz trace's own (a synthetic trace's
        spec is in its text): everything that changes the cell's result but the contents
        of the files named."""
        key: list[Any] = [self.trace.text, self.profile, self.budget, self.policy, self.bits,
                          self.layout, self.b1, self.bK, self.group, self.host_cache,
                          self.steps, self.engine]
        if self.capacity is not None:  # (grids without one keep their earlier ids)
            key.append(asdict(self.capacity))
        if self.trace.model_spec:  # (likewise)
            key.append({"model_spec": self.trace.model_spec})
        return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]

    @property
    def group_key(self) -> tuple[str, str]:
        """(trace, budget): the cells that share one oracle hit rate (the layout is shared)."""
        return self.trace.text, self.budget

    def simulate_config(self, profile: str | None = None) -> SimulateConfig:
        """The SimulateConfig of this cell (its policy aside: the cache key of `prepared`)."""
        return SimulateConfig(model_spec=self.trace.spec, profile=profile or self.profile,
                              trace=self.trace_file, policy="", budget=self.budget,
                              bits=self.bits, layout=self.layout, b1=self.b1, bK=self.bK,
                              group=self.group, host_cache=self.host_cache, engine=self.engine,
                              steps=self.steps, out="")

    def fields(self) -> dict[str, Any]:
        """The row columns that name the cell."""
        return {"cell_id": self.cell_id, "trace": self.trace.text, "profile": self.profile,
                "budget": self.budget, "policy": self.policy, "bits": self.bits,
                "layout": self.layout, "b1": self.b1, "bK": self.bK, "group": self.group,
                "host_cache": self.host_cache, "step_limit": self.steps, "engine": self.engine,
                "capacity_mode": self.capacity.capacity_mode if self.capacity else None,
                "run_kind": "simulated"}


def expand(grid: Grid, out: str | Path) -> list[Cell]:
    """Every cell of `grid`, trace-major, policies innermost (neighbours share a workload)."""
    cells = []
    for entry in grid.traces:
        file = trace_path(entry, out)
        for profile in grid.profiles:
            for budget in grid.budgets:
                cells.extend(Cell(entry, file, profile, budget, policy, grid.bits, grid.layout,
                                  grid.b1, grid.bK, grid.group, grid.host_cache, grid.steps,
                                  grid.engine, grid.capacity) for policy in grid.policies)
    return cells


def trace_path(entry: TraceEntry, out: str | Path) -> str:
    """Where the simulation reads `entry`: its file, or OUT/traces/<name>.npz if synthetic."""
    if not entry.is_synth:
        return entry.path
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", entry.text[len("synth:"):])[:80]
    digest = hashlib.sha1(entry.text.encode()).hexdigest()[:8]
    return str(Path(out).resolve() / TRACES_DIR / f"synth-{slug}-{digest}.npz")


def ensure_trace(cell: Cell) -> None:
    """Write a synthetic cell's trace file if it is missing (deterministic, atomic)."""
    path = Path(cell.trace_file)
    if not cell.trace.is_synth or path.is_file():
        return
    from d2moe.core.spec import load_spec
    from d2moe.traces import save_trace, synth_trace

    save_trace(path, synth_trace(load_spec(cell.trace.spec), cell.trace.synth_config()))


@lru_cache(maxsize=4)
def prepared(cfg: SimulateConfig, capacity: Any = None) -> Prepared:
    """`d2moe.sim.cmd.prepare`, cached per worker (a few workloads: they can be large)."""
    from d2moe.sim.cmd import prepare

    return prepare(cfg, capacity)


def run_cell(cell: Cell) -> dict[str, Any]:
    """Simulate one cell; its row: the cell's fields, status, message, metrics, wall time.

    Bad input (a UserError) becomes status `does-not-fit` (the budget cannot hold an
    expert) or `error`, with the message; anything else is a bug and propagates.
    """
    from d2moe.analysis import compute_metrics
    from d2moe.sim.cmd import build_policy, simulate_policy

    t0 = time.perf_counter()
    row = cell.fields()
    row.update(status="ok", message="", model=None, profile_source=None, budget_bytes=None)
    try:
        ensure_trace(cell)
        prep = prepared(cell.simulate_config(), cell.capacity)
        row.update(model=prep.spec.name, profile_source=prep.profile.source.kind,
                   budget_bytes=prep.budget_bytes)
        timeline = simulate_policy(prep, build_policy(prep, cell.policy))
        row["sim_wall_s"] = timeline.meta.get("sim_wall_s")
        row.update(compute_metrics(timeline).as_dict())
    except UserError as exc:
        row["status"] = "does-not-fit" if exc.field == "budget" else "error"
        row["message"] = str(exc)
    row["wall_s"] = time.perf_counter() - t0
    return row


def oracle_hit_rate(cell: Cell, profile: str | None = None) -> float | None:
    """Belady's hit rate for the cell's (trace, budget, layout); None when the oracle module
    is not there, the workload cannot be prepared, or the budget holds fewer whole experts
    than one layer demands (the oracle is undefined there)."""
    try:
        from d2moe.analysis.oracle import belady
    except ImportError:
        return None
    from d2moe.policies import Sizes

    try:
        ensure_trace(cell)
        prep = prepared(cell.simulate_config(profile))
    except UserError:
        return None
    try:
        result = belady(prep.steps, Sizes.of(prep.spec, prep.layout), prep.budget_bytes)
    except ValueError:  # the budget holds fewer experts than one layer demands at once
        return None
    return float(result.hit_rate)


def oracle_available() -> bool:
    """Whether `d2moe.analysis.oracle` exists here (it is optional)."""
    import importlib.util

    return importlib.util.find_spec("d2moe.analysis.oracle") is not None
