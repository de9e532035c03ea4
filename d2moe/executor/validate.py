"""`d2moe validate`: run the real executor, record its routing trace, simulate that same trace
with a hardware profile, and report per (policy, budget) real against simulated tokens/s, lane
busy and bubble time and hit rate, with the error in %, plus side-by-side timelines.

Everything compared is read from the two timelines' Event rows (`analysis/fidelity.py`).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from d2moe.core.cliargs import add_fields, from_args, model_field, require_modules
from d2moe.core.errors import UserError
from d2moe.core.events import Timeline
from d2moe.core.fileio import atomic_write


@dataclass(frozen=True)
class ValidateConfig:
    """Options of `d2moe validate` (the CLI is built from these fields)."""

    model: str = model_field()
    store: str = field(default="", metadata={
        "help": "nested store from `d2moe quantize`; empty: for tiny, built once into the "
                "cache directory"})
    profile: str = field(default="cpu-2core", metadata={
        "help": "shipped profile name or profile YAML (measure one with `d2moe profile`)",
        "metavar": "PROFILE"})
    policies: str = field(default="fifo,hebf", metadata={
        "help": "policy names, comma-separated", "metavar": "P1,P2"})
    budgets: str = field(default="25%,50%,100%", metadata={
        "help": "expert memory budgets, comma-separated (bytes, %% or fractions of all "
                "experts at --bits)"})
    bits: int = field(default=4, metadata={"help": "bit-width every expert runs at"})
    prompt: str = field(default="def fib(n):\n    return", metadata={"help": "prompt text"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per run"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    threads: int = field(default=1, metadata={
        "help": "torch intra-op threads of the run (0: torch's default); measure the profile "
                "with the same count"})
    direct_io: bool = field(default=True, metadata={"help": "read the store with O_DIRECT"})
    repeats: int = field(default=1, metadata={
        "help": "real runs per (policy, budget); the run with the median tokens/s is kept"})
    plot_steps: int = field(default=2, metadata={
        "help": "decode steps shown in the side-by-side timelines"})
    out: str = field(default="out/validate", metadata={"help": "output directory"})


def register(subparsers: Any) -> None:
    """Add the `validate` verb (needs torch)."""
    require_modules("torch", "safetensors", verb="validate")
    p = subparsers.add_parser(
        "validate", help="measure the simulator's error against the real executor",
        description="For each policy and budget: run the model for real (experts streamed "
                    "from the store), record its routing trace, simulate that trace on "
                    "--profile, and compare tokens/s, lane busy and bubble time and hit rate. "
                    "Writes table.txt, fidelity.json, timeline-BUDGET.png (real above "
                    "simulated), the trace and both timelines to --out.")
    add_fields(p, ValidateConfig)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    result = validate(from_args(ValidateConfig, args))
    print(result["report"])
    print(f"wrote {', '.join(result['files'])}")
    return 0


def split_names(text: str, what: str) -> list[str]:
    """Comma-separated names, at least one."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UserError(f"no {what} given", field=what, fix=f"e.g. --{what} fifo,hebf")
    return names


def validate(cfg: ValidateConfig) -> dict[str, Any]:
    """Load model, store and profile; run and simulate every (policy, budget); write results."""
    import torch

    from d2moe.executor.setup import open_model, resolve_store
    from d2moe.model.tokenizer import encode
    from d2moe.profiles import load_profile

    profile = load_profile(cfg.profile)
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise UserError(f"unknown device {cfg.device!r}", field="device", fix="use cpu or cuda")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("CUDA was asked for but torch sees no CUDA device", field="device",
                        fix="use --device cpu")
    store_path = resolve_store(cfg.model, cfg.store)
    model, spec, store = open_model(cfg.model, store_path, direct_io=cfg.direct_io)
    device = torch.device(cfg.device)
    model.to(device)
    return validate_model(model, spec, store, profile, cfg, list(encode(cfg.prompt)))


def validate_model(model: Any, spec: Any, store: Any, profile: Any, cfg: ValidateConfig,
                   prompt_ids: list[int]) -> dict[str, Any]:
    """The comparison for an already loaded model and store (benchmarks pass their own)."""
    from d2moe.profiles.measure import torch_threads

    with torch_threads(cfg.threads):
        return _validate_model(model, spec, store, profile, cfg, prompt_ids)


