"""Online adaptive capacity against fixed capacities on the real executor (issue #7 item 5).

The tiny model with a trained bit-width router streams its experts from the nested store
under a budget (a share of all experts at 4 bits), HEBF policy, and decodes a held-out chunk
token by token with teacher forcing: each decode step feeds the true next byte, so both
modes see the same tokens and the log-probability of the true next token gives the
held-out perplexity of exactly the widths the run chose, measured in the same run as its
speed. Per budget and repeat, fixed capacities (the router's trained ones) and adaptive
capacities (`d2moe.router.adaptive`, default rule) run back to back on the same chunk (which
goes first alternates; repeat r uses chunk r), both with the same capacity window. Printed:
decode tok/s, the decode steps' stall and I/O time, loaded MiB, average bits, perplexity,
and the per-repeat ratios adaptive / fixed (median, min-max). `full precision` is the
perplexity of the same tokens with the model's own fp32 experts (no router), a reference.

    python benchmarks/router_adaptive.py --router out/router_eval/V1-a0.01 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from d2moe.core.cliargs import split_list
from d2moe.core.sizes import all_experts_bytes
from d2moe.eval.ppl import heldout_ids
from d2moe.executor.backend import StreamingExperts
from d2moe.executor.pool import ExpertPool
from d2moe.model.load import load_tiny
from d2moe.policies import make_policy
from d2moe.quant.store import StoreReader
from d2moe.router.adaptive import AdaptiveCapacity, CapacityConfig, run_bits
from d2moe.router.store import load_router

BITS = 4  # the budget is a share of all experts at this width (the router's widest)


@dataclass(frozen=True)
class Sample:
    """One teacher-forced decode of a chunk."""

    tok_s: float
    stall_ms: float
    io_ms: float
    wall_ms: float
    loaded_mib: float
    avg_bits: float
    ppl: float
    shares: tuple[float, ...]  # the last window's shares
    load_avg: float


def forced(model, ids: list[int], prompt: int, backend) -> tuple[float, float]:
    """Prefill ids[:prompt], then one decode step per true token: (mean NLL of the decode
    steps' next tokens, decode seconds)."""
    cache = model.new_cache(batch=1, max_len=len(ids))
    nll = 0.0
    with torch.no_grad():
        model(torch.tensor([ids[:prompt]]), cache, backend=backend, last_only=True)
        t0 = time.perf_counter()
        for i in range(prompt, len(ids) - 1):
            logits = model(torch.tensor([[ids[i]]]), cache, backend=backend)  # [1, 1, V]
            nll -= float(torch.log_softmax(logits[0, -1].float(), -1)[ids[i + 1]])
        secs = time.perf_counter() - t0
    return nll / (len(ids) - 1 - prompt), secs


def one(model, spec, reader, router_dir: str, ids: list[int], prompt: int, frac: float,
        mode: str, cap_cfg: CapacityConfig, policy: str) -> Sample:
    """One run at `frac` of all experts, fixed or adaptive capacities."""
    router = load_router(router_dir, spec=spec, store_bits=(reader.layout.b1,
                                                            reader.bits_stored))
    window = cap_cfg.window_for(router.window_tokens)
    router.set_capacities(router.capacities, window=window)
    ctl = AdaptiveCapacity(router.capacities, cap_cfg, window) if mode == "adaptive" else None
    budget = int(frac * all_experts_bytes(spec, BITS, reader.layout))
    pool = ExpertPool(spec, reader.layout, budget, torch.device("cpu"))
    backend = StreamingExperts(reader, make_policy(policy), pool, bits=BITS, router=router,
                               capacity=ctl)
    try:
        nll, secs = forced(model, ids, prompt, backend)
    finally:
        tl = backend.finish()
    dec = [e for e in tl.events if e.step >= 1]
    stall = sum(e.dur_us for e in dec if e.kind == "stall")
    io = sum(e.dur_us for e in dec if e.lane == "io")
    wall = sum(e.dur_us for e in dec if e.lane == "step")
    loaded = sum(e.bytes for e in dec if e.lane == "io")
    shares = ctl.shares if ctl is not None else router.capacities
    del backend, pool
    gc.collect()
    return Sample((len(ids) - 1 - prompt) / secs, stall / 1e3, io / 1e3, wall / 1e3,
                  loaded / 2**20, run_bits(tl.events, first_step=1), math.exp(nll),
                  tuple(shares), os.getloadavg()[0])


def fp_ppl(ids: list[int], prompt: int) -> float:
    """Perplexity of the same decode tokens with the model's own fp32 experts."""
    model, _ = load_tiny()
    return math.exp(forced(model, ids, prompt, None)[0])


def _rng(xs: list[float], fmt: str = "{:.3f}") -> str:
    """median (min-max) of the finite values; n/a if none."""
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return "n/a"
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--router", default="out/router_eval/V1-a0.01", help="trained router DIR")
    ap.add_argument("--store", default="", help="default: the store the router was trained on")
    ap.add_argument("--budgets", default="0.25,0.5", help="shares of all experts at 4 bits")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=256, help="tokens per held-out chunk")
    ap.add_argument("--prompt", type=int, default=16, help="prefilled tokens of each chunk")
    ap.add_argument("--policy", default="hebf")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--window", type=int, default=16, help="capacity window (both modes)")
    ap.add_argument("--stall-high", type=float, default=CapacityConfig.stall_high)
    ap.add_argument("--stall-low", type=float, default=CapacityConfig.stall_low)
    ap.add_argument("--share-step", type=float, default=CapacityConfig.share_step)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = args.store or json.loads((Path(args.router) / "router.json").read_text())["store"]
    cap_cfg = CapacityConfig(capacity_mode="adaptive", capacity_window=args.window,
                             stall_high=args.stall_high, stall_low=args.stall_low,
                             share_step=args.share_step)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
          f"torch thread(s), torch {torch.__version__}; start "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average {os.getloadavg()[0]:.2f}; "
          f"router {args.router}, store {store}, policy {args.policy}; capacity window "
          f"{args.window}; adaptive rule {cap_cfg}", flush=True)
    model, spec = load_tiny(with_experts=False)
    reader = StoreReader(store, direct=True)
    all_ids = heldout_ids("tiny", spec, max(1, args.chunk * args.repeats // 1024 + 1))
    chunks = [all_ids[r * args.chunk:(r + 1) * args.chunk] for r in range(args.repeats)]
    fps = [fp_ppl(c, args.prompt) for c in chunks]
    budgets = [float(b) for b in split_list(args.budgets, "budgets", example="--budgets 0.25,0.5")]
    runs: dict[tuple[float, str], list[Sample]] = {}
    for r, ids in enumerate(chunks):
        for frac in budgets:
            for mode in (("fixed", "adaptive") if r % 2 == 0 else ("adaptive", "fixed")):
                s = one(model, spec, reader, args.router, ids, args.prompt, frac, mode,
                        cap_cfg, args.policy)
                runs.setdefault((frac, mode), []).append(s)
                print(f"  repeat {r + 1} budget {frac:.0%} {mode}: {s.tok_s:.1f} tok/s, stall "
                      f"{s.stall_ms:.0f} ms of {s.wall_ms:.0f}, {s.avg_bits:.3f} bits, ppl "
                      f"{s.ppl:.4f}, shares {'/'.join(f'{x:.2f}' for x in s.shares)} (load "
                      f"avg {s.load_avg:.2f})", flush=True)
    n = len(chunks[0]) - 1 - args.prompt
    print(f"\n{args.repeats} repeats x {n} teacher-forced decode steps; median (min-max); "
          f"full precision ppl of the same tokens {_rng(fps, '{:.4f}')}")
    print("| budget | capacities | decode tok/s | stall ms | stall % of decode | I/O ms | "
          "loaded MiB | avg bits | perplexity | final shares (2/3/4) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for frac in budgets:
        for mode in ("fixed", "adaptive"):
            ss = runs[(frac, mode)]
            shares = "/".join(f"{x:.2f}" for x in ss[0].shares) if len(
                {s.shares for s in ss}) == 1 else "; ".join(
                "/".join(f"{x:.2f}" for x in s.shares) for s in ss)
            print(f"| {frac:.0%} | {mode} | {_rng([s.tok_s for s in ss], '{:.1f}')} | "
                  f"{_rng([s.stall_ms for s in ss], '{:.0f}')} | "
                  f"{_rng([100 * s.stall_ms / s.wall_ms for s in ss], '{:.1f}')} | "
                  f"{_rng([s.io_ms for s in ss], '{:.0f}')} | "
                  f"{_rng([s.loaded_mib for s in ss], '{:.2f}')} | "
                  f"{_rng([s.avg_bits for s in ss])} | {_rng([s.ppl for s in ss], '{:.4f}')} "
                  f"| {shares} |")
    print("\nadaptive / fixed, per repeat (same chunk, same budget): median (min-max)")
    print("| budget | decode tok/s | stall ms | loaded MiB | avg bits | perplexity |")
    print("|---|---|---|---|---|---|")
    for frac in budgets:
        pairs = list(zip(runs[(frac, "adaptive")], runs[(frac, "fixed")], strict=True))

        def ratio(name: str, pairs=pairs) -> str:
            floor = 10.0 if name == "stall_ms" else 1e-6  # no ratio of a few ms of noise
            xs = [getattr(a, name) / getattr(f, name) if getattr(f, name) >= floor else math.nan
                  for a, f in pairs]
            out = _rng(xs)
            return out if out == "n/a" else out + "x"

        print(f"| {frac:.0%} | {ratio('tok_s')} | {ratio('stall_ms')} | {ratio('loaded_mib')} "
              f"| {ratio('avg_bits')} | {ratio('ppl')} |")
    loads = [s.load_avg for ss in runs.values() for s in ss]
    print(f"\nload average (1 min) after each run: {min(loads):.2f}-{max(loads):.2f}; end "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")


if __name__ == "__main__":
    main()
