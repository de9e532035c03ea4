"""The shared harness of the executor A/B benchmarks: the tiny model decodes at 4 bits with
its experts streamed from a nested store (O_DIRECT), HEBF, at each budget; per repeat the
variants run back to back in one process, alternating which goes first, so the baseline is
measured in the same run. Prints decode tok/s (median, min-max) of each and the median of
the per-repeat ratios new / baseline.

A variant is a name and a function (pool, backend options) -> context manager under which
the forward passes run; see benchmarks/inference_mode.py and benchmarks/cpu_prepared.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from d2moe.core.cliargs import split_list
from d2moe.core.sizes import QuantLayout, all_experts_bytes
from d2moe.executor.backend import StreamingExperts
from d2moe.executor.pool import ExpertPool
from d2moe.model.load import load_tiny, tiny_dir
from d2moe.model.tokenizer import encode
from d2moe.policies import make_policy
from d2moe.quant.cmd import quantize_checkpoint
from d2moe.quant.store import StoreReader

BITS = 4
PROMPT = "def fib(n):\n    return"
# a variant: given the fresh pool of a run, the context its forward passes run under
Variant = Callable[[ExpertPool], AbstractContextManager]


def decode_tok_s(model, spec, store: StoreReader, budget_bytes: int, prompt: list[int],
                 tokens: int, variant: Variant) -> float:
    """Prefill, then `tokens - 1` greedy decode steps (as `generate`): decode tokens/s."""
    pool = ExpertPool(spec, store.layout, budget_bytes, torch.device("cpu"))
    mode = variant(pool)
    backend = StreamingExperts(store, make_policy("hebf"), pool, bits=BITS)
    cache = model.new_cache(batch=1, max_len=len(prompt) + tokens)
    with mode:
        logits = model(torch.tensor([prompt]), cache, backend=backend,
                       last_only=True)  # [1, 1, V]
        nxt = int(logits[0, -1].argmax())
        t0 = time.perf_counter()
        for _ in range(tokens - 1):
            logits = model(torch.tensor([[nxt]]), cache, backend=backend)  # [1, 1, V]
            nxt = int(logits[0, -1].argmax())
        seconds = time.perf_counter() - t0
    backend.finish()
    return (tokens - 1) / seconds


def load_average() -> str:
    """This machine's load averages (1, 5, 15 minutes)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def print_machine(what: str) -> None:
    """The run's header: machine, torch and its threads, `what`, start time, load."""
    print(f"machine: {platform.machine()}, {platform.node()}, {os.cpu_count()} cores; torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s); {what}; start "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average "
          f"{load_average()}", flush=True)


def parse_common(doc: str, *, repeats: int, budgets: str
                 ) -> tuple[argparse.Namespace, list[str]]:
    """The options every decode A/B takes (--repeats, --budgets, --tokens, --threads),
    parsed, with torch's thread count set: (args, the budgets)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--budgets", default=budgets)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    return args, split_list(args.budgets, "budgets", example="--budgets 25%,50%")


def run_ab(doc: str, baseline: tuple[str, Variant], new: tuple[str, Variant],
           repeats: int = 16) -> None:
    """Parse the common options, run both variants interleaved and print the table."""
    args, budgets = parse_common(doc, repeats=repeats, budgets="100%,50%,25%")
    print_machine(f"HEBF, {BITS} bits, {args.tokens} tokens")
    variants = dict([baseline, new])
    runs: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        quantize_checkpoint(tiny_dir(), path, QuantLayout(), progress=False)
        store = StoreReader(path, direct=True)
        model, spec = load_tiny()
        model.eval()
        prompt = list(encode(PROMPT))
        total = all_experts_bytes(spec, BITS, store.layout)
        for r in range(args.repeats):
            for label in budgets:
                nbytes = int(float(label.rstrip("%")) / 100 * total)
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                for name in order:
                    runs.setdefault((label, name), []).append(decode_tok_s(
                        model, spec, store, nbytes, prompt, args.tokens, variants[name]))
        store.close()
    print(f"end {time.strftime('%H:%M:%S UTC', time.gmtime())}, load average {load_average()}")
    b, n = baseline[0], new[0]
    print(f"\n{'budget':>6s} {b + ' tok/s':>22s} {n + ' tok/s':>22s} {f'{n} / {b}':>26s}")
    for label in budgets:
        old, now = runs[(label, b)], runs[(label, n)]
        ratios = [x / o for x, o in zip(now, old, strict=True)]

        def tps(xs: list[float]) -> str:
            return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"

        print(f"{label:>6s} {tps(old):>22s} {tps(now):>22s} "
              f"{f'{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})':>26s}")
