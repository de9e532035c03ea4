"""`d2moe quantize`'s compute: a spec's expert matrices quantized into nested planes a block
of rows at a time (`quant.nested.quantize_matrix`, since 2026-11-24) against the same
quantizer on the whole matrix in one piece (the code before; the baseline, same run) and
against RTN copies at every width b1..bK (what a Matryoshka-Free store quantizes instead).

Per format and matrix shape: the median of `--repeats` timings (the variants alternate,
which goes first alternating too), M weights/s, the ratios one-piece / blocked and
rtn-copies / blocked, whether blocked and one-piece give the same bytes, and each variant's
peak of allocated bytes (tracemalloc, in a separate untimed pass). Then the quantizer
compute a whole model's experts would take at the blocked rate: derived from the rates
measured here (weights / rate), reading the checkpoint and writing the store not included.

`--checkpoint-experts N` (default 2; 0 skips it) times `d2moe quantize` end to end, with
`--jobs 1` (one expert at a time: the baseline) and with its default (an expert per core)
(`quant.cmd.quantize_checkpoint`: safetensors reads, bf16 -> float32, quantizing, the store's
atomic writes and checksums) on a random-weight bf16 checkpoint of one layer of N experts
of the spec's shapes with Mixtral's tensor names, written to the cache directory first (so
its reads come from the page cache: a checkpoint cold on disk reads slower), against the I/O
alone in the same run: the same tensor reads and a file of the store's size written and
fsynced.

Usage: python benchmarks/quantize.py [--spec mixtral-8x7b] [--formats bitplane,mwq]
                                     [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from d2moe.core.cliargs import split_list  # noqa: E402
from d2moe.core.sizes import QuantLayout  # noqa: E402
from d2moe.core.spec import ModelSpec, load_spec  # noqa: E402
from d2moe.executor.setup import cache_dir  # noqa: E402
from d2moe.quant.bitplane import quantize_bitplane  # noqa: E402
from d2moe.quant.cmd import (  # noqa: E402
    check_jobs,
    find_expert_tensors,
    load_tensor,
    quantize_checkpoint,
)
from d2moe.quant.mwq import quantize_mwq  # noqa: E402
from d2moe.quant.nested import NestedMatrix, quantize_matrix  # noqa: E402
from d2moe.quant.rtn import quantize_rtn  # noqa: E402

Variant = Callable[[np.ndarray], object]


def variants(layout: QuantLayout) -> dict[str, Variant]:
    """blocked (the code now), one-piece (before) and RTN copies, for `layout`."""
    b1, bK, g = layout.b1, layout.bK, layout.group
    whole = {"bitplane": lambda w: quantize_bitplane(w, b1=b1, bK=bK, group=g),
             "mwq": lambda w: quantize_mwq(w, b1=b1, bK=bK, group=g)}[layout.kind]
    return {"blocked": lambda w: quantize_matrix(w, layout),
            "one-piece": whole,
            "rtn-copies": lambda w: [quantize_rtn(w, bits=b, group=g) for b in range(b1, bK + 1)]}


def time_variants(w: np.ndarray, runs: dict[str, Variant], repeats: int) -> dict[str, float]:
    """Median seconds per variant over `repeats` rounds, the order rotating each round."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            runs[n](w)
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def peak_bytes(w: np.ndarray, run: Variant) -> int:
    """Peak bytes allocated while `run(w)` runs (numpy reports its arrays to tracemalloc)."""
    tracemalloc.start()
    try:
        run(w)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def same_bytes(a: NestedMatrix, b: NestedMatrix) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k))
               for k in ("planes", "scale", "zero", "plane_scale"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="mixtral-8x7b", help="model spec of the expert shapes")
    ap.add_argument("--formats", default="bitplane,mwq")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint-experts", type=int, default=2,
                    help="experts of the end-to-end checkpoint (0: skip it)")
    args = ap.parse_args()
    spec = load_spec(args.spec)
    shapes = sorted(set(spec.expert_shapes))
    rng = np.random.default_rng(0)
    print(f"{spec.name} expert matrices {', '.join(f'{r}x{c}' for r, c in shapes)}, float32 "
          f"N(0, 0.02) weights, b1=2 bK=8 group 64, median of {args.repeats}; start "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", flush=True)
    header = (f"{'format':9} {'matrix':>11} {'blocked ms':>10} {'M w/s':>6} "
              f"{'one-piece ms':>12} {'x':>5} {'rtn-copies ms':>13} {'x':>5} {'same':>4} "
              f"{'peak MiB (blocked / one-piece)':>30}")
    print(header + "\n" + "-" * len(header))
    rate: dict[str, dict[tuple[int, int], float]] = {}
    for kind in split_list(args.formats, "formats", example="--formats bitplane,mwq"):
        layout = QuantLayout(kind=kind)
        runs = variants(layout)
        for rows, cols in shapes:
            w = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02)
            t = time_variants(w, runs, args.repeats)
            same = same_bytes(runs["blocked"](w), runs["one-piece"](w))  # type: ignore[arg-type]
            peaks = [peak_bytes(w, runs[n]) / 2**20 for n in ("blocked", "one-piece")]
            rate.setdefault(kind, {})[(rows, cols)] = w.size / t["blocked"]
            print(f"{kind:9} {f'{rows}x{cols}':>11} {t['blocked'] * 1e3:10.1f} "
                  f"{w.size / t['blocked'] / 1e6:6.1f} {t['one-piece'] * 1e3:12.1f} "
                  f"{t['one-piece'] / t['blocked']:5.2f} {t['rtn-copies'] * 1e3:13.1f} "
                  f"{t['rtn-copies'] / t['blocked']:5.2f} {'yes' if same else 'NO':>4} "
                  f"{f'{peaks[0]:.1f} / {peaks[1]:.1f}':>30}", flush=True)
    weights = spec.layers * spec.experts * sum(r * c for r, c in spec.expert_shapes)
    for kind, rates in rate.items():
        seconds = spec.layers * spec.experts * sum(r * c / rates[(r, c)]
                                                   for r, c in spec.expert_shapes)
        print(f"{spec.name}'s experts ({weights / 1e9:.1f} G weights) in {kind} at the blocked "
              f"rates above: ~{seconds / 60:.1f} min of quantizer compute on one core "
              "(derived, not timed; reads and writes not included)")
    if args.checkpoint_experts > 0:
        end_to_end(spec, args.checkpoint_experts, args.formats)


