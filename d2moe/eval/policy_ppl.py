"""Held-out perplexity of a real model whose experts are served by the executor's
StreamingExperts backend under a policy and a memory budget.

Unlike `eval/ppl.py` (every expert dequantized at one width), the experts here come through
the very backend `d2moe run` uses, so whatever a policy does to the computation (System 2
substituting a low-importance miss with a similar resident expert, or serving it at the
lower bit-width already resident) shows in the perplexity, next to the same run's timeline
metrics (hit rate, expert compute time, stalls, bytes loaded).

Two ways to feed the held-out text (the tokens scored are the same: per window of `ctx`,
every token after the first):
- `decode` (default): one token per forward with a KV cache (teacher forcing), `batch`
  windows side by side: each step's demands are what serving that many sequences sees, so
  per-token router weights decide substitutions as they would in decoding.
- `windows`: `d2moe.model.perplexity.perplexity` with the backend, `batch` whole windows per
  forward (prefill-like steps: every expert is demanded by many tokens).
At a budget that holds every expert both equal the dense model dequantized at `bits`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from d2moe.core.cliargs import model_field
from d2moe.core.errors import UserError

if TYPE_CHECKING:
    from d2moe.core.events import Timeline
    from d2moe.core.spec import ModelSpec
    from d2moe.model.transformer import Transformer
    from d2moe.policies.stats import ExpertStats
    from d2moe.quant.store import StoreReader

MODES = ("decode", "windows")


@dataclass(frozen=True)
class PolicyPplConfig:
    """What to score: model and store, policy, budget, held-out slice."""

    model: str = model_field()
    store: str = field(default="", metadata={
        "help": "nested store; empty: for tiny, the one `d2moe run` builds in the cache"})
    policy: str = field(default="hebf", metadata={"help": "policy name (d2moe simulate --list)"})
    budget: str = field(default="50%", metadata={
        "help": "expert memory budget: bytes (a bare whole number above 1 is bytes), a "
                "percentage or a fraction of all experts at --bits"})
    bits: int = field(default=4, metadata={"help": "bit-width every expert is asked at"})
    stats: str = field(default="auto", metadata={
        "help": "expert statistics for policies that use them (d2moe experts stats): FILE, "
                "or auto for <store>/expert_stats.json (computed once when missing)"})
    heldout_kib: int = field(default=8, metadata={"help": "KiB of the held-out split scored"})
    ctx: int = field(default=256, metadata={"help": "tokens per scoring window"})
    mode: str = field(default="decode", metadata={
        "help": "decode (one token per step, KV cache) or windows (whole windows per step)"})
    batch: int = field(default=1, metadata={"help": "windows side by side per step"})
    direct_io: bool = field(default=True, metadata={"help": "read the store with O_DIRECT"})
    threads: int = field(default=1, metadata={
        "help": "torch intra-op threads (0: torch's default); one keeps a small shared CPU's "
                "timings sane"})


@dataclass(frozen=True)
class PolicyPpl:
    """Perplexity of one (policy, budget) and the metrics of the same run's timeline."""

    policy: str
    budget: str
    budget_bytes: int
    bits: int
    mode: str
    ppl: float
    nll_nats: float
    tokens_scored: int
    hit_rate: float
    expert_us: float  # compute lane: runs and substitute runs
    stall_us: float  # compute lane waiting on loads
    io_busy_us: float
    bytes_loaded: int
    runs: int
    substitutes: int  # runs on a stand-in expert (System 2)
    degraded_runs: int  # runs at fewer bits than their tokens were routed at
    mean_run_bits: float
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


@dataclass(frozen=True)
class ScoringInputs:
    """What every (policy, budget) scored shares: a model without its experts, its spec,
    its open store (and path) and the held-out ids."""

    model: Transformer
    spec: ModelSpec
    store: StoreReader
    store_path: Path
    ids: list[int]


def open_scoring_inputs(cfg: PolicyPplConfig) -> ScoringInputs:
    """Load the model (no experts), open and check the store, take the held-out slice."""
    from d2moe.core.sizes import QuantLayout
    from d2moe.eval.ppl import heldout_ids
    from d2moe.executor.setup import open_model, resolve_store, store_layout
    from d2moe.policies import policy_config

    store_path = resolve_store(cfg.model, cfg.store,
                               store_layout(policy_config(cfg.policy), QuantLayout()))
    model, spec, store = open_model(cfg.model, store_path, direct_io=cfg.direct_io)
    return ScoringInputs(model.eval(), spec, store, store_path,
                         heldout_ids(cfg.model, spec, cfg.heldout_kib))


def stats_for(inputs: ScoringInputs, policy: str, option: str = "auto",
              model: str = "tiny") -> ExpertStats | None:
    """The expert statistics `policy` needs (None when it needs none), found as `d2moe run`
    finds them: FILE, or `auto` (beside the store, computed once when missing)."""
    from d2moe.executor.setup import expert_stats
    from d2moe.policies import policy_config

    return expert_stats(policy_config(policy), option, model, inputs.store_path)


def budget_bytes(spec: ModelSpec, store: StoreReader, budget: str, bits: int,
                 widest: int | None = None) -> int:
    """The budget in bytes (a share of all experts at `bits`), at least one expert at
    `widest` bits (the most a run of the policy can use; default `bits`)."""
    from d2moe.executor.setup import expert_budget

    return expert_budget(spec, store.layout, budget, bits, widest)


