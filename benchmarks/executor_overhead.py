"""What skipping the I/O lane for plans without loads saves the real executor.

The tiny model decodes `--tokens` tokens at 4 bits with its experts streamed from a nested
store (O_DIRECT) at each budget (default 100% and 50% of all experts), with one policy
(default FIFO), twice per repeat: `old` hands every layer's plan to the I/O lane's thread
(`StreamingExperts(handoff_empty=True)`, the behaviour before 2026-11-23) and `new` only the
plans with loads. The two alternate which goes first; the baseline is measured in the same
run. Printed per budget: decode tok/s (median, min-max) of each, the median of the per-repeat
ratios new / old (min-max), the decode layers handed to the I/O lane, and the mean compute
lane time of a decode layer from its non-expert end to the next layer's non-expert start
(dispatch, runs, stalls).

Usage: python benchmarks/executor_overhead.py [--repeats 6] [--budgets 100%,50%]
           [--policy fifo] [--tokens 32]
Run with one torch thread (the default here) on a quiet machine; timings drift.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from decode_ab import load_average, print_machine

from d2moe.core.cliargs import split_list
from d2moe.core.sizes import QuantLayout, all_experts_bytes
from d2moe.executor.backend import StreamingExperts
from d2moe.executor.pool import ExpertPool
from d2moe.model.generate import generate
from d2moe.model.load import load_tiny, tiny_dir
from d2moe.model.tokenizer import encode
from d2moe.policies import make_policy
from d2moe.quant.cmd import quantize_checkpoint
from d2moe.quant.store import StoreReader

BITS = 4
PROMPT = "def fib(n):\n    return"


@dataclass(frozen=True)
class Sample:
    """One generation: decode tok/s, decode layers handed over of all, mean layer us."""

    tok_s: float
    handed: int
    layers: int
    layer_us: float
    ids: tuple[int, ...]


def decode_layer_us(events: list, first_step: int = 1) -> float:
    """Mean compute-lane time (us) of a decode layer after its non-expert row: from that
    row's end to the next non-expert row's start (the step's last layer left out)."""
    ne = sorted((e.step, e.layer, e.start_us, e.end_us) for e in events
                if e.kind == "non_expert" and e.step >= first_step)
    spans = [b[2] - a[3] for a, b in zip(ne, ne[1:], strict=False) if a[0] == b[0]]
    return statistics.fmean(spans) if spans else float("nan")


def one_run(model, spec, store: StoreReader, policy: str, budget_bytes: int, prompt: list[int],
            tokens: int, handoff_empty: bool) -> Sample:
    """Generate once; count the decode layers whose plan went to the I/O lane."""
    pool = ExpertPool(spec, store.layout, budget_bytes, torch.device("cpu"))
    backend = StreamingExperts(store, make_policy(policy), pool, bits=BITS,
                               handoff_empty=handoff_empty)
    gen = generate(model, prompt, tokens, backend=backend)
    tl = backend.finish()
    prefill_loaded = len({e.layer for e in tl.events if e.kind == "load" and e.step == 0})
    prefill_handed = spec.layers if handoff_empty else prefill_loaded
    decode_layers = (tokens - 1) * spec.layers
    return Sample(gen.decode_tokens_per_s, backend.io_submits - prefill_handed, decode_layers,
                  decode_layer_us(tl.events), tuple(gen.new_ids))


def measure(args: argparse.Namespace, model, spec, store: StoreReader,
            prompt: list[int]) -> dict[tuple[str, str], list[Sample]]:
    """{(budget, 'old'|'new'): samples}, old and new alternating who goes first."""
    total = all_experts_bytes(spec, BITS, store.layout)
    budgets = split_list(args.budgets, "budgets", example="--budgets 25%,50%")
    out: dict[tuple[str, str], list[Sample]] = {}
    for r in range(args.repeats):
        for label in budgets:
            nbytes = int(float(label.rstrip("%")) / 100 * total)
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            for which in order:
                s = one_run(model, spec, store, args.policy, nbytes, prompt, args.tokens,
                            which == "old")
                out.setdefault((label, which), []).append(s)
                print(f"  repeat {r + 1} {label:>5s} {which}: {s.tok_s:7.2f} decode tok/s, "
                      f"{s.handed}/{s.layers} decode layers handed over (load avg "
                      f"{os.getloadavg()[0]:.2f})", flush=True)
    return out


def report(runs: dict[tuple[str, str], list[Sample]], budgets: list[str]) -> None:
    """The table: medians (min-max), per-repeat ratios new / old, same tokens or not."""
    print(f"\n{'budget':>6s} {'old tok/s':>22s} {'new tok/s':>22s} {'new/old':>20s} "
          f"{'handed old':>11s} {'handed new':>11s} {'layer us old':>13s} "
          f"{'layer us new':>13s} {'same':>5s}")
    for label in budgets:
        old, new = runs[(label, "old")], runs[(label, "new")]
        ratios = [n.tok_s / o.tok_s for n, o in zip(new, old, strict=True)]

        def tps(ss: list[Sample]) -> str:
            xs = [s.tok_s for s in ss]
            return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"

        same = all(s.ids == old[0].ids for s in old + new)
        print(f"{label:>6s} {tps(old):>22s} {tps(new):>22s} "
              f"{f'{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})':>20s} "
              f"{f'{old[0].handed}/{old[0].layers}':>11s} "
              f"{f'{new[0].handed}/{new[0].layers}':>11s} "
              f"{statistics.median(s.layer_us for s in old):13.0f} "
              f"{statistics.median(s.layer_us for s in new):13.0f} {'yes' if same else 'NO':>5s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--budgets", default="100%,50%")
    ap.add_argument("--policy", default="fifo")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print_machine(f"policy {args.policy}, {BITS} bits, {args.tokens} tokens")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        quantize_checkpoint(tiny_dir(), path, QuantLayout(), progress=False)
        store = StoreReader(path, direct=True)
        model, spec = load_tiny()
        runs = measure(args, model, spec, store, list(encode(PROMPT)))
    report(runs, split_list(args.budgets, "budgets", example="--budgets 25%,50%"))
    print(f"end {time.strftime('%H:%M:%S UTC', time.gmtime())}, load average {load_average()}")


if __name__ == "__main__":
    main()
