"""Real executor throughput: FIFO against HEBF under budgets of 25%, 50% and 100% of all
experts at 4 bits, with experts streamed from a nested store (O_DIRECT), for the built-in
tiny model and a random-weight Mixtral-8x7B-shaped model, all in one run.

Baselines, measured in the same run and named in every ratio:
- `resident`: the same model with nothing to load. Tiny: every expert dense, dequantized
  at 4 bits once (no I/O, no dequantization per run). Mixtral-shaped (dense would need
  22 GiB): every expert preloaded into a 100% pool, so the executor runs with no I/O.
- `fifo`: each other policy's row is divided by the FIFO row of the same budget and repeat.
Each configuration runs `--repeats` times (FIFO and HEBF alternate which goes first);
tok/s is the median with the range, and the decode-only lane times come from the
timeline: compute busy (runs + non-expert), I/O busy (loads), stall (compute waiting).

Usage: python benchmarks/executor.py [--models tiny,mixtral] [--repeats 2] [--threads N]
           [--policies fifo,hebf (e.g. add hebf-lru: HEBF's order with FIFO's LRU residency)]
           [--tokens 32] [--mixtral-tokens 8] [--mixtral-store DIR (kept and reused)]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from d2moe.analysis import compute_metrics
from d2moe.core.cliargs import split_list
from d2moe.core.events import Timeline
from d2moe.core.jobs import ExpertKey, Load
from d2moe.core.sizes import QuantLayout, all_experts_bytes
from d2moe.core.spec import load_spec
from d2moe.eval.ppl import dense_backend, store_matrices
from d2moe.executor.backend import StreamingExperts
from d2moe.executor.pool import ExpertPool
from d2moe.model.generate import generate
from d2moe.model.load import load_tiny, tiny_dir
from d2moe.model.tokenizer import encode
from d2moe.model.transformer import Transformer
from d2moe.policies import make_policy
from d2moe.quant.cmd import quantize_checkpoint
from d2moe.quant.reference import dequantize
from d2moe.quant.store import StoreReader

sys.path.insert(0, str(Path(__file__).parent))
from executor_mixtral import LAYOUT as MIXTRAL_LAYOUT  # noqa: E402
from executor_mixtral import random_store  # noqa: E402

BITS = 4
BUDGETS = (0.25, 0.5, 1.0)


@dataclass(frozen=True)
class Sample:
    """One generation: decode tok/s, the decode steps' lane times (ms), the run's counters."""

    tok_s: float
    warm_prefill_tok_s: float  # the second prompt's prefill, on the pool the first left
    compute_ms: float
    io_ms: float
    stall_ms: float
    hit_pct: float
    loaded_mib: float
    ids: tuple[int, ...]
    load_avg: float  # 1-minute load average at the end (other jobs on the machine)


@dataclass(frozen=True)
class Case:
    """A model under test: its weights, store, prompt and decode length."""

    name: str
    model: Transformer
    spec: object
    store: StoreReader
    prompt: list[int]
    tokens: int
    second: list[int]  # a second turn's prompt, prefilled after the first generation


def decode_lanes(events: list, last: int) -> tuple[float, float, float]:
    """(compute busy, I/O busy, stall) in ms over the decode steps 1..last."""
    ev = [e for e in events if 1 <= e.step <= last]
    comp = sum(e.end_us - e.start_us for e in ev
               if e.lane == "compute" and e.kind in ("run", "non_expert"))
    io = sum(e.end_us - e.start_us for e in ev if e.lane == "io")
    stall = sum(e.end_us - e.start_us for e in ev if e.lane == "compute" and e.kind == "stall")
    return comp / 1e3, io / 1e3, stall / 1e3


def streamed(case: Case, policy: str, frac: float, device: torch.device, *,
             preload: bool = False) -> Sample:
    """Generate with experts streamed under `frac` of all experts (preload: all resident)."""
    layout = case.store.layout
    total = all_experts_bytes(case.spec, BITS, layout)
    pool = ExpertPool(case.spec, layout, int(frac * total), device)
    if preload:
        for layer in range(case.spec.layers):
            for e in range(case.spec.experts):
                ld = Load(ExpertKey(layer, e), 0, BITS)
                pool.admit_stored(ld, case.store.read_planes(layer, e, 0, BITS))
    backend = StreamingExperts(case.store, make_policy(policy), pool, bits=BITS)
    gen = generate(case.model, case.prompt, case.tokens, backend=backend)
    warm = generate(case.model, case.second, 1, backend=backend)
    tl = backend.finish()
    first = Timeline([e for e in tl.events if e.step < case.tokens], tl.meta)
    m = compute_metrics(first)  # hit rate and bytes of the first generation
    comp, io, stall = decode_lanes(tl.events, case.tokens - 1)
    del backend, pool
    gc.collect()  # the next configuration's pool must not coexist with this one
    return Sample(gen.decode_tokens_per_s, len(case.second) / warm.prefill_s, comp, io, stall,
                  100 * m.hit_rate, m.bytes_loaded / 2**20, gen.new_ids + warm.new_ids,
                  os.getloadavg()[0])


def dense_resident(case: Case, device: torch.device) -> Sample:
    """The tiny model with every expert dense at BITS bits (no executor)."""
    nested = store_matrices(case.store)
    dense = dense_backend(case.spec, lambda key: dequantize(nested[key], BITS)).to(device)
    gen = generate(case.model, case.prompt, case.tokens, backend=dense)
    warm = generate(case.model, case.second, 1, backend=dense)
    return Sample(gen.decode_tokens_per_s, len(case.second) / warm.prefill_s, float("nan"),
                  0.0, 0.0, 100.0, 0.0, gen.new_ids + warm.new_ids, os.getloadavg()[0])


def measure(case: Case, device: torch.device, repeats: int, policies: list[str]) -> dict:
    """{(policy, budget): [Sample per repeat]}, with ('resident', 1.0) the reference."""
    out: dict = {}
    for r in range(repeats):
        ref = (dense_resident(case, device) if case.name == "tiny"
               else streamed(case, "fifo", 1.0, device, preload=True))
        out.setdefault(("resident", 1.0), []).append(ref)
        for frac in BUDGETS:
            order = policies if r % 2 == 0 else policies[::-1]  # who goes first alternates
            for name in order:
                s = streamed(case, name, frac, device)
                out.setdefault((name, frac), []).append(s)
                print(f"  {case.name} repeat {r + 1}: {name} {frac:.0%} {s.tok_s:.3f} decode "
                      f"tok/s, {s.warm_prefill_tok_s:.2f} warm prefill tok/s (load avg "
                      f"{s.load_avg:.1f})", flush=True)
    return out


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def _ratio(runs: dict, policy: str, frac: float, field: str) -> tuple[float, float, float]:
    """policy / FIFO of `field` per repeat (same budget, same repeat): (median, min, max)."""
    rs = [getattr(h, field) / getattr(f, field)
          for h, f in zip(runs[(policy, frac)], runs[("fifo", frac)], strict=True)]
    return _med(rs), min(rs), max(rs)


def report(case: Case, runs: dict, policies: list[str]) -> None:
    """Print the table: medians (range) and ratios against the named baselines."""
    ref = runs[("resident", 1.0)]
    ref_tps = _med([s.tok_s for s in ref])
    ref_warm = _med([s.warm_prefill_tok_s for s in ref])
    ref_ids = ref[0].ids
    print(f"\n{case.name}: median of {len(ref)} repeats (min-max). decode = decode tok/s of "
          f"the first prompt; warm = prefill tok/s of a second {len(case.second)}-token prompt "
          f"on the pool the first left. x res = median / resident median; x fifo = median "
          f"of per-repeat ratios (min-max). Lane ms: decode steps (compute = runs + "
          f"non-expert; io = loads; stall = compute waiting on loads).")
    print(f"{'policy':8s} {'budget':>6s} {'decode':>8s} {'(min-max)':>17s} {'x res':>6s} "
          f"{'x fifo':>17s} {'warm':>8s} {'x res':>6s} {'x fifo':>17s} "
          f"{'compute':>8s} {'io':>8s} {'stall':>7s} {'hit %':>6s} {'MiB':>7s} {'same':>5s}")
    for key in [("resident", 1.0)] + [(p, f) for f in BUDGETS for p in policies]:
        ss = runs[key]
        tps = [s.tok_s for s in ss]
        warm = _med([s.warm_prefill_tok_s for s in ss])
        dec_r = warm_r = ""
        if key[0] not in ("resident", "fifo"):
            dec_r = "{:.2f}x ({:.2f}-{:.2f})".format(*_ratio(runs, *key, "tok_s"))
            warm_r = "{:.2f}x ({:.2f}-{:.2f})".format(*_ratio(runs, *key, "warm_prefill_tok_s"))
        same = "yes" if all(s.ids == ref_ids for s in ss) else "NO"
        label = "-" if key[0] == "resident" else f"{key[1]:.0%}"
        print(f"{key[0]:8s} {label:>6s} {_med(tps):8.3f} "
              f"{f'({min(tps):.3f}-{max(tps):.3f})':>17s} {_med(tps) / ref_tps:5.2f}x "
              f"{dec_r:>17s} {warm:8.3f} {warm / ref_warm:5.2f}x {warm_r:>17s} "
              f"{_med([s.compute_ms for s in ss]):8.1f} {_med([s.io_ms for s in ss]):8.1f} "
              f"{_med([s.stall_ms for s in ss]):7.1f} {_med([s.hit_pct for s in ss]):6.1f} "
              f"{_med([s.loaded_mib for s in ss]):7.1f} {same:>5s}")
    loads = [s.load_avg for ss in runs.values() for s in ss]
    print(f"load average (1 min) after each generation: {min(loads):.1f}-{max(loads):.1f}")


def tiny_case(tmp: Path, tokens: int, device: torch.device) -> Case:
    """The built-in tiny model with a fresh store in the default layout."""
    path = tmp / "tiny-store"
    quantize_checkpoint(tiny_dir(), path, QuantLayout(), progress=False)
    model, spec = load_tiny()
    return Case("tiny", model.to(device), spec, StoreReader(path, direct=True),
                list(encode("def fib(n):\n    return")), tokens,
                list(encode("class Stack:\n    def push(self, item):\n        self.")))


def mixtral_case(path: Path, layers: int, tokens: int, prompt_tokens: int,
                 device: torch.device) -> Case:
    """The random-weight Mixtral-shaped model (store written once, kept at `path`)."""
    spec = dataclasses.replace(load_spec("mixtral-8x7b"), layers=layers)
    if not (path / "index.json").is_file():
        print(f"writing a random {layers}-layer Mixtral-shaped store to {path}", flush=True)
        random_store(path, spec)
    store = StoreReader(path, direct=True)
    if store.layout != MIXTRAL_LAYOUT:
        raise SystemExit(f"{path} is not a {MIXTRAL_LAYOUT} store")
    model = Transformer(spec, with_experts=False)
    model.init_weights(seed=0)
    return Case("mixtral", model.to(device), spec, store, list(range(1, prompt_tokens + 1)),
                tokens, list(range(101, 101 + 2 * prompt_tokens)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,mixtral")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--policies", default="fifo,hebf", help="compared against fifo")
    ap.add_argument("--tokens", type=int, default=32, help="tiny: new tokens per run")
    ap.add_argument("--mixtral-tokens", type=int, default=8, help="new tokens per run")
    ap.add_argument("--mixtral-prompt", type=int, default=4, help="prompt tokens")
    ap.add_argument("--mixtral-layers", type=int, default=4)
    ap.add_argument("--mixtral-store", default="", help="directory to keep the store in")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="torch intra-op threads (default: one core left to the I/O lane)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.exit(2, f"executor.py --device {args.device}: torch sees no CUDA device "
                   "(fix: --device cpu)\n")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
          f"torch threads, device {device}, torch {torch.__version__}; {BITS} bits; "
          f"start {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    models = split_list(args.models, "models", example="--models tiny")
    policies = ["fifo"] + [p for p in split_list(args.policies, "policies",
                                                 example="--policies hebf") if p != "fifo"]
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        if "tiny" in models:
            cases.append(tiny_case(Path(tmp), args.tokens, device))
        if "mixtral" in models:
            path = Path(args.mixtral_store) if args.mixtral_store else Path(tmp) / "mixtral"
            cases.append(mixtral_case(path, args.mixtral_layers, args.mixtral_tokens,
                                      args.mixtral_prompt, device))
        for case in cases:
            total = all_experts_bytes(case.spec, BITS, case.store.layout)
            print(f"{case.name}: {case.spec.layers} layers x {case.spec.experts} experts, "
                  f"all experts {total / 2**20:.1f} MiB at {BITS} bits "
                  f"({case.store.layout.kind}), {len(case.prompt)}-token prompt, "
                  f"{case.tokens} new tokens; O_DIRECT "
                  f"{'on' if case.store.direct_io else 'off'}", flush=True)
            report(case, measure(case, device, args.repeats, policies), policies)


if __name__ == "__main__":
    main()
