"""`d2moe run`: generate text from a real model whose experts stream from a nested store
under a memory budget, driven by a registered policy; prints tokens/s, hit rate and bytes
loaded, and writes the timeline in the simulator's format."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from d2moe.core.cliargs import (
    add_fields,
    check_dtype,
    check_threads,
    dtype_field,
    from_args,
    model_field,
    require_modules,
    sync_rows_field,
)
from d2moe.core.errors import UserError
from d2moe.core.fileio import atomic_write
from d2moe.executor.setup import (
    check_store_layout,
    expert_budget,
    expert_stats,
    open_model,
    resolve_store,
    store_layout,
)


@dataclass(frozen=True)
class RunConfig:
    """Options of `d2moe run` (the CLI is built from these fields)."""

    model: str = model_field("Mixtral, OLMoE, Qwen-MoE")
    store: str = field(default="", metadata={
        "help": "nested store from `d2moe quantize`; empty: for tiny, build it once into the "
                "cache directory"})
    policy: str = field(default="hebf", metadata={"help": "policy name (d2moe simulate --list)"})
    budget: str = field(default="40%", metadata={
        "help": "expert memory budget: bytes (64MiB; a bare whole number above 1 is bytes), a "
                "percentage (40%%) or a fraction (0.4) of all experts at --bits"})
    bits: int = field(default=4, metadata={"help": "bit-width every expert runs at"})
    prompt: str = field(default="def fib(", metadata={
        "help": "prompt text (bytes for tiny; an HF checkpoint's own tokenizer.json)"})
    max_new_tokens: int = field(default=64, metadata={
        "help": "tokens to generate; with the prompt at most the model's "
                "max_position_embeddings"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda or auto"})
    direct_io: bool = field(default=True, metadata={
        "help": "read the store with O_DIRECT so the page cache does not hide the disk"})
    threads: int = field(default=1, metadata={
        "help": "torch intra-op threads (0: torch's default); 1 by default, as in serve and "
                "validate: the I/O lane needs a core (tiny on a 2-core CPU under a budget: "
                "1.02-1.07x the decode tokens/s of torch's default 2; docs/results/executor.md)"})
    dtype: str = dtype_field()
    sync_rows: bool = sync_rows_field()
    out: str = field(default="out/run", metadata={"help": "output directory"})
    router: str = field(default="", metadata={
        "help": "trained bit-width router (d2moe router train): DIR, or auto for "
                "<store>/router; each token's bits then come from it (--bits sizes the budget); "
                "empty: no router, every expert runs at --bits"})
    expert_stats: str = field(default="auto", metadata={
        "help": "expert importance and similarity (d2moe experts stats) for the policies "
                "that use them (edgemoe, sub-similar): FILE, or auto: beside the store, "
                "computed once for tiny"})
    progress: bool = field(default=True, metadata={
        "help": "show a progress bar of new tokens on a terminal when it takes over a second"})

    def __post_init__(self) -> None:
        check_threads(self.threads)
        check_dtype(self.dtype)


def register(subparsers: Any) -> None:
    """Add the `run` verb (needs torch: registered as an optional command)."""
    require_modules("torch", "safetensors", verb="run")
    p = subparsers.add_parser(
        "run", help="generate with experts streamed from disk under a memory budget",
        description="Run a real MoE model with its experts in a nested store on disk and a "
                    "resident pool under --budget, scheduled by --policy (the simulator's "
                    "policy objects). Writes events.npz (the simulator's timeline format), "
                    "metrics.json and bubbles.png to --out.")
    add_fields(p, RunConfig)
    from d2moe.router.adaptive import CapacityConfig

    add_fields(p, CapacityConfig)  # --capacity-mode fixed|adaptive and its knobs (with --router)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from d2moe.router.adaptive import CapacityConfig

    cfg = from_args(RunConfig, args)
    result = run(cfg, capacity=from_args(CapacityConfig, args))
    print(result["text"])
    print(result["summary"])
    return 0


def run(cfg: RunConfig, capacity: Any = None) -> dict[str, Any]:
    """Load model and store, generate under the budget, write and return the results;
    `capacity` (a d2moe.router.adaptive.CapacityConfig) sets the router's capacity mode."""
    import torch

    from d2moe.analysis import compute_metrics, format_table, metrics_row, plot_bubbles
    from d2moe.core.events import save_timeline
    from d2moe.core.sizes import QuantLayout, all_experts_bytes, fmt_bytes
    from d2moe.executor.backend import StreamingExperts
    from d2moe.executor.pool import ExpertPool
    from d2moe.model.generate import check_positions, generate
    from d2moe.model.tokenizer import continuation, model_codec
    from d2moe.policies import make_policy, policy_config
    from d2moe.profiles.measure import torch_threads
    from d2moe.router.adaptive import describe as describe_capacity
    from d2moe.router.adaptive import run_bits

    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise UserError(f"unknown device {cfg.device!r}", field="device",
                        fix="use cpu, cuda, cuda:N or auto")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("CUDA was asked for but torch sees no CUDA device", field="device",
                        fix="use --device cpu (or auto)")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    pcfg = policy_config(cfg.policy)  # unknown names fail before any work
    store_path = resolve_store(cfg.model, cfg.store, store_layout(pcfg, QuantLayout()))
    encode, decode = model_codec(cfg.model)  # (a missing tokenizer.json before the load)
    model, spec, store = open_model(cfg.model, store_path, direct_io=cfg.direct_io,
                                    dtype=cfg.dtype)
    prompt_ids = list(encode(cfg.prompt))
    check_positions(model, len(prompt_ids), cfg.max_new_tokens)  # before the pool is built
    store.layout.check_bits(cfg.bits)
    copies = check_store_layout(pcfg, cfg.policy, store.layout, store_path)
    policy = make_policy(cfg.policy, stats=expert_stats(pcfg, cfg.expert_stats, cfg.model,
                                                        store_path))
    router = None
    if cfg.router:
        from d2moe.router.store import load_router

        router = load_router(cfg.router, spec=spec, store=store_path, device=str(device),
                             store_bits=(store.layout.b1, store.bits_stored),
                             store_layout=store.layout, store_source=store.source)
    controller = capacity_controller(capacity, router)
    widest = policy.max_bits(max(router.bits) if router is not None else cfg.bits)
    budget = expert_budget(spec, store.layout, cfg.budget, cfg.bits, widest)
    total = all_experts_bytes(spec, cfg.bits, store.layout)
    model.to(device)
    pool = ExpertPool(spec, store.layout, budget, device, copies=copies)
    backend = StreamingExperts(store, policy, pool, bits=cfg.bits, router=router,
                               capacity=controller, sync_rows=cfg.sync_rows)
    try:
        with torch_threads(cfg.threads):
            gen = generate(model, prompt_ids, cfg.max_new_tokens, backend=backend,
                           progress=cfg.progress)
    finally:
        timeline = backend.finish()
    resident_params = sum(p.numel() * p.element_size() for p in model.parameters())
    timeline.meta.update({"prompt": cfg.prompt, "bits": cfg.bits, "store": str(store_path),
                          "non_expert_bytes": resident_params})
    if router is not None:
        timeline.meta["router"] = router.meta["path"]
        timeline.meta["capacity"] = (controller.record() if controller is not None else
                                     {"mode": "fixed", "shares": list(router.capacities),
                                      "window": router.window_tokens})
    m = compute_metrics(timeline)
    out = Path(cfg.out)
    save_timeline(out / "events.npz", timeline)
    with atomic_write(out / "metrics.json") as f:
        json.dump({"config": asdict(cfg), "metrics": m.as_dict(), "meta": timeline.meta}, f,
                  indent=1, default=float)
    plot_bubbles([timeline], out / "bubbles.png", labels=[f"{policy.name} (real)"],
                 first_steps=3)
    io_note = "O_DIRECT on" if store.direct_io else "O_DIRECT off: the page cache may hide disk"
    memory = (f"device memory: {fmt_bytes(resident_params)} non-expert weights (resident) + "
              f"{fmt_bytes(pool.capacity_bytes)} expert pool (allocated once; peak "
              f"{fmt_bytes(pool.accounting.peak_bytes)} of experts in use)")
    summary = "\n".join([
        f"{spec.name} on {device} ({io_note}), policy {policy.name}, budget {cfg.budget} = "
        f"{fmt_bytes(budget)} of {fmt_bytes(total)} of experts at {cfg.bits} bits (measured)",
        format_table([metrics_row(policy.name, m)]),
        memory] + ([describe_capacity(timeline.meta["capacity"],
                                      run_bits(timeline.events, first_step=1))]
                   if router is not None else []) + [
        f"generation loop: {gen.decode_tokens_per_s:.1f} decode tokens/s by the wall clock "
        f"(the table's tok/s: the timeline's decode steps); "
        f"wrote {out}/events.npz, metrics.json, bubbles.png"])
    return {"text": cfg.prompt + continuation(decode, prompt_ids, gen.new_ids),
            "summary": summary, "timeline": timeline, "metrics": m, "generation": gen}


def capacity_controller(capacity: Any, router: Any) -> Any:
    """What `StreamingExperts(..., capacity=...)` takes for the options `capacity` (a
    d2moe.router.adaptive.CapacityConfig, or None: the router as trained) and the loaded
    `router` (a BitRouter, or None): a fresh AdaptiveCapacity over the router's current
    capacities in adaptive mode, else None. Fixed mode applies --capacity-window to the
    router; adaptive mode without a router is a UserError (field capacity-mode). Build one
    per run: the controller carries its decisions."""
    if capacity is None:
        return None
    if router is None:
        if capacity.capacity_mode == "adaptive":
            raise UserError("adaptive capacity needs a bit-width router", field="capacity-mode",
                            fix="pass --router DIR (d2moe router train) or drop the option")
        return None
    window = capacity.window_for(router.window_tokens)
    if capacity.capacity_mode == "fixed":
        router.set_capacities(router.capacities, window=window)
        return None
    from d2moe.router.adaptive import AdaptiveCapacity

    return AdaptiveCapacity(router.capacities, capacity, window)


