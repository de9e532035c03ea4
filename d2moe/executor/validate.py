"""`d2moe validate`: run the real executor, record its routing trace, simulate that same trace
with a hardware profile, and report per (policy, budget) real against simulated tokens/s, lane
busy and bubble time and hit rate, with the error in %, plus side-by-side timelines.

Everything compared is read from the two timelines' Event rows (`analysis/fidelity.py`).
With a bit-width router (`--router`) both sides run its widths under the same
`CapacityConfig`: the real run asks it live, the simulator goes through
`d2moe.sim.adaptive.capacity_source` on the recorded widths and gate probabilities.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2moe.core.cliargs import (
    add_fields,
    check_at_least,
    check_dtype,
    dtype_field,
    from_args,
    model_field,
    once_each,
    require_modules,
    split_list,
    sync_rows_field,
)
from d2moe.core.errors import UserError
from d2moe.core.events import Timeline
from d2moe.core.fileio import atomic_write
from d2moe.executor.profile_choice import chosen_profile, other_machine_line

if TYPE_CHECKING:  # torch and numpy stay out of `d2moe` imports for simulator-only use
    from collections.abc import Sequence

    import numpy as np
    import torch

    from d2moe.core.sizes import QuantLayout
    from d2moe.core.spec import ModelSpec
    from d2moe.model.transformer import Transformer
    from d2moe.policies.stats import ExpertStats
    from d2moe.profiles.schema import Profile
    from d2moe.quant.store import StoreReader
    from d2moe.router.adaptive import CapacityConfig
    from d2moe.router.gate import BitRouter
    from d2moe.traces.schema import Trace


@dataclass(frozen=True)
class ValidateConfig:
    """Options of `d2moe validate` (the CLI is built from these fields)."""

    model: str = model_field()
    store: str = field(default="", metadata={
        "help": "nested store from `d2moe quantize`; empty: for tiny, built once into the "
                "cache directory"})
    profile: str = field(default="auto", metadata={
        "help": "shipped profile name or profile YAML (measure one with `d2moe profile`); "
                "`auto`: the shipped profile measured on a machine that describes itself as "
                "this one does (CPU model, cores, torch threads, kernel; a GPU by its name), "
                "else the one of this CPU model with other threads or kernel, else "
                "cpu-2core (on a GPU: an error asking for `measure` or a file); "
                "`measure`: measure this machine in this invocation, with the model's spec, "
                "the store's layout and --device/--threads, once before each of the "
                "--repeats passes over the rows, and simulate with the median of them "
                "(written to OUT/profile.yaml): the profile and the runs then sample the "
                "same stretch of a machine whose speed drifts",
        "metavar": "PROFILE"})
    policies: str = field(default="fifo,hebf", metadata={
        "help": "policy names, comma-separated", "metavar": "P1,P2"})
    budgets: str = field(default="25%,50%,100%", metadata={
        "help": "expert memory budgets, comma-separated (bytes, %% or fractions of all "
                "experts at --bits, or at the router's widest width with --router; a bare "
                "whole number above 1 is bytes)"})
    bits: int = field(default=4, metadata={"help": "bit-width every expert runs at"})
    prompt: str = field(default="def fib(n):\n    return", metadata={"help": "prompt text"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per run"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    threads: int = field(default=1, metadata={
        "help": "torch intra-op threads of the run (0: torch's default); measure the profile "
                "with the same count"})
    direct_io: bool = field(default=True, metadata={"help": "read the store with O_DIRECT"})
    dtype: str = dtype_field()
    sync_rows: bool = sync_rows_field("measure the profile with the same setting")
    repeats: int = field(default=1, metadata={
        "help": "real runs per (policy, budget); the run with the median tokens/s is kept"})
    rounds: int = field(default=1, metadata={
        "help": "whole comparisons in a row (each measuring its own profile with --profile "
                "measure), written to OUT/round-K and pooled in OUT/rounds.json: per "
                "(policy, budget) the mean signed error with two standard errors, the "
                "simulator's bias apart from the machine's drift"})
    progress: bool = field(default=True, metadata={
        "help": "a progress bar of the real runs on a terminal once they take over a second"})
    plot_steps: int = field(default=2, metadata={
        "help": "decode steps shown in the side-by-side timelines (at least 1)"})
    out: str = field(default="out/validate", metadata={"help": "output directory"})
    router: str = field(default="", metadata={
        "help": "trained bit-width router (d2moe router train): DIR, or auto for "
                "<store>/router; each token's bits then come from it, live in the real run "
                "and from its recorded gate probabilities in the simulation (with the "
                "--capacity-mode options); empty: no router, every expert at --bits"})

    def __post_init__(self) -> None:
        """Options that need no model are checked before it loads."""
        from d2moe.policies import policy_config

        check_at_least(self.plot_steps, 1, "plot_steps")
        check_dtype(self.dtype)
        for name in self.policy_names:
            policy_config(name, field="policies")
        split_list(self.budgets, "budgets", example="--budgets 25%,50%")

    @property
    def policy_names(self) -> list[str]:
        """--policies, split."""
        return split_list(self.policies, "policies", example="--policies fifo,hebf")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `validate` verb (needs torch)."""
    require_modules("torch", "safetensors", verb="validate")
    p = subparsers.add_parser(
        "validate", help="measure the simulator's error against the real executor",
        description="For each policy and budget: run the model for real (experts streamed "
                    "from the store), record its routing trace, simulate that trace on "
                    "--profile, and compare tokens/s, lane busy and bubble time and hit rate. "
                    "Writes table.txt, fidelity.json, timeline-BUDGET.png (real above "
                    "simulated), the trace and both timelines to --out. With --router the "
                    "bit-width router chooses the widths on both sides, under its fixed or "
                    "adaptive capacities (--capacity-mode).")
    add_fields(p, ValidateConfig)
    from d2moe.router.adaptive import CapacityConfig

    add_fields(p, CapacityConfig)  # --capacity-mode fixed|adaptive and its knobs (--router)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from d2moe.router.adaptive import CapacityConfig

    cfg = from_args(ValidateConfig, args)
    result = validate(cfg, capacity=from_args(CapacityConfig, args))
    print(result["short_report"])  # (the full table, lane times too: OUT/table.txt)
    from d2moe.analysis.tables import files_summary

    print(f"wrote {len(result['files'])} files to {cfg.out}: " + files_summary(
        result["files"], cfg.out))
    return 0


