"""Real executor on a random-weight model with Mixtral-8x7B shapes (4 layers by default):
decode tokens/s at 4 bits under budgets of 25%, 50% and 100% of all experts, FIFO against
HEBF. Reference in the same run: the 100% budget's decode steps, which find every expert the
prefill touched already resident.

The store holds random bit planes (bitplane layout, b1=2..bK=4) with small positive scales,
written directly (quantizing 5.6 billion random floats would only cost time); attention and
embeddings are random too. Tokens are meaningless; timings and the schedule are real.
Disk: about 0.8 GB per layer. On the 2-core CPU VM an expert run (~176M weights
dequantized in cache-sized row chunks by the torch fallback) takes ~0.3-0.5 s on one thread,
about as long as loading it (88 MiB at ~0.66 GB/s, plus checksums); on a GPU the I/O lane
dominates. `benchmarks/executor.py` runs this model and the tiny one in one run, against a
fully resident reference, and imports `random_store` from here.

Usage: python benchmarks/executor_mixtral.py [--layers 4] [--tokens 4] [--device cuda]
                                             [--store DIR (kept and reused)]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from d2moe.analysis import compute_metrics
from d2moe.core.sizes import QuantLayout, all_experts_bytes
from d2moe.core.spec import load_spec
from d2moe.executor.backend import StreamingExperts
from d2moe.executor.pool import ExpertPool
from d2moe.model.generate import generate
from d2moe.model.transformer import Transformer
from d2moe.policies import make_policy
from d2moe.quant.nested import NestedMatrix
from d2moe.quant.store import StoreReader, StoreWriter, tensor_shapes

BITS = 4
LAYOUT = QuantLayout(kind="bitplane", b1=2, bK=4)


def random_store(path: Path, spec, seed: int = 0) -> Path:
    """A nested store of random bit planes for every expert of `spec`."""
    rng = np.random.default_rng(seed)
    writer = StoreWriter(path, spec, LAYOUT)
    shapes = tensor_shapes(spec)

    def matrix(rows: int, cols: int) -> NestedMatrix:
        groups = -(-cols // LAYOUT.group)
        scale = np.full((rows, groups), 2e-3, np.float16)  # codes 0..15 -> weights of ~1e-2
        zero = (-scale.astype(np.float32) * (2 ** LAYOUT.bK - 1) / 2).astype(np.float16)
        planes = rng.integers(0, 256, (LAYOUT.bK, -(-rows * cols // 8)), dtype=np.uint8)
        return NestedMatrix(kind=LAYOUT.kind, b1=LAYOUT.b1, bK=LAYOUT.bK, group=LAYOUT.group,
                            rows=rows, cols=cols, planes=planes, scale=scale, zero=zero,
                            plane_scale=np.zeros((0, rows, groups), np.float16))

    for layer in range(spec.layers):
        writer.write_layer(layer, ((e, {t: matrix(*shapes[t]) for t in shapes})
                                   for e in range(spec.experts)))
        print(f"  wrote layer {layer + 1}/{spec.layers}", flush=True)
    writer.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=4, help="new tokens per run")
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--store", default="", help="directory to keep (and reuse) the store in")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.exit(2, f"executor_mixtral.py --device {args.device}: torch sees no CUDA device "
                   "(fix: --device cpu)\n")
    spec = dataclasses.replace(load_spec("mixtral-8x7b"), layers=args.layers)
    device = torch.device(args.device)
    tmp = None
    if args.store:
        path = Path(args.store)
    else:
        tmp = tempfile.TemporaryDirectory()
        path = Path(tmp.name) / "store"
    if not (path / "index.json").is_file():
        print(f"writing a random {spec.layers}-layer Mixtral-shaped store to {path}")
        random_store(path, spec)
    store = StoreReader(path, direct=True)
    model = Transformer(spec, with_experts=False)
    model.init_weights(seed=0)
    model.to(device)
    prompt = list(range(1, args.prompt_tokens + 1))
    total = all_experts_bytes(spec, BITS, LAYOUT)
    print(f"machine: {platform.machine()} {torch.get_num_threads()} threads, device {device}, "
          f"torch {torch.__version__}; {spec.layers} Mixtral-8x7B-shaped layers, {BITS} bits, "
          f"{args.prompt_tokens}-token prompt, {args.tokens} new tokens; O_DIRECT "
          f"{'on' if store.direct_io else 'off'}; all experts {total / 2**30:.2f} GiB")
    print(f"{'policy':8s} {'budget':>7s} {'decode tok/s':>13s} {'vs 100% fifo':>13s} "
          f"{'hit %':>6s} {'loaded GiB':>11s} {'stall s':>8s}")
    rows = []
    for frac in (1.0, 0.5, 0.25):
        for name in ("fifo", "hebf"):
            pool = ExpertPool(spec, LAYOUT, int(frac * total), device)
            backend = StreamingExperts(store, make_policy(name), pool, bits=BITS)
            gen = generate(model, prompt, args.tokens, backend=backend)
            m = compute_metrics(backend.finish())
            rows.append((name, frac, gen.decode_tokens_per_s, m))
            ref = rows[0][2]
            print(f"{name:8s} {frac:7.0%} {gen.decode_tokens_per_s:13.3f} "
                  f"{gen.decode_tokens_per_s / ref:12.2f}x {100 * m.hit_rate:6.1f} "
                  f"{m.bytes_loaded / 2**30:11.2f} {m.exposed_io_us / 1e6:8.2f}", flush=True)
            del pool, backend
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
