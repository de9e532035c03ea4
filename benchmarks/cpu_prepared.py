"""The CPU executor's decode with each expert's kernel inputs (plane views and the fallback's
float32 parameters) kept across runs, against rebuilding them for every run (before).

The tiny model decodes `--tokens` tokens at 4 bits with its experts streamed from a nested
store (O_DIRECT), HEBF, at each budget; per repeat both variants run back to back in this one
process, alternating which goes first. "rebuild" makes the pool build fresh `PlaneViews` for
every expert run (so the fallback prepares the parameters again), as the code did before
2026-11-23 06:40 UTC. Prints decode tok/s (median, min-max) of each and the median of the
per-repeat ratios kept / rebuild: the baseline is measured in the same run.

Usage: python benchmarks/cpu_prepared.py [--repeats 16] [--budgets 100%,50%,25%]
Run with one torch thread (the default) on a quiet machine: timings drift.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

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
VARIANTS = ("rebuild", "kept")


def decode_tok_s(model, spec, store: StoreReader, budget_bytes: int, prompt: list[int],
                 tokens: int, variant: str) -> float:
    """Prefill, then `tokens - 1` greedy decode steps: decode tokens/s."""
    pool = ExpertPool(spec, store.layout, budget_bytes, torch.device("cpu"))
    if variant == "rebuild":  # the earlier behaviour: fresh views (and parameters) per run
        pool._plane_views = pool._build_plane_views  # noqa: SLF001
    backend = StreamingExperts(store, make_policy("hebf"), pool, bits=BITS)
    cache = model.new_cache(batch=1, max_len=len(prompt) + tokens)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache, backend=backend)  # [1, T, V]
        nxt = int(logits[0, -1].argmax())
        t0 = time.perf_counter()
        for _ in range(tokens - 1):
            logits = model(torch.tensor([[nxt]]), cache, backend=backend)  # [1, 1, V]
            nxt = int(logits[0, -1].argmax())
        seconds = time.perf_counter() - t0
    backend.finish()
    return (tokens - 1) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=16)
    ap.add_argument("--budgets", default="100%,50%,25%")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {platform.node()}, {os.cpu_count()} cores; torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s); HEBF, {BITS} bits, "
          f"{args.tokens} tokens; start {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
          f", load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        quantize_checkpoint(tiny_dir(), path, QuantLayout(), progress=False)
        store = StoreReader(path, direct=True)
        model, spec = load_tiny()
        model.eval()
        prompt = list(encode(PROMPT))
        total = all_experts_bytes(spec, BITS, store.layout)
        runs: dict[tuple[str, str], list[float]] = {}
        for r in range(args.repeats):
            for label in budgets:
                nbytes = int(float(label.rstrip("%")) / 100 * total)
                for name in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
                    runs.setdefault((label, name), []).append(
                        decode_tok_s(model, spec, store, nbytes, prompt, args.tokens, name))
        store.close()
    print(f"end {time.strftime('%H:%M:%S UTC', time.gmtime())}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\n{'budget':>6s} {'rebuild tok/s':>22s} {'kept tok/s':>22s} {'kept / rebuild':>22s}")
    for label in budgets:
        old, new = runs[(label, "rebuild")], runs[(label, "kept")]
        ratios = [n / o for n, o in zip(new, old, strict=True)]

        def tps(xs: list[float]) -> str:
            return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"

        print(f"{label:>6s} {tps(old):>22s} {tps(new):>22s} "
              f"{f'{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})':>22s}")


if __name__ == "__main__":
    main()