def validate(cfg: ValidateConfig, capacity: CapacityConfig | None = None) -> dict[str, Any]:
    """Load model, store and profile; run and simulate every (policy, budget); write results.
    `capacity` (a d2moe.router.adaptive.CapacityConfig) sets the router's capacity mode."""
    import torch

    from d2moe.executor.setup import open_model, resolve_store
    from d2moe.model.tokenizer import model_codec

    _check_capacity(cfg, capacity)
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise UserError(f"unknown device {cfg.device!r}", field="device", fix="use cpu or cuda")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("CUDA was asked for but torch sees no CUDA device", field="device",
                        fix="use --device cpu")
    profile = chosen_profile(cfg)
    store_path = resolve_store(cfg.model, cfg.store)
    encode, _ = model_codec(cfg.model)  # (a missing tokenizer.json before the load)
    model, spec, store = open_model(cfg.model, store_path, direct_io=cfg.direct_io,
                                    dtype=cfg.dtype)
    device = torch.device(cfg.device)
    model.to(device)
    return validate_rounds(model, spec, store, profile, cfg, list(encode(cfg.prompt)),
                           capacity=capacity)


def validate_rounds(model: Transformer, spec: ModelSpec, store: StoreReader,
                    profile: Profile | None, cfg: ValidateConfig, prompt_ids: list[int],
                    capacity: CapacityConfig | None = None,
                    **measure: Any) -> dict[str, Any]:
    """`cfg.rounds` comparisons of `validate_model` in a row, each measuring its own profile
    of this machine when `profile` is None (`measure`: ProfileConfig overrides); with more
    than one, each round writes to OUT/round-K and the result (the last round's) gains the
    pooled summary (`analysis.fidelity.summarize_rounds`), in OUT/rounds.json and appended
    to its report."""
    from d2moe.analysis.fidelity import rounds_report, summarize_rounds, summary_line

    if cfg.rounds < 1:
        raise UserError("must be >= 1", field="rounds", fix="pass --rounds 1")
    rows, result = [], {}
    for k in range(cfg.rounds):
        rcfg = cfg if cfg.rounds == 1 else replace(cfg, out=str(Path(cfg.out) / f"round-{k + 1}"))
        here = None if profile is not None else partial(measure_here, spec, store, rcfg,
                                                        **measure)
        result = validate_model(model, spec, store, profile, rcfg, prompt_ids,
                                capacity=capacity, measure=here)
        rows.append(result["rows"])
        if cfg.rounds > 1:
            line = summary_line(result["summary"]).splitlines()[0]
            print(f"round {k + 1}/{cfg.rounds}: {line}", file=sys.stderr, flush=True)
    if cfg.rounds > 1:
        pooled = summarize_rounds(rows)
        path = Path(cfg.out) / "rounds.json"
        with atomic_write(path) as f:
            json.dump(pooled, f, indent=1, default=float)
        pooled_text = rounds_report(pooled)
        result = result | {"pooled": pooled, "files": [*result["files"], str(path)],
                           "report": result["report"] + "\n" + pooled_text,
                           "short_report": result["short_report"] + "\n" + pooled_text}
    return result


