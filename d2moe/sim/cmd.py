"""`d2moe simulate`: replay a trace through policies on a profile; write events, metrics, plots."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from d2moe.core.cliargs import add_fields, check_at_least, from_args, split_list
from d2moe.core.errors import UserError
from d2moe.core.events import Timeline, save_timeline
from d2moe.core.fileio import atomic_write
from d2moe.core.sizes import QuantLayout, fmt_bytes, layout_from_options
from d2moe.core.spec import load_spec


@dataclass(frozen=True)
class SimulateConfig:
    """Options of `d2moe simulate` (the CLI is built from these fields)."""

    model_spec: str = field(default="mixtral-8x7b", metadata={
        "help": "shipped spec (mixtral-8x7b, llama-moe-3.5b, qwen1.5-moe-a2.7b, olmoe-1b-7b, "
                "deepseek-v2-lite, tiny), a spec YAML or an HF config.json", "metavar": "SPEC"})
    profile: str = field(default="rtx3060-laptop", metadata={
        "help": "shipped profile (rtx3060-laptop, jetson-agx-orin: estimated; cpu-2core "
                "(2-core AMD EPYC VM), cpu-2core-xeon (2-core Intel Xeon VM), h100: measured) "
                "or a profile YAML from `d2moe profile`",
        "metavar": "PROFILE"})
    trace: str = field(default="", metadata={
        "help": "trace .npz from `d2moe trace synth|record`; empty: a synthetic trace of the "
                "spec with the generator's defaults", "metavar": "FILE"})
    policy: str = field(default="fifo,hebf", metadata={
        "help": "policy name(s), comma-separated (see `d2moe simulate --list`)",
        "metavar": "P1,P2"})
    budget: str = field(default="50%", metadata={
        "help": "expert memory budget: bytes (6GiB, 512MB; a bare whole number above 1 is "
                "bytes), a percentage (40%%) or a fraction (0.4) of all experts at the highest "
                "bits the trace asks for"})
    bits: int = field(default=4, metadata={"help": "bit-width where the trace has none"})
    layout: str = field(default="bitplane", metadata={
        "help": "expert storage: bitplane (nested bit planes of one code, the default), mwq "
                "(the paper's nested residual planes), copies (one RTN copy per bit-width: "
                "Matryoshka-Free), dense (fp16)"})
    # --store-bits B1:BK sets both (d2moe.core.cliargs); --b1 and --bK are its older spelling
    b1: int = field(default=QuantLayout.b1, metadata={"help": "lowest stored bit-width"})
    bK: int = field(default=QuantLayout.bK, metadata={"help": "highest stored bit-width"})
    group: int = field(default=QuantLayout.group, metadata={
        "help": "quantization group size (weights)"})
    expert_stats: str = field(default="", metadata={
        "help": "expert importance and similarity (d2moe experts stats) for the policies that "
                "use them (edgemoe, sub-similar); empty: derived from the trace's routing"},)
    host_cache: str = field(default="0", metadata={
        "help": "host-RAM tier for experts read once from disk, sized as --budget: bytes "
                "(8GiB), a percentage (100%%) or a fraction (1.0) of all experts at the "
                "highest bits the trace asks for; 0: none"})
    engine: str = field(default="fast", metadata={
        "help": "fast (exact recurrence) or simpy (the SimPy process model); same events"})
    steps: int = field(default=0, metadata={"help": "simulate only the first N steps (0: all)"})
    plot_steps: int = field(default=2, metadata={
        "help": "steps shown in the bubble timeline, from the first decode step (0: all)"})
    chrome: bool = field(default=True, metadata={
        "help": "write chrome.json, a Perfetto trace of every run (its size grows with the "
                "steps: ~16 MB for Mixtral-8x7B's default trace)"})
    out: str = field(default="out/simulate", metadata={"help": "output directory"})

    def __post_init__(self) -> None:
        for name in ("steps", "plot_steps"):  # 0 means all; a negative count means nothing
            check_at_least(getattr(self, name), 0, name, note="all")

    @property
    def quant_layout(self) -> QuantLayout:
        return layout_from_options(self.layout, self.b1, self.bK, self.group)


def register(subparsers: Any) -> None:
    """Add the `simulate` verb."""

    p = subparsers.add_parser(
        "simulate", help="simulate scheduling policies on a trace and a hardware profile",
        description="Replay a routing trace through one or more policies on a hardware "
                    "profile under a memory budget. Prints a metrics table and writes "
                    "events-POLICY.npz, metrics.json, bubbles.png, resident.png and "
                    "chrome.json (open in ui.perfetto.dev) to --out.",
        epilog="The registered policies, one per line: d2moe simulate --list.")
    add_fields(p, SimulateConfig)
    from d2moe.router.adaptive import CapacityConfig

    # --capacity-mode fixed|adaptive and its knobs: a trace recorded with a bit-width router
    add_fields(p, CapacityConfig)
    p.add_argument("--list", action="store_true", help="list the policies and exit")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.list:
        from d2moe.policies import POLICIES

        print(format_policy_list(POLICIES.names(), POLICIES.doc))
        return 0
    from d2moe.router.adaptive import CapacityConfig

    cfg = from_args(SimulateConfig, args)
    result = run_simulations(cfg, capacity=from_args(CapacityConfig, args))
    print(result["table"])
    print(f"wrote {', '.join(result['files'])}")
    return 0


def format_policy_list(names: list[str], doc: Callable[[str], str]) -> str:
    """`d2moe simulate --list`: one policy a line, its description in a column after the
    longest name (`doc`: name -> one-line description)."""
    width = max((len(n) for n in names), default=0)
    return "\n".join(f"{n:<{width}}  {doc(n)}" for n in names)


@dataclass(frozen=True)
class Prepared:
    """What every policy of one simulation shares: spec, profile, trace, steps, budget."""

    cfg: SimulateConfig
    spec: Any
    profile: Any
    trace: Any
    trace_name: str
    steps: list
    layout: QuantLayout
    budget_bytes: int
    host_bytes: int
    capacity: Any = None  # d2moe.router.adaptive.CapacityConfig, or None: fixed


def prepare(cfg: SimulateConfig, capacity: Any = None) -> Prepared:
    """Load the spec, profile and trace of `cfg` and fix the budget in bytes; `capacity` (a
    CapacityConfig) re-places a router trace's widths (d2moe/sim/adaptive.py), checked here
    before any work. With a router trace the budget's percentages are of all experts at the
    router's widest width (any share may grow to it)."""
    from d2moe.profiles import load_profile
    from d2moe.sim.adaptive import RecordedRouter, capacity_source
    from d2moe.sim.workload import budget_bytes, max_bits, steps_from_trace
    from d2moe.traces import load_trace, synth_trace
    from d2moe.traces.synth import SynthConfig

    spec = load_spec(cfg.model_spec)
    profile = load_profile(cfg.profile)
    layout = cfg.quant_layout
    if cfg.trace:
        trace = load_trace(cfg.trace)
        trace.check_spec(spec)
        trace_name = cfg.trace
    else:
        trace = synth_trace(spec, SynthConfig())
        trace_name = f"synth({spec.name}, defaults)"
    source = capacity_source(trace, cfg.bits, capacity, cfg.steps)  # bad options fail here
    steps = steps_from_trace(trace, cfg.bits, cfg.steps)
    router = RecordedRouter.of(trace)
    top = max(max_bits(steps, cfg.bits), max(router.bits) if router else 0)
    _check_stored(layout, source.min_bits(cfg.bits), top)
    budget = budget_bytes(cfg.budget, spec, layout, top)
    host = (budget_bytes(cfg.host_cache, spec, layout, top, field="host-cache")
            if cfg.host_cache != "0" else 0)
    return Prepared(cfg, spec, profile, trace, trace_name, steps, layout, budget, host,
                    capacity)


