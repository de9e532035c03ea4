"""`--dtype`: the tiny model's non-expert weights, activations and KV cache in bfloat16 or
float16 against float32 (the baseline, measured in the same run), its experts streamed at
4 bits from a nested store (O_DIRECT), HEBF, on the CPU. Per repeat and budget the dtypes
run back to back, rotating which goes first. Prints the resident non-expert bytes and the
decode tok/s (median, min-max) of each, and the median of the per-repeat ratios to float32.

Usage: python benchmarks/dtype.py [--repeats 6] [--budgets 100%,50%] [--tokens 64]
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from d2moe.core.cliargs import DTYPES
from d2moe.core.sizes import QuantLayout, all_experts_bytes
from d2moe.model.load import load_tiny, tiny_dir
from d2moe.model.tokenizer import encode
from d2moe.quant.cmd import quantize_checkpoint
from d2moe.quant.store import StoreReader

sys.path.insert(0, str(Path(__file__).parent))
from decode_ab import (  # noqa: E402
    BITS,
    PROMPT,
    decode_tok_s,
    load_average,
    parse_common,
    print_machine,
)


def main() -> None:
    args, budgets = parse_common(__doc__, repeats=6, budgets="100%,50%")
    print_machine(f"HEBF, {BITS} bits, {args.tokens} tokens, dtypes {', '.join(DTYPES)}")
    runs: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        quantize_checkpoint(tiny_dir(), path, QuantLayout(), progress=False)
        store = StoreReader(path, direct=True)
        models = {d: load_tiny(dtype=getattr(torch, d), with_experts=False) for d in DTYPES}
        resident = {d: sum(p.numel() * p.element_size() for p in m.parameters())
                    for d, (m, _) in models.items()}
        spec = models[DTYPES[0]][1]
        prompt = list(encode(PROMPT))
        total = all_experts_bytes(spec, BITS, store.layout)
        with torch.inference_mode():
            for r in range(args.repeats):
                order = DTYPES[r % len(DTYPES):] + DTYPES[:r % len(DTYPES)]
                for label in budgets:
                    nbytes = int(float(label.rstrip("%")) / 100 * total)
                    for d in order:
                        runs.setdefault((label, d), []).append(decode_tok_s(
                            models[d][0], spec, store, nbytes, prompt, args.tokens,
                            lambda _pool: contextlib.nullcontext()))
        store.close()
    print(f"end {time.strftime('%H:%M:%S UTC', time.gmtime())}, load average {load_average()}")
    base = DTYPES[0]
    print("\nresident non-expert bytes: " + ", ".join(
        f"{d} {resident[d]:,} ({resident[d] / resident[base]:.2f}x)" for d in DTYPES))
    print(f"\n{'budget':>6s} {'dtype':>9s} {'decode tok/s':>22s} {f'x {base} (per repeat)':>26s}")
    for label in budgets:
        for d in DTYPES:
            xs = runs[(label, d)]
            rs = [x / b for x, b in zip(xs, runs[(label, base)], strict=True)]
            print(f"{label:>6s} {d:>9s} "
                  f"{f'{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})':>22s} "
                  f"{f'{statistics.median(rs):.3f} ({min(rs):.3f}-{max(rs):.3f})':>26s}")


if __name__ == "__main__":
    main()