def measure_here(spec: ModelSpec, store: StoreReader, cfg: ValidateConfig, command: str = "",
                 **overrides: Any) -> Profile:
    """A profile of this machine for `spec` and `store`'s layout, with cfg's device,
    threads, sync_rows and dtype, written to OUT/profile.yaml; `overrides` are ProfileConfig fields
    (fewer points for a large model, say). Measured beside the runs it is compared with, it
    drifts with them on a shared machine (docs/results/fidelity.md)."""
    import os
    import platform
    import tempfile

    from d2moe.profiles import save_profile
    from d2moe.profiles.measure import ProfileConfig, measure_profile

    lay = store.layout
    near = Path(store.path).resolve().parent  # measure the disk the store is on
    with tempfile.TemporaryDirectory(dir=near if os.access(near, os.W_OK) else None) as scratch:
        pcfg = ProfileConfig(device=cfg.device, threads=cfg.threads, sync_rows=cfg.sync_rows,
                             dtype=cfg.dtype,
                             out=str(Path(cfg.out) / "profile.yaml"),
                             name=f"measured-{platform.node() or 'here'}",
                             progress=False, layout=lay.kind, b1=lay.b1,  # (validate's bar)
                             bK=lay.bK, group=lay.group, dir=scratch, **overrides)
        profile = measure_profile(pcfg, command=command or "d2moe validate --profile measure",
                                  spec=spec)
    save_profile(pcfg.out, profile)
    return profile


def _check_capacity(cfg: ValidateConfig, capacity: CapacityConfig | None) -> None:
    """Capacity options without a router fail before any work."""
    from d2moe.executor.cmd import capacity_controller

    if not cfg.router:
        capacity_controller(capacity, None)  # adaptive mode
        if capacity is not None and capacity.capacity_window:
            raise UserError("--capacity-window sets the bit-width router's window",
                            field="capacity-window",
                            fix="pass --router DIR (d2moe router train) or drop the option")


