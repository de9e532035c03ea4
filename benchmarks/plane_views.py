"""The CUDA pool's kernel inputs: planes addressed where their level blocks lie (now) against
gathering them into one tensor per matrix first (`torch.stack`, what the pool did on every
expert run until 2026-11-23), both timed in the same run.

Per Mixtral-8x7B / LLaMA-MoE-3.5B expert matrix shape and bit-width: the planes and plane
scales of one matrix are placed at separate, shuffled places of one arena buffer (as the
pool's level blocks are), then one token's product is timed both ways (CUDA graphs off,
`triton.testing.do_bench`), and the ratio stacked / in place printed. The outputs are
checked equal first. Needs CUDA (the interpreter's timings mean nothing).

Usage: python benchmarks/plane_views.py [--bits 2,4,8] [--kinds bitplane,mwq]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d2moe.core.cliargs import split_list  # noqa: E402
from d2moe.core.sizes import QuantLayout  # noqa: E402
from d2moe.kernels.packed import PackedExpertMatrix  # noqa: E402
from d2moe.kernels.triton_launch import nested_matmul  # noqa: E402
from d2moe.profiles.probe_store import random_matrix  # noqa: E402

SHAPES = {"mixtral-8x7b w1": (14336, 4096), "mixtral-8x7b w2": (4096, 14336),
          "llama-moe-3.5b w1": (1376, 4096), "llama-moe-3.5b w2": (4096, 1376)}


def scattered(p: PackedExpertMatrix, rng: np.random.Generator) -> PackedExpertMatrix:
    """p's planes and plane scales copied to shuffled 256-byte-aligned slots of one buffer."""
    parts = [p.planes[j] for j in range(p.bits_held)] + list(p.plane_scale)
    slot = max(t.numel() * t.element_size() for t in parts) + 256
    slot = -(-slot // 256) * 256
    arena = torch.empty(slot * len(parts), dtype=torch.uint8, device=p.device)
    views = []
    for t, k in zip(parts, rng.permutation(len(parts)).tolist(), strict=True):
        raw = arena[k * slot:k * slot + t.numel() * t.element_size()]
        v = raw.view(t.dtype).view(t.shape)
        v.copy_(t)
        views.append(v)
    n = p.bits_held
    return PackedExpertMatrix(kind=p.kind, b1=p.b1, bK=p.bK, group=p.group, rows=p.rows,
                              cols=p.cols, planes=tuple(views[:n]), scale=p.scale,
                              zero=p.zero, plane_scale=tuple(views[n:]))


def stacked(p: PackedExpertMatrix, bits: int) -> PackedExpertMatrix:
    """What the pool built per run before: the planes gathered into one tensor."""
    n_ps = bits - p.b1 if p.kind == "mwq" else 0
    ps = (torch.stack([p.plane_scale[i] for i in range(n_ps)]) if n_ps else
          torch.zeros(0, p.groups, p.rows, dtype=torch.float16, device=p.device))
    return PackedExpertMatrix(kind=p.kind, b1=p.b1, bK=p.bK, group=p.group, rows=p.rows,
                              cols=p.cols, planes=torch.stack([p.planes[j] for j in range(bits)]),
                              scale=p.scale, zero=p.zero, plane_scale=ps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="2,4,8")
    ap.add_argument("--kinds", default="bitplane")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("plane_views.py needs CUDA: it times the kernels on a GPU")
    from triton.testing import do_bench

    dev = torch.device("cuda")
    rng = np.random.default_rng(0)
    print(f"{torch.cuda.get_device_name(dev)}; torch {torch.__version__}; one token, fp16")
    print("| shape | kind | bits | in place us | stack + kernel us | stacked / in place |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for kind in split_list(args.kinds, "kinds", example="--kinds bitplane,mwq"):
        for name, (rows, cols) in SHAPES.items():
            m = random_matrix(rng, rows, cols, QuantLayout(kind=kind, b1=2, bK=8))
            q = scattered(PackedExpertMatrix.from_nested(m, device=dev), rng)
            x = torch.randn(1, cols, device=dev, dtype=torch.float16)
            for bits in (int(b) for b in split_list(args.bits, "bits", example="--bits 2,4")):
                a = nested_matmul(x, q, bits)
                b = nested_matmul(x, stacked(q, bits), bits)
                # not bit for bit: the one-token launch splits each sum across programs
                # whose fp32 partials meet in atomic adds, in an order that varies per launch
                # (a wrong plane or scale errs by > 1e-2)
                err = float((a.double() - b.double()).norm() / b.double().norm())
                if err > 1e-3:
                    sys.exit(f"outputs differ: {name} {kind} {bits} bits (relative {err:.1e})")
                here = do_bench(lambda q=q, x=x, b=bits: nested_matmul(x, q, b))
                stack = do_bench(lambda q=q, x=x, b=bits: nested_matmul(x, stacked(q, b), b))
                ratios.append(stack / here)
                print(f"| {name} | {kind} | {bits} | {here * 1e3:.1f} | {stack * 1e3:.1f} | "
                      f"{stack / here:.2f}x |", flush=True)
    geo = float(np.exp(np.mean(np.log(ratios))))
    print(f"geomean stacked / in place: {geo:.2f}x over {len(ratios)} cases")


if __name__ == "__main__":
    main()