def _validate_model(model: Any, spec: Any, store: Any, profile: Any, cfg: ValidateConfig,
                    prompt_ids: list[int]) -> dict[str, Any]:
    from d2moe.analysis import format_table
    from d2moe.analysis.fidelity import fidelity_row, plot_side_by_side, summarize, summary_line
    from d2moe.core.events import save_timeline
    from d2moe.core.sizes import all_experts_bytes, fmt_bytes, parse_budget
    from d2moe.policies import make_policy
    from d2moe.traces import save_trace

    policies = split_names(cfg.policies, "policies")
    for name in policies:
        make_policy(name)  # unknown names fail before any work
    store.layout.check_bits(cfg.bits)
    total = all_experts_bytes(spec, cfg.bits, store.layout)
    one = total // (spec.layers * spec.experts)
    budgets = []
    for text in split_names(cfg.budgets, "budgets"):
        nbytes = parse_budget(text, total)
        if nbytes < one:
            raise UserError(f"budget {text} = {fmt_bytes(nbytes)} is smaller than one expert "
                            f"({fmt_bytes(one)})", field="budgets", fix="give larger budgets")
        budgets.append((text, nbytes))
    if cfg.repeats < 1:
        raise UserError("must be >= 1", field="repeats", fix="pass --repeats 1")
    out = Path(cfg.out)
    t0 = time.perf_counter()
    record_run(model, spec, store, policies[0], total, cfg.bits, prompt_ids,
               min(4, cfg.max_new_tokens))  # warm-up, discarded
    runs: dict[tuple[str, str], list[tuple[Timeline, Any]]] = {}
    for _ in range(cfg.repeats):
        for label, nbytes in budgets:
            for name in policies:
                runs.setdefault((name, label), []).append(record_run(
                    model, spec, store, name, nbytes, cfg.bits, prompt_ids, cfg.max_new_tokens))
    rows, files, pairs = [], [], {}
    for label, nbytes in budgets:
        for name in policies:
            real, trace = _median_run(runs[(name, label)])
            sim = simulate_trace(trace, spec, store.layout, profile, name, nbytes, cfg.bits)
            rows.append(fidelity_row(name, label, real, sim, [t for t, _ in runs[(name, label)]]))
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
    header = (f"{spec.name} on {_device_of(model)}: real executor against the simulator on "
              f"{profile.name} ({profile.source.kind}); {cfg.max_new_tokens} tokens at "
              f"{cfg.bits} bits, {_threads()} torch thread(s), O_DIRECT "
              f"{'on' if store.direct_io else 'off'}, "
              f"{cfg.repeats} real run(s) per row (median kept, spread = (max - min) / median); "
              f"error = (sim - real) / real")
    report = "\n".join([header, format_table([r.as_table_row() for r in rows]),
                        summary_line(summary)])
    with atomic_write(out / "table.txt") as f:
        f.write(report + "\n")
    with atomic_write(out / "fidelity.json") as f:
        json.dump({"config": asdict(cfg), "profile": profile.name, "summary": summary,
                   "rows": [r.as_table_row() for r in rows]}, f, indent=1, default=float)
    files += [str(out / "table.txt"), str(out / "fidelity.json")]
    for label, pair in pairs.items():
        files.append(str(plot_side_by_side(
            pair, out / f"timeline-{_slug(label)}.png", steps=cfg.plot_steps,
            title=f"{spec.name}, budget {label}: real (measured) above simulated "
                  f"({profile.name}), decode steps 1-{cfg.plot_steps}, each from its "
                  f"start")))
    return {"report": report, "rows": rows, "summary": summary, "files": files,
            "wall_s": time.perf_counter() - t0}


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "", label.replace("%", "pct")) or "budget"


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _device_of(model: Any) -> str:
    return str(next(model.parameters()).device)


def _median_run(runs: list[tuple[Timeline, Any]]) -> tuple[Timeline, Any]:
    from d2moe.analysis import compute_metrics

    speeds = [compute_metrics(tl).decode_tokens_per_s for tl, _ in runs]
    target = statistics.median_low(speeds)
    return runs[speeds.index(target)]


def record_run(model: Any, spec: Any, store: Any, policy: str, budget_bytes: int, bits: int,
               prompt_ids: list[int], max_new_tokens: int, stats: Any = None
               ) -> tuple[Timeline, Any]:
    """One real generation under the budget: (its timeline, the routing trace it took);
    `stats`: expert statistics for the policies that use them."""
    import numpy as np

    from d2moe.executor.backend import StreamingExperts
    from d2moe.executor.pool import ExpertPool
    from d2moe.executor.setup import check_store_layout
    from d2moe.model.generate import generate
    from d2moe.policies import make_policy, policy_config
    from d2moe.traces.schema import DECODE, PREFILL, Trace

    device = next(model.parameters()).device
    copies = check_store_layout(policy_config(policy), policy, store.layout, store.path)
    pool = ExpertPool(spec, store.layout, budget_bytes, device, copies=copies)
    backend = StreamingExperts(store, make_policy(policy, stats=stats), pool, bits=bits)
    steps: list[list[tuple[Any, Any]]] = []

    def observe(layer: int, ids: Any, weights: Any) -> None:
        # keep the tensors (fresh per forward) and convert after the run, so recording the
        # trace adds next to nothing to the non-expert time being measured
        if layer == 0:
            steps.append([])
        steps[-1].append((ids, weights))

    try:
        generate(model, prompt_ids, max_new_tokens, backend=backend, observer=observe)
    finally:
        timeline = backend.finish()
    trace_steps = []
    for i, layers in enumerate(steps):
        experts = np.stack([ids.cpu().numpy().astype(np.int16) for ids, _ in layers],
                           axis=1)  # [T, L, k]
        weights = np.stack([w.float().cpu().numpy().astype(np.float32) for _, w in layers],
                           axis=1)
        trace_steps.append((PREFILL if i == 0 else DECODE, experts, weights,
                            np.full(experts.shape, bits, np.int8)))
    trace = Trace.from_steps(spec.name, spec.experts, trace_steps,
                             {"source": "record", "model": spec.name, "policy": policy,
                              "bits": bits, "budget_bytes": budget_bytes})
    timeline.meta.update({"bits": bits, "budget_bytes": budget_bytes})
    return timeline, trace


def simulate_trace(trace: Any, spec: Any, layout: Any, profile: Any, policy: str,
                   budget_bytes: int, bits: int, stats: Any = None) -> Timeline:
    """The simulator on a recorded trace, at the real run's budget in bytes (the same
    expert statistics as the real run, for the policies that use them)."""
    from d2moe.policies import make_policy
    from d2moe.sim.simulator import SimSetup, simulate
    from d2moe.sim.workload import steps_from_trace

    setup = SimSetup(spec, profile, layout, budget_bytes, meta={"trace": "recorded"})
    return simulate(setup, steps_from_trace(trace, bits), make_policy(policy, stats=stats))