def validate_model(model: Transformer, spec: ModelSpec, store: StoreReader,
                   profile: Profile | None, cfg: ValidateConfig, prompt_ids: list[int],
                   capacity: CapacityConfig | None = None,
                   measure: Callable[[], Profile] | None = None) -> dict[str, Any]:
    """The comparison for an already loaded model and store (benchmarks pass their own);
    `capacity` (a CapacityConfig) applies with `cfg.router`. With `measure` (returns a
    fresh Profile; `profile` is then ignored) a profile is measured before each of the
    `cfg.repeats` passes over the rows and the simulator gets their median: the profile and
    the runs it is compared with sample the same stretch of a drifting machine."""
    from d2moe.profiles.measure import torch_threads

    _check_capacity(cfg, capacity)
    with torch_threads(cfg.threads):
        return _validate_model(model, spec, store, profile, cfg, prompt_ids, capacity,
                               measure)


def _load_router(cfg: ValidateConfig, spec: ModelSpec, store: StoreReader, device: str
                 ) -> BitRouter | None:
    """The BitRouter of `cfg.router` checked against the model and the store (None: none)."""
    if not cfg.router:
        return None
    from d2moe.router.store import load_router

    return load_router(cfg.router, spec=spec, store=store.path, device=device,
                       store_bits=(store.layout.b1, store.bits_stored),
                       store_layout=store.layout, store_source=store.source)


