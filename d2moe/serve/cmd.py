"""`d2moe serve`: concurrent requests (an arrival process) served with continuous batching on
the simulator or the real executor, per policy; prints latency percentiles and throughput,
writes each policy's timeline (with the request lane) and a JSON summary."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from d2moe.core.cliargs import (
    add_fields,
    check_dtype,
    check_threads,
    dtype_field,
    from_args,
    model_field,
    split_list,
    sync_rows_field,
)
from d2moe.core.errors import UserError
from d2moe.core.events import Timeline, save_timeline
from d2moe.core.fileio import atomic_write
from d2moe.serve.arrivals import ArrivalConfig, Request, make_requests

BACKENDS = ("sim", "real")
# Options only one backend reads (docs/serve.md's table): set under the other, an error.
BACKEND_ONLY = {"sim": ("model_spec", "profile", "trace"),
                "real": ("model", "store", "direct_io", "threads", "dtype", "sync_rows")}


@dataclass(frozen=True)
class ServeConfig:
    """Options of `d2moe serve` besides the arrival process (the CLI is built from these)."""

    backend: str = field(default="sim", metadata={
        "help": "sim (the simulator on --profile) or real (the executor on --model)"})
    max_batch: int = field(default=4, metadata={
        "help": "most requests decoding together (1: one request at a time, FCFS)"})
    policy: str = field(default="fifo,hebf", metadata={
        "help": "policy name(s), comma-separated (d2moe simulate --list)", "metavar": "P1,P2"})
    budget: str = field(default="50%", metadata={
        "help": "expert memory budget: bytes (64MiB; a bare whole number above 1 is bytes), a "
                "percentage (40%%) or a fraction (0.4) of all experts at --bits (with --trace, "
                "at the larger of --bits and the trace's widest bits)"})
    bits: int = field(default=4, metadata={"help": "bit-width experts run at (where the "
                                                   "routing has none)"})
    model_spec: str = field(default="tiny", metadata={
        "help": "sim: shipped spec name, a spec YAML or an HF config.json", "metavar": "SPEC"})
    profile: str = field(default="cpu-2core", metadata={
        "help": "sim: shipped profile or a profile YAML", "metavar": "PROFILE"})
    trace: str = field(default="", metadata={
        "help": "sim: a trace .npz whose token rows route the requests (cycling); empty: the "
                "synthetic generator (seeded by --seed)", "metavar": "FILE"})
    model: str = model_field("used by --backend real")
    store: str = field(default="", metadata={
        "help": "real: nested store (d2moe quantize); empty: for tiny, built once in the cache"})
    direct_io: bool = field(default=True, metadata={"help": "real: read the store with O_DIRECT"})
    threads: int = field(default=1, metadata={
        "help": "real: torch intra-op threads (0: torch's default); 1 by default: the tiny "
                "model's matrices gain nothing from more, the I/O lane needs a core, and on a "
                "busy CPU two threads thrash"})
    dtype: str = dtype_field()
    sync_rows: bool = sync_rows_field()
    out: str = field(default="out/serve", metadata={"help": "output directory"})
    progress: bool = field(default=True, metadata={
        "help": "a progress bar per policy (on a terminal)"})

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise UserError(f"unknown backend {self.backend!r}", field="backend",
                            fix="use --backend sim or --backend real")
        self._check_backend_options()
        if self.max_batch < 1:
            raise UserError(f"must be >= 1, got {self.max_batch}", field="max_batch",
                            fix="pass e.g. --max-batch 4")
        check_threads(self.threads)
        check_dtype(self.dtype)

    def _check_backend_options(self) -> None:
        """An option of the other backend, changed from its default, would be ignored
        silently (--profile under real, --store under sim): refuse it, naming the option."""
        defaults = {f.name: f.default for f in fields(self)}
        other = next(b for b in BACKENDS if b != self.backend)
        for name in BACKEND_ONLY[other]:
            if getattr(self, name) != defaults[name]:
                option = name.replace("_", "-")
                flag = "--" + ("no-" if getattr(self, name) is False else "") + option
                raise UserError(f"{flag} is read by --backend {other} only; --backend "
                                f"{self.backend} would ignore it", field=option,
                                fix=f"drop {flag}, or use --backend {other}")

    @property
    def policies(self) -> list[str]:
        """The policy names, in order."""
        return split_list(self.policy, "policy", example="--policy fifo,hebf")


def register(subparsers: Any) -> None:
    """Add the `serve` verb."""
    p = subparsers.add_parser(
        "serve", help="serve concurrent requests with continuous batching (sim or real)",
        description="Requests arrive as a Poisson process (--rate) with prompt and output "
                    "lengths (--prompt-tokens, --output-tokens); continuous batching runs "
                    "new requests' prefill, then one decode token per active request per "
                    "step, at most --max-batch active. Per policy: latency and "
                    "time-to-first-token percentiles and throughput. Writes "
                    "events-POLICY.npz (with the request lane) and summary.json to --out.")
    add_fields(p, ServeConfig)
    add_fields(p, ArrivalConfig)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    result = serve(from_args(ServeConfig, args), from_args(ArrivalConfig, args))
    print(result["table"])
    print(f"wrote {', '.join(result['files'])}")
    return 0


def serve(cfg: ServeConfig, arrivals: ArrivalConfig) -> dict[str, Any]:
    """Serve the arrival process under every policy of `cfg`; write and return the results."""
    from d2moe.core.progress import progress_bar
    from d2moe.policies import policy_config
    from d2moe.serve.metrics import format_serve_table, serve_metrics

    for name in cfg.policies:  # unknown names fail before any work
        policy_config(name)
    requests = make_requests(arrivals)
    run, build = (_sim_runner(cfg, requests, arrivals.seed) if cfg.backend == "sim"
                  else _real_runner(cfg, requests))
    policies = [build(n) for n in cfg.policies]
    out = Path(cfg.out)
    rows, files, timelines = [], [], []
    for policy in policies:
        bar = progress_bar(len(requests), cfg.progress, f"serve {policy.name}", "req")
        try:
            tl = run(policy, bar)
        finally:
            if bar:
                bar.close()
        tl.meta.update(arrivals=asdict(arrivals), max_batch=cfg.max_batch)
        path = out / f"events-{policy.name}.npz"
        save_timeline(path, tl)
        files.append(str(path))
        timelines.append(tl)
        rows.append((policy.name, serve_metrics(tl)))
    summary = {"config": asdict(cfg), "arrivals": asdict(arrivals),
               "requests": [asdict(r) for r in requests],
               "policies": {name: m.as_dict() for name, m in rows}}
    with atomic_write(out / "summary.json") as f:
        json.dump(summary, f, indent=1, default=float)
    files.append(str(out / "summary.json"))
    where = timelines[0].meta
    head = (f"{where.get('model')} ({cfg.backend}: "
            f"{where.get('profile') if cfg.backend == 'sim' else where.get('device')}), "
            f"budget {cfg.budget}, {len(requests)} requests at {arrivals.rate}/s, prompts "
            f"{arrivals.prompt_tokens}, outputs {arrivals.output_tokens}, max batch "
            f"{cfg.max_batch}" + (" (simulated)" if cfg.backend == "sim" else " (measured)"))
    table = head + "\n" + format_serve_table(rows)
    return {"table": table, "files": files, "timelines": timelines,
            "metrics": dict(rows), "requests": requests}


def _sim_runner(cfg: ServeConfig, requests: list[Request], seed: int) -> Any:
    """(policy, progress bar) -> Timeline on the simulator."""
    from d2moe.core.sizes import QuantLayout
    from d2moe.core.spec import load_spec
    from d2moe.profiles import load_profile
    from d2moe.serve.routing import SynthRouting, TraceRouting
    from d2moe.serve.sim import serve_sim
    from d2moe.sim.simulator import SimSetup
    from d2moe.sim.workload import budget_bytes
    from d2moe.traces import load_trace
    from d2moe.traces.synth import SynthConfig

    spec, profile, layout = load_spec(cfg.model_spec), load_profile(cfg.profile), QuantLayout()
    layout.check_bits(cfg.bits)
    if cfg.trace:
        trace = load_trace(cfg.trace)
        trace.check_spec(spec)
        source: Any = TraceRouting(trace, requests)
        top = max(cfg.bits, int(trace.bits.max()) if trace.bits.size else 0)
    else:
        source, top = SynthRouting(spec, SynthConfig(seed=seed, bits="")), cfg.bits
    budget = budget_bytes(cfg.budget, spec, layout, top)
    setup = SimSetup(spec, profile, layout, budget,
                     meta={"budget": cfg.budget, "trace": cfg.trace or "synth"})

    def run(policy: Any, bar: Any) -> Timeline:
        return serve_sim(setup, policy, requests, source, max_batch=cfg.max_batch,
                         bits=cfg.bits, progress=bar)

    def build(name: str) -> Any:
        """The policy, with expert statistics from the routing source when it uses them."""
        from d2moe.policies import make_policy, policy_config

        if not policy_config(name).needs_stats:
            return make_policy(name)
        from d2moe.experts import stats_from_trace
        from d2moe.traces import synth_trace

        calib = trace if cfg.trace else synth_trace(spec, SynthConfig(seed=seed))
        return make_policy(name, stats=stats_from_trace(calib))

    return run, build


def _real_runner(cfg: ServeConfig, requests: list[Request]) -> Any:
    """(policy, progress bar) -> Timeline on the real executor (a fresh pool and backend per
    policy)."""
    from d2moe.executor.backend import StreamingExperts
    from d2moe.executor.pool import ExpertPool
    from d2moe.executor.setup import (
        check_store_layout,
        expert_budget,
        expert_stats,
        open_model,
        resolve_store,
    )
    from d2moe.model.generate import check_positions
    from d2moe.serve.real import fix_steps, make_prompts, serve_model

    store_path = resolve_store(cfg.model, cfg.store)
    model, spec, store = open_model(cfg.model, store_path, direct_io=cfg.direct_io,
                                    dtype=cfg.dtype)
    for r in sorted(requests, key=lambda r: -(r.prompt_tokens + r.output_tokens))[:1]:
        check_positions(model, r.prompt_tokens, r.output_tokens, field="output-tokens")
    budget = expert_budget(spec, store.layout, cfg.budget, cfg.bits)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    prompts = make_prompts(requests, vocab=spec.vocab)

    def build(name: str) -> Any:
        """The policy, with the store's expert statistics when it uses them."""
        from d2moe.policies import make_policy, policy_config

        pcfg = policy_config(name)
        return make_policy(name, stats=expert_stats(pcfg, "auto", cfg.model, store_path))

    def run(policy: Any, bar: Any) -> Timeline:
        copies = check_store_layout(policy.config, policy.name, store.layout, store_path)
        pool = ExpertPool(spec, store.layout, budget, device, copies=copies)
        backend = StreamingExperts(store, policy, pool, bits=cfg.bits, sync_rows=cfg.sync_rows)
        threads = torch.get_num_threads()
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        try:
            served = serve_model(model, backend, requests, prompts, max_batch=cfg.max_batch,
                                 clock=backend.clock, progress=bar)
        finally:
            tl = backend.finish()
            torch.set_num_threads(threads)
        tl.events[:] = fix_steps(tl.events, served) + served.rows
        tl.meta.update(budget=cfg.budget, bits=cfg.bits, store=str(store_path),
                       requests=len(requests), outputs={str(k): v for k, v in
                                                        served.outputs.items()})
        return tl

    return run, build