def write_checkpoint(model_dir: Path, spec: ModelSpec, experts: int) -> int:
    """A random bf16 HF checkpoint (Mixtral names) of one layer of `experts` experts of
    `spec`'s shapes; returns its expert weight count."""
    import torch
    from safetensors.torch import save_file

    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "mixtral", "num_hidden_layers": 1, "hidden_size": spec.hidden,
        "intermediate_size": spec.ffn, "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads, "vocab_size": spec.vocab,
        "num_local_experts": experts, "num_experts_per_tok": min(spec.top_k, experts)}))
    gen = torch.Generator().manual_seed(0)
    count = 0
    for e in range(experts):
        tensors = {}
        for t, (rows, cols) in zip(("w1", "w3", "w2"), spec.expert_shapes, strict=True):
            tensors[f"model.layers.0.block_sparse_moe.experts.{e}.{t}.weight"] = (
                torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16)
            count += rows * cols
        save_file(tensors, str(model_dir / f"model-{e:05d}.safetensors"))
    return count


def io_only(model_dir: Path, out: Path, nbytes: int) -> None:
    """The end-to-end run's I/O without the quantizer: every expert tensor read as float32,
    then `nbytes` (the store's size) written in 4 MiB pieces and fsynced."""
    for path, name in find_expert_tensors(model_dir).values():
        load_tensor(path, name)
    chunk = bytes(4 << 20)
    with open(out, "wb") as f:
        for start in range(0, nbytes, len(chunk)):
            f.write(chunk[:min(len(chunk), nbytes - start)])
        f.flush()
        os.fsync(f.fileno())
    out.unlink()


def end_to_end(spec: ModelSpec, experts: int, formats: str) -> None:
    """`d2moe quantize` on a written checkpoint against its I/O alone (module docstring)."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quantize-bench-", dir=root) as tmp:
        model_dir = Path(tmp) / "checkpoint"
        weights = write_checkpoint(model_dir, spec, experts)
        print(f"\nend to end: one layer of {experts} {spec.name} experts ({weights / 1e9:.2f} G "
              "weights, bf16 safetensors in the page cache), one run each")
        for kind in split_list(formats, "formats", example="--formats bitplane,mwq"):
            store = Path(tmp) / f"store-{kind}"
            seconds = {}
            for jobs in (1, 0):  # one expert at a time (the baseline), then --jobs' default
                t0 = time.perf_counter()
                quantize_checkpoint(model_dir, store, QuantLayout(kind=kind), progress=False,
                                    jobs=jobs)
                seconds[jobs] = time.perf_counter() - t0
                nbytes = sum(p.stat().st_size for p in store.iterdir() if p.is_file())
                shutil.rmtree(store)
            t0 = time.perf_counter()
            io_only(model_dir, Path(tmp) / "io-only.bin", nbytes)
            io_s = time.perf_counter() - t0
            total = spec.layers * spec.experts * sum(r * c for r, c in spec.expert_shapes)
            for jobs, quantize_s in seconds.items():
                rate, minutes = weights / quantize_s / 1e6, total / weights * quantize_s / 60
                print(f"{kind:9} --jobs {jobs or check_jobs(0)}: d2moe quantize "
                      f"{quantize_s:6.1f} s ({rate:.0f} M weights/s, "
                      f"{seconds[1] / quantize_s:.2f}x --jobs 1; store {nbytes / 2**30:.2f} GiB); "
                      f"I/O alone {io_s:5.1f} s ({io_s / quantize_s:.0%} of it); "
                      f"{total / 1e9:.1f} G weights of {spec.name}'s experts at this rate: "
                      f"~{minutes:.0f} min (derived)")

if __name__ == "__main__":
    main()