def score(inputs: ScoringInputs, policy: str, budget: str, *, bits: int = 4,
          stats: ExpertStats | None = None, ctx: int = 256, batch: int = 1,
          mode: str = "decode", threads: int = 1) -> PolicyPpl:
    """Perplexity of `inputs.model` on `inputs.ids` with its experts streamed from
    `inputs.store` under `policy` (built with `stats` when it uses them) and `budget`, and
    the same run's timeline metrics."""
    from d2moe.profiles.measure import torch_threads

    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}", field="mode", fix=f"use {' or '.join(MODES)}")
    if ctx < 2 or batch < 1:
        raise UserError(f"need ctx >= 2 and batch >= 1, got {ctx} and {batch}",
                        field="ctx" if ctx < 2 else "batch", fix="e.g. --ctx 256 --batch 1")
    with torch_threads(threads):
        return _score(inputs, policy, budget, bits, stats, ctx, batch, mode)


def _score(inputs: ScoringInputs, policy: str, budget: str, bits: int, stats: ExpertStats | None,
           ctx: int, batch: int, mode: str) -> PolicyPpl:
    import time

    from d2moe.analysis import compute_metrics
    from d2moe.executor.backend import StreamingExperts
    from d2moe.executor.pool import ExpertPool
    from d2moe.executor.setup import check_store_layout
    from d2moe.policies import make_policy, policy_config

    pcfg = policy_config(policy)
    copies = check_store_layout(pcfg, policy, inputs.store.layout, inputs.store_path)
    pol = make_policy(policy, stats=stats if pcfg.needs_stats else None)
    nbytes = budget_bytes(inputs.spec, inputs.store, budget, bits, pol.max_bits(bits))
    device = next(inputs.model.parameters()).device
    pool = ExpertPool(inputs.spec, inputs.store.layout, nbytes, device, copies=copies)
    backend = StreamingExperts(inputs.store, pol, pool, bits=bits)
    t0 = time.perf_counter()
    try:
        if mode == "windows":
            from d2moe.model.perplexity import perplexity

            p = perplexity(inputs.model, inputs.ids, ctx=ctx, batch=batch, backend=backend)
            nll, count = p.nll_nats, p.tokens_scored
        else:
            nll, count = _decode_nll(inputs.model, inputs.ids, ctx, batch, backend)
    finally:
        timeline = backend.finish()
    wall = time.perf_counter() - t0
    m = compute_metrics(timeline)
    expert_us, stall_us, subs = _compute_lane(timeline)
    return PolicyPpl(policy=policy, budget=budget, budget_bytes=nbytes, bits=bits, mode=mode,
                     ppl=math.exp(nll), nll_nats=nll, tokens_scored=count,
                     hit_rate=m.hit_rate, expert_us=expert_us, stall_us=stall_us,
                     io_busy_us=m.io_busy_us, bytes_loaded=m.bytes_loaded, runs=m.runs,
                     substitutes=subs, degraded_runs=m.degraded_runs,
                     mean_run_bits=m.mean_run_bits, wall_s=wall)


def policy_ppl(cfg: PolicyPplConfig) -> PolicyPpl:
    """Open what `cfg` names and score its one (policy, budget)."""
    inputs = open_scoring_inputs(cfg)
    try:
        stats = stats_for(inputs, cfg.policy, cfg.stats, cfg.model)
        return score(inputs, cfg.policy, cfg.budget, bits=cfg.bits, stats=stats, ctx=cfg.ctx,
                     batch=cfg.batch, mode=cfg.mode, threads=cfg.threads)
    finally:
        inputs.store.close()


def _decode_nll(model: Transformer, ids: list[int], ctx: int, batch: int,
                backend: Any) -> tuple[float, int]:
    """Teacher-forced decoding of every window of `ctx` tokens, `batch` windows at a time,
    one token per forward: (mean NLL in nats of each window's tokens after the first, count)."""
    import torch
    import torch.nn.functional as F

    n_win = len(ids) // ctx
    if n_win == 0:
        raise UserError(f"{len(ids)} tokens are fewer than one window of {ctx}", field="ctx",
                        fix="use a longer held-out slice or a smaller ctx")
    device = next(model.parameters()).device
    windows = torch.tensor(ids[: n_win * ctx], dtype=torch.long, device=device).view(n_win, ctx)
    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, n_win, batch):
            w = windows[s:s + batch]  # [b, ctx]
            cache = model.new_cache(batch=w.shape[0], max_len=ctx)
            for i in range(ctx - 1):
                logits = model(w[:, i:i + 1], cache, backend=backend)  # [b, 1, V]
                total += F.cross_entropy(logits[:, 0].float(), w[:, i + 1],
                                         reduction="sum").item()
                count += w.shape[0]
    return total / count, count


def _compute_lane(timeline: Timeline) -> tuple[float, float, int]:
    """(µs of runs and substitute runs, µs of stalls, number of substitute runs)."""
    expert = stall = 0.0
    subs = 0
    for e in timeline.events:
        if e.lane != "compute":
            continue
        if e.kind in ("run", "substitute"):
            expert += e.end_us - e.start_us
            subs += e.kind == "substitute"
        elif e.kind == "stall":
            stall += e.end_us - e.start_us
    return expert, stall, subs