def _validate_model(model: Transformer, spec: ModelSpec, store: StoreReader,
                    profile: Profile | None, cfg: ValidateConfig, prompt_ids: list[int],
                    capacity: CapacityConfig | None,
                    measure: Callable[[], Profile] | None) -> dict[str, Any]:
    from d2moe.analysis import format_table
    from d2moe.analysis.fidelity import (
        fidelity_row,
        plot_side_by_side,
        router_line,
        router_row,
        short_table,
        summarize,
        summary_line,
    )
    from d2moe.core.events import save_timeline
    from d2moe.core.progress import progress_bar
    from d2moe.core.sizes import all_experts_bytes, fmt_bytes, parse_budget
    from d2moe.executor.cmd import capacity_controller
    from d2moe.traces import save_trace

    policies = cfg.policy_names  # checked by ValidateConfig
    store.layout.check_bits(cfg.bits)
    router = _load_router(cfg, spec, store, _device_of(model))
    if router is not None:  # bad capacity options fail before any work
        caps, window = router.capacities, router.window_tokens
        capacity_controller(capacity, router)
        router.set_capacities(caps, window=window)
    top = max(router.bits) if router is not None else cfg.bits  # % of experts at this width
    total = all_experts_bytes(spec, top, store.layout)
    one = total // (spec.layers * spec.experts)
    budgets = []
    texts = split_list(cfg.budgets, "budgets", example="--budgets 25%,50%")
    for text in texts:
        nbytes = parse_budget(text, total)
        if nbytes < one:
            raise UserError(f"budget {text} = {fmt_bytes(nbytes)} is smaller than one expert "
                            f"({fmt_bytes(one)})", field="budgets", fix="give larger budgets")
        budgets.append((text, nbytes))
    once_each([n for _, n in budgets], texts, "budgets", example="--budgets 25%,50%")
    if cfg.repeats < 1:
        raise UserError("must be >= 1", field="repeats", fix="pass --repeats 1")
    out = Path(cfg.out)
    t0 = time.perf_counter()
    record_run(model, spec, store, policies[0], total, cfg.bits, prompt_ids,
               min(4, cfg.max_new_tokens), router=router, capacity=capacity,
               sync_rows=cfg.sync_rows)  # warm-up, discarded
    runs: dict[tuple[str, str], list[tuple[Timeline, Trace]]] = {}
    measured = []
    order = [(label, nbytes, name) for label, nbytes in budgets for name in policies]
    bar = progress_bar(cfg.repeats * len(order), cfg.progress, "validate", "run",
                       delay_s=1.0)
    try:
        for k in range(cfg.repeats):
            if measure is not None:
                if bar:
                    bar.set_postfix_str("measuring a profile")
                measured.append(measure())
            # every other pass backwards: no row is always the one furthest from the profile
            # (or always the first after it) on a machine whose speed drifts during a pass
            for label, nbytes, name in (order if k % 2 == 0 else order[::-1]):
                if bar:
                    bar.set_postfix_str(f"{name} {label}")
                runs.setdefault((name, label), []).append(record_run(
                    model, spec, store, name, nbytes, cfg.bits, prompt_ids,
                    cfg.max_new_tokens, router=router, capacity=capacity,
                    sync_rows=cfg.sync_rows))
                if bar:
                    bar.update(1)
    finally:
        if bar:
            bar.close()
    if measure is not None:
        from d2moe.profiles import save_profile
        from d2moe.profiles.measure import median_profile

        profile = median_profile(measured) if len(measured) > 1 else measured[0]
        save_profile(out / "profile.yaml", profile)
    rows, files, pairs, routed = [], [], {}, []
    for label, nbytes in budgets:
        for name in policies:
            real, trace = _median_run(runs[(name, label)])
            sim = simulate_trace(trace, spec, store.layout, profile, name, nbytes, cfg.bits,
                                 capacity=capacity)
            rows.append(fidelity_row(name, label, real, sim, [t for t, _ in runs[(name, label)]]))
            if router is not None:
                routed.append(router_row(name, label, real, sim))
            pairs.setdefault(label, []).append((name, real, sim))
            tag = f"{name}-{_slug(label)}"
            for kind, tl in (("real", real), ("sim", sim)):
                path = out / f"events-{kind}-{tag}.npz"
                save_timeline(path, tl)
                files.append(str(path))
            if len(files) == 2:
                save_trace(out / "trace.npz", trace)
                files.append(str(out / "trace.npz"))
    summary = summarize(rows)
    table = [r.as_table_row() for r in rows]
    if routed:  # decode average bits of both sides as columns
        table = [t | {"real bits": b["real_bits"], "sim bits": b["sim_bits"]}
                 for t, b in zip(table, routed, strict=True)]
    widths = (f"{cfg.bits} bits" if router is None else
              f"the widths of router {router.meta['path']} ({'/'.join(map(str, router.bits))} "
              f"bits, {(capacity.capacity_mode if capacity is not None else 'fixed')} "
              f"capacities)")
    source = (f"the median of {len(measured)} profiles measured between the runs"
              if len(measured) > 1 else f"{profile.name} ({profile.source.kind})")
    header = (f"{spec.name} on {_device_of(model)}: real executor against the simulator on "
              f"{source}; {cfg.max_new_tokens} tokens at "
              f"{widths}, {_threads()} torch thread(s), O_DIRECT "
              f"{'on' if store.direct_io else 'off'}, "
              f"{cfg.repeats} real run(s) per row (median kept, spread = (max - min) / median); "
              f"error = (sim - real) / real")
    other = None if measure is not None else other_machine_line(profile, _device_of(model))
    tail = ([router_line(b) for b in routed if "same_decisions" in b]
            + [summary_line(summary)] + ([other] if other else []))
    report = "\n".join([header, format_table(table), *tail])
    notes = [*tail, f"lane busy and bubble times, spreads: {out / 'table.txt'}"]
    short = "\n".join([textwrap.fill(header, 100), short_table(rows)]  # (a terminal's width)
                      + [textwrap.fill(line, 100, subsequent_indent="  ")
                         for note in notes for line in note.splitlines()])
    with atomic_write(out / "table.txt") as f:
        f.write(report + "\n")
    data = {"config": asdict(cfg), "profile": profile.name, "summary": summary,
            "rows": [t | {"real / sim time": r.cost_ratios} for t, r in zip(table, rows,
                                                                              strict=True)]}
    if router is not None:
        data |= {"capacity_config": asdict(capacity) if capacity is not None else None,
                 "router_config": router.describe(), "router_rows": routed}
    with atomic_write(out / "fidelity.json") as f:
        json.dump(data, f, indent=1, default=float)
    files += [str(out / "table.txt"), str(out / "fidelity.json")]
    for label, pair in pairs.items():
        files.append(str(plot_side_by_side(
            pair, out / f"timeline-{_slug(label)}.png", steps=cfg.plot_steps,
            title=f"{spec.name}, budget {label}: real (measured) above simulated "
                  f"({profile.name}), decode steps 1-{cfg.plot_steps}, each from its "
                  f"start")))
    return {"report": report, "short_report": short, "rows": rows, "summary": summary,
            "files": files, "profile": profile,
            "router_rows": routed, "wall_s": time.perf_counter() - t0}


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "", label.replace("%", "pct")) or "budget"


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _device_of(model: torch.nn.Module) -> str:
    return str(next(model.parameters()).device)