def _check_stored(layout: QuantLayout, low: int, top: int) -> None:
    """The bit-widths the workload asks for (the trace's, --bits where it has none, a
    router's any) must lie in the stored range (--store-bits B1:BK), both ends alike: a
    store of b1.. bits cannot serve fewer, nor more than bK (dense stores every width)."""
    if layout.kind == "dense":
        return
    asks = f"the workload asks for {low}..{top}-bit experts (the trace's bits, --bits where " \
           "it has none)"
    if layout.b1 <= low and top <= layout.bK:
        return
    side = "below" if low < layout.b1 else "above"
    wider = f"pass --store-bits {min(low, layout.b1)}:{max(top, layout.bK)}" if top <= 8 else \
        "pass --layout dense (fp16 experts: a quantized store holds at most 8 bits)"
    raise UserError(f"{asks}, {side} the stored range {layout.b1}:{layout.bK}",
                    field="store-bits",
                    fix=f"{wider}, or a trace of {layout.b1}..{layout.bK} bits")


def build_policy(prep: Prepared, name: str) -> Any:
    """The registered policy `name`, with expert statistics when it uses them: from
    --expert-stats, else from the trace's routing (a proxy: d2moe/experts/from_trace.py)."""
    from d2moe.policies import make_policy, policy_config

    if not policy_config(name).needs_stats:
        return make_policy(name)
    from d2moe.experts import load_stats, stats_from_trace

    if prep.cfg.expert_stats:
        stats = load_stats(prep.cfg.expert_stats, spec=prep.spec)
    else:
        stats = stats_from_trace(prep.trace)
    return make_policy(name, stats=stats)


def simulate_policy(prep: Prepared, policy: Any) -> Timeline:
    """Simulate one policy object on a prepared workload; the timeline's meta has the wall
    time the simulation took (`sim_wall_s`) and, for a router trace, the router's
    `capacity` (fixed shares, or the adaptive controller's decisions), as the executor's."""
    from d2moe.sim.adaptive import capacity_source
    from d2moe.sim.simulator import SimSetup, simulate

    cfg = prep.cfg
    setup = SimSetup(prep.spec, prep.profile, prep.layout, prep.budget_bytes,
                     host_cache_bytes=prep.host_bytes, engine=cfg.engine,
                     meta={"trace": prep.trace_name, "budget": cfg.budget})
    t0 = time.perf_counter()
    source = capacity_source(prep.trace, cfg.bits, prep.capacity, cfg.steps)  # fresh state
    tl = simulate(setup, source, policy)
    tl.meta["sim_wall_s"] = time.perf_counter() - t0
    if source.record() is not None:
        tl.meta["capacity"] = source.record()
    return tl


