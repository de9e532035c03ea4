"""Where an O_DIRECT read lands: a page-aligned slice of a heap array (the store reader now)
against a fresh anonymous mapping per read (before 2026-11-23 11:37 UTC; the baseline,
measured in the same rounds).

Times the I/O lane's whole load of one expert from 0 to `--bits` bits (every level's read,
checksum, conversion, placement in the pool: `profiles.load_probes.load_into`) on a
random-weight nested store of the spec's shape (two experts, O_DIRECT), the two buffer kinds
alternating, which goes first alternating too. A fresh mapping pays a page fault per 4 KiB as
the read fills it and an unmap when freed; the heap reuses pages it already holds. Prints
the median load of each and the median of the per-round ratios mapping / heap.

Usage: python benchmarks/read_buffers.py [--spec mixtral-8x7b] [--rounds 8] [--bits 4]
                                        [--device cuda]
The Mixtral-shaped store takes about 0.36 GB of disk under the d2moe cache directory while
it runs (removed afterwards).
"""

from __future__ import annotations

import argparse
import dataclasses
import mmap
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from decode_ab import print_machine

import d2moe.quant.store as store_mod
from d2moe.core.jobs import ExpertKey, Load
from d2moe.core.sizes import QuantLayout, all_experts_bytes
from d2moe.core.spec import load_spec
from d2moe.executor.pool import ExpertPool
from d2moe.executor.setup import cache_dir
from d2moe.profiles.load_probes import drop_expert, load_into
from d2moe.profiles.probe_store import write_random_store
from d2moe.quant.store import StoreReader

BUFFERS = {"heap": store_mod.aligned_buffer,
           "mapping": lambda nbytes: mmap.mmap(-1, nbytes)}  # page aligned, fresh each read


def alternate_loads(spec_name: str, bits: int, rounds: int, device: torch.device,
                    variants: dict[str, Callable[[StoreReader, ExpertPool], None]]
                    ) -> dict[str, list[float]]:
    """ms of the I/O lane's whole 0->`bits` load of one expert per round and variant (a
    variant sets the reader and the pool up before its load), on a random-weight store of
    `spec_name`'s expert shape (one expert per variant, O_DIRECT); the variants alternate,
    which goes first alternating too; round 0 warms up and is dropped."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    layout = QuantLayout()
    spec = dataclasses.replace(load_spec(spec_name), layers=1, experts=len(variants), top_k=1)
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="read-buffers-", dir=root) as tmp:
        reader = StoreReader(write_random_store(Path(tmp) / "store", spec, layout), direct=True)
        pool = ExpertPool(spec, layout, all_experts_bytes(spec, bits, layout), device)
        keys = [ExpertKey(0, e) for e in range(spec.experts)]
        times: dict[str, list[float]] = {k: [] for k in variants}
        try:
            for r in range(rounds + 1):
                order = list(variants) if r % 2 else list(variants)[::-1]
                for k, kind in enumerate(order):
                    key = keys[k]
                    drop_expert(pool, key)
                    variants[kind](reader, pool)
                    sync()
                    t0 = time.perf_counter()
                    load_into(reader, pool, Load(key, 0, bits))
                    sync()
                    if r:
                        times[kind].append((time.perf_counter() - t0) * 1e3)
        finally:
            reader.close()
    return times


def print_times(times: dict[str, list[float]], baseline: str, new: str) -> None:
    """Each variant's median and range, and the median per-round ratio baseline / new."""
    for kind, ms in times.items():
        print(f"{kind:>8}: median {statistics.median(ms):8.2f} ms "
              f"(min {min(ms):.2f}, max {max(ms):.2f})")
    ratios = [a / b for a, b in zip(times[baseline], times[new], strict=True)]
    print(f"{baseline} / {new}, median of {len(ratios)} rounds: "
          f"{statistics.median(ratios):.2f}x")


def load_ab_args(doc: str, rounds: int, modes: dict[str, str] | None = None
                 ) -> argparse.Namespace:
    """The options of a whole-load A/B (`alternate_loads`: spec, rounds, bits, device),
    parsed; one torch thread set and the machine line printed. `modes`: a script's other
    modes (flag: help), which it dispatches before this parser, listed in `--help`."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    for flag, text in (modes or {}).items():
        ap.add_argument(flag, action="store_true", help=text)
    ap.add_argument("--spec", default="tiny", help="shipped spec name or YAML")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="the pool's device: cpu or cuda")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.exit(2, f"read_buffers.py --device {args.device}: torch sees no CUDA device "
                   "(fix: --device cpu)\n")
    torch.set_num_threads(1)
    print_machine(f"{args.spec} expert shape, 0->{args.bits} bit loads into a {args.device} "
                  f"pool, {args.rounds} rounds")
    return args


def main() -> None:
    args = load_ab_args(__doc__, 12)

    def use(kind: str) -> Callable[[StoreReader, ExpertPool], None]:
        return lambda reader, pool: setattr(store_mod, "aligned_buffer", BUFFERS[kind])

    try:
        times = alternate_loads(args.spec, args.bits, args.rounds, torch.device(args.device),
                                {kind: use(kind) for kind in BUFFERS})
    finally:
        store_mod.aligned_buffer = BUFFERS["heap"]
    print_times(times, "mapping", "heap")


if __name__ == "__main__":
    main()