def _median_run(runs: list[tuple[Timeline, Trace]]) -> tuple[Timeline, Trace]:
    from d2moe.analysis import compute_metrics

    speeds = [compute_metrics(tl).decode_tokens_per_s for tl, _ in runs]
    target = statistics.median_low(speeds)
    return runs[speeds.index(target)]


def record_run(model: Transformer, spec: ModelSpec, store: StoreReader, policy: str,
               budget_bytes: int, bits: int, prompt_ids: list[int], max_new_tokens: int,
               stats: ExpertStats | None = None, *, router: BitRouter | None = None,
               capacity: CapacityConfig | None = None, sync_rows: bool = False
               ) -> tuple[Timeline, Trace]:
    """One real generation under the budget: (its timeline, the routing trace it took);
    `stats`: expert statistics for the policies that use them.

    `router` (a BitRouter on the model's device) chooses every (token, slot)'s bits live,
    under `capacity` (a CapacityConfig: fixed, or adaptive with a fresh controller for this
    run); the trace then carries the widths it chose, its gate probabilities (`prefs`) and
    meta `router_config` (its trained capacities and window), and the timeline's meta
    `capacity` (as `d2moe run` writes it). The router is left with the capacities and window
    it had. `sync_rows`: as `StreamingExperts`'s."""
    import numpy as np

    from d2moe.executor.backend import StreamingExperts
    from d2moe.executor.cmd import capacity_controller
    from d2moe.executor.pool import ExpertPool
    from d2moe.executor.setup import check_store_layout
    from d2moe.model.generate import generate
    from d2moe.policies import make_policy, policy_config
    from d2moe.traces.schema import DECODE, PREFILL, Trace

    device = next(model.parameters()).device
    copies = check_store_layout(policy_config(policy), policy, store.layout, store.path)
    pool = ExpertPool(spec, store.layout, budget_bytes, device, copies=copies)
    trained = None if router is None else (router.capacities, router.window_tokens)
    controller = capacity_controller(capacity, router)  # fixed: applies --capacity-window
    router_config = None if router is None else router.describe()  # before any move
    steps: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    chosen: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []  # layer -> (probs, index)

    def observe(layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        # keep the tensors (fresh per forward) and convert after the run, so recording the
        # trace adds next to nothing to the non-expert time being measured; the router is
        # asked after the observer, so a forward's choices are taken at the next one's start
        if layer == 0:
            if router is not None and steps:
                chosen.append(_router_choices(router))
            steps.append([])
        steps[-1].append((ids, weights))

    try:
        backend = StreamingExperts(store, make_policy(policy, stats=stats), pool, bits=bits,
                                   router=router, capacity=controller, sync_rows=sync_rows)
        try:
            generate(model, prompt_ids, max_new_tokens, backend=backend, observer=observe)
        finally:
            timeline = backend.finish()
        if router is not None:
            chosen.append(_router_choices(router))
    finally:
        if trained is not None:
            router.set_capacities(trained[0], window=trained[1])
    trace_steps, prefs = [], []
    for i, layers in enumerate(steps):
        experts = np.stack([ids.cpu().numpy().astype(np.int16) for ids, _ in layers],
                           axis=1)  # [T, L, k]
        weights = np.stack([w.float().cpu().numpy().astype(np.float32) for _, w in layers],
                           axis=1)
        widths = np.full(experts.shape, bits, np.int8)
        if router is not None:
            widths, p = _step_widths(router.bits, chosen[i], experts.shape)
            prefs.append(p)
        trace_steps.append((PREFILL if i == 0 else DECODE, experts, weights, widths))
    meta = {"source": "record", "model": spec.name, "policy": policy, "bits": bits,
            "budget_bytes": budget_bytes}
    if router is not None:
        meta |= {"router": router_config["path"], "router_config": router_config}
    trace = Trace.from_steps(spec.name, spec.experts, trace_steps, meta,
                             prefs=np.concatenate(prefs) if prefs else None)
    timeline.meta.update({"bits": bits, "budget_bytes": budget_bytes})
    if router is not None:
        timeline.meta["router"] = router_config["path"]
        timeline.meta["capacity"] = (controller.record() if controller is not None else
                                     {"mode": "fixed", "shares": router_config["capacities"],
                                      "window": router_config["window"]})
    return timeline, trace


def _router_choices(router: BitRouter) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The router's last forward: layer -> (gate probabilities, width index)."""
    return {layer: (router.last_probs[layer], router.last_index[layer])
            for layer in router.last_index}


def _step_widths(widths: Sequence[int], choices: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One forward's bits [T, L, k] (int8) and gate probabilities [T, L, k, K] (float32) per
    (token, slot); a per-token router's choice repeats over the token's slots (as
    `BitRoutedExperts.token_bits` and `token_prefs`)."""
    import numpy as np

    t, n_layers, k = shape
    if sorted(choices) != list(range(n_layers)):
        raise RuntimeError(f"the router answered layers {sorted(choices)} of a forward, "
                           f"not all {n_layers}")
    table = np.asarray(widths, dtype=np.int8)
    bits = np.empty(shape, dtype=np.int8)
    prefs = np.empty((*shape, len(table)), dtype=np.float32)
    for layer, (p, idx) in choices.items():
        p = p.float().cpu().numpy()  # [T, K] or [T, k, K]
        idx = idx.cpu().numpy()  # [T] or [T, k]
        bits[:, layer, :] = table[idx] if idx.ndim == 2 else table[idx][:, None]
        prefs[:, layer] = p if p.ndim == 3 else p[:, None, :]
    return bits, prefs


def simulate_trace(trace: Trace, spec: ModelSpec, layout: QuantLayout, profile: Profile,
                   policy: str, budget_bytes: int, bits: int, stats: ExpertStats | None = None,
                   *, capacity: CapacityConfig | None = None) -> Timeline:
    """The simulator on a recorded trace, at the real run's budget in bytes (the same
    expert statistics as the real run, for the policies that use them). A trace recorded
    with a router goes through `capacity_source` under `capacity` (a CapacityConfig: fixed
    replays the recorded widths, adaptive re-places the gate's probabilities under the
    controller's shares); the timeline's meta `capacity` is then set as the executor's."""
    from d2moe.policies import make_policy
    from d2moe.sim.adaptive import capacity_source
    from d2moe.sim.simulator import SimSetup, simulate

    setup = SimSetup(spec, profile, layout, budget_bytes, meta={"trace": "recorded"},
                     emulate_copies=True)  # as the real run on that store did
    source = capacity_source(trace, bits, capacity)
    tl = simulate(setup, source, make_policy(policy, stats=stats))
    if source.record() is not None:
        tl.meta["capacity"] = source.record()
    return tl