def run_simulations(cfg: SimulateConfig, capacity: Any = None) -> dict[str, Any]:
    """Simulate every policy of `cfg` on one trace; write the outputs; return table and files.
    `capacity` (a d2moe.router.adaptive.CapacityConfig) applies to a router trace."""
    from d2moe.analysis import (
        compute_metrics,
        export_chrome,
        format_table,
        metrics_row,
        plot_bubbles,
        plot_resident,
    )
    from d2moe.policies import policy_config

    names = split_list(cfg.policy, "policy", example="--policy fifo,hebf")
    for n in names:  # unknown names fail before any work
        policy_config(n)
    prep = prepare(cfg, capacity)
    policies = [build_policy(prep, n) for n in names]
    spec, profile, layout, budget = prep.spec, prep.profile, prep.layout, prep.budget_bytes
    steps, trace_name = prep.steps, prep.trace_name
    out = Path(cfg.out)
    timelines: list[Timeline] = []
    rows = []
    files = []
    for policy in policies:
        tl = simulate_policy(prep, policy)
        timelines.append(tl)
        path = out / f"events-{policy.name}.npz"
        save_timeline(path, tl)
        files.append(str(path))
        m = compute_metrics(tl)
        rows.append((policy.name, m, metrics_row(policy.name, m)))
    table = format_table([r[2] for r in rows])
    resident = budget + spec.non_expert_bytes
    if resident > profile.device_memory_bytes:
        table += (f"\nnote: budget + non-expert weights ({fmt_bytes(resident)}) exceed the "
                  f"profile's device memory ({fmt_bytes(profile.device_memory_bytes)})")
    header = (f"{spec.name} on {profile.name} ({profile.source.kind}), {trace_name}: "
              f"{len(steps)} steps\nbudget {cfg.budget} = {fmt_bytes(budget)}, "
              f"layout {layout.kind} {layout.b1}..{layout.bK} bits, default {cfg.bits} bits, "
              f"simulated")
    table += _capacity_lines(prep, timelines)
    metrics = {"config": asdict(cfg), "budget_bytes": budget, "model": spec.name,
               "profile": profile.name, "profile_source": profile.source.kind,
               "policies": {name: m.as_dict() for name, m, _ in rows}}
    if capacity is not None:
        metrics["capacity_config"] = asdict(capacity)
    capacity_meta = {tl.meta["policy"]: tl.meta["capacity"] for tl in timelines
                     if "capacity" in tl.meta}
    if capacity_meta:
        metrics["capacity"] = capacity_meta
    with atomic_write(out / "metrics.json") as f:
        json.dump(metrics, f, indent=1, default=float)
    files.append(str(out / "metrics.json"))
    window = _window(timelines, cfg.plot_steps)
    files.append(str(plot_bubbles(timelines, out / "bubbles.png", labels=names, window=window,
                                  title=f"{header}")))
    files.append(str(plot_resident(timelines, out / "resident.png", labels=names,
                                   budget_bytes=budget, title=f"resident expert bytes: {header}")))
    if cfg.chrome:
        files.append(str(export_chrome(timelines, out / "chrome.json", labels=names)))
    return {"table": header + "\n" + table, "files": files, "timelines": timelines,
            "metrics": {name: m for name, m, _ in rows}}


def _capacity_lines(prep: Prepared, timelines: list[Timeline]) -> str:
    """Per policy, the router's capacities and the decode runs' average bits (simulated)."""
    import numpy as np

    from d2moe.router.adaptive import describe, run_bits
    from d2moe.traces.schema import DECODE

    decode = np.flatnonzero(prep.trace.phase_codes == DECODE)
    first = int(decode[0]) if decode.size else prep.trace.num_steps
    return "".join(f"\n{tl.meta['policy']}: "
                   f"{describe(tl.meta['capacity'], run_bits(tl.events, first), 'simulated')}"
                   for tl in timelines if "capacity" in tl.meta)


def _window(timelines: list[Timeline], n_steps: int) -> tuple[float, float] | None:
    """From the first decode step's start to the end of the n-th step after it (all runs)."""
    if n_steps <= 0:
        return None
    lo, hi = float("inf"), float("-inf")
    for tl in timelines:
        steps = sorted((e.step, e.start_us, e.end_us) for e in tl.events if e.lane == "step")
        first = next((i for i, e in enumerate(tl.events) if e.kind == "decode"), None)
        s0 = tl.events[first].step if first is not None else 0
        chosen = [s for s in steps if s0 <= s[0] < s0 + n_steps]
        if chosen:
            lo, hi = min(lo, chosen[0][1]), max(hi, chosen[-1][2])
    return (lo, hi) if hi > lo else None
