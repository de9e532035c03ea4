"""Real executor throughput: decode tokens/s of the tiny model with experts streamed from a
nested store (O_DIRECT) under budgets of 25%, 50% and 100% of all experts at 4 bits, FIFO
against HEBF; baseline measured in the same run: the same model with every expert resident
as dense weights dequantized at 4 bits (no I/O, no dequantization per run).

Usage: python benchmarks/executor.py [--tokens N] [--device cpu|cuda]
(The random-weight Mixtral-shaped model of issue 5 is not in this benchmark yet.)
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

from d2moe.analysis import compute_metrics
from d2moe.core.sizes import QuantLayout, all_experts_bytes
from d2moe.eval.ppl import dense_backend, store_matrices
from d2moe.executor.backend import StreamingExperts
from d2moe.executor.pool import ExpertPool
from d2moe.model.generate import generate
from d2moe.model.load import load_tiny, tiny_dir
from d2moe.model.tokenizer import encode
from d2moe.policies import make_policy
from d2moe.quant.cmd import quantize_checkpoint
from d2moe.quant.reference import dequantize
from d2moe.quant.store import StoreReader

BITS = 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    prompt = list(encode("def fib(n):\n    return"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        quantize_checkpoint(tiny_dir(), path, QuantLayout(), progress=False)
        store = StoreReader(path, direct=True)
        model, spec = load_tiny()
        nested = store_matrices(store)
        dense = dense_backend(spec, lambda key: dequantize(nested[key], BITS))
        model.to(device)
        dense.to(device)
        ref = generate(model, prompt, args.tokens, backend=dense)
        print(f"machine: {platform.machine()} {torch.get_num_threads()} threads, device {device}, "
              f"torch {torch.__version__}; tiny model, {args.tokens} tokens at {BITS} bits; "
              f"O_DIRECT {'on' if store.direct_io else 'off'}")
        print(f"{'policy':8s} {'budget':>7s} {'tok/s':>7s} {'vs resident':>12s} {'hit %':>6s} "
              f"{'loaded KiB':>11s} {'stall ms':>9s} {'same tokens':>12s}")
        print(f"{'resident':8s} {'-':>7s} {ref.decode_tokens_per_s:7.1f} {1.0:11.2f}x")
        total = all_experts_bytes(spec, BITS, store.layout)
        for frac in (0.25, 0.5, 1.0):
            for name in ("fifo", "hebf"):
                pool = ExpertPool(spec, store.layout, int(frac * total), device)
                backend = StreamingExperts(store, make_policy(name), pool, bits=BITS)
                gen = generate(model, prompt, args.tokens, backend=backend)
                m = compute_metrics(backend.finish())
                tps = gen.decode_tokens_per_s
                print(f"{name:8s} {frac:7.0%} {tps:7.1f} {tps / ref.decode_tokens_per_s:11.2f}x "
                      f"{100 * m.hit_rate:6.1f} {m.bytes_loaded / 1024:11.1f} "
                      f"{m.exposed_io_us / 1e3:9.1f} "
                      f"{'yes' if gen.new_ids == ref.new_ids else 'NO':>12s}")


if __name__ == "__main__":
    main()
