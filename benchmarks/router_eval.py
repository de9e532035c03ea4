"""Perplexity against average bits of the token-adaptive bit-width router (issue #7).

For V1 (bits 2,3,4, capacities 0.3/0.4/0.3), V2 (bits 5..8, 0.25 each) and V1 with no
capacity limit (1,1,1: alpha alone sets the average bits), train a router per alpha (the code
of `d2moe router train`), score it on the held-out split (the code of `d2moe eval ppl
--router`), and compare with every uniform width and with random allocation at the router's
measured per-layer shares (the same average bits). Writes a markdown report.

    python benchmarks/router_eval.py --steps 200 --heldout-kib 64 --out docs/results/router.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import torch

from d2moe.core.cliargs import split_list
from d2moe.core.fileio import atomic_write
from d2moe.eval.ppl import heldout_ids
from d2moe.model.load import load_tiny
from d2moe.router.capacity import parse_bits, parse_floats
from d2moe.router.evaluate import random_ppl, routed_ppl, uniform_ppl
from d2moe.router.experts import WidthWeights
from d2moe.router.gate import BitGate, BitRouter
from d2moe.router.store import load_router
from d2moe.router.train import RouterTrainConfig, open_store, train_router

CONFIGS = {  # name: (bits, capacities, alphas, gate width, granularity)
    "V1": ("2,3,4", "0.3,0.4,0.3", (0.0, 0.003, 0.01), 0, "token"),
    "V1-free": ("2,3,4", "1,1,1", (0.003, 0.01, 0.03), 0, "token"),
    "V2": ("5,6,7,8", "0.25,0.25,0.25,0.25", (0.0, 0.01), 0, "token"),
    "V1-hi": ("2,3,4", "0.3,0.4,0.3", (0.03, 0.1), 0, "token"),
    "V1-mlp": ("2,3,4", "0.3,0.4,0.3", (0.01, 0.03), 64, "token"),
    "V1-slot": ("2,3,4", "0.3,0.4,0.3", (0.0, 0.01, 0.03), 0, "slot"),
    "V1-slot-free": ("2,3,4", "1,1,1", (0.003, 0.01, 0.03), 0, "slot"),
    "V2-slot": ("5,6,7,8", "0.25,0.25,0.25,0.25", (0.0, 0.01), 0, "slot"),
    "smoke": ("2,3", "0.5,0.5", (0.01,), 0, "slot"),
}


def uniform_at(avg: float, uniform: dict[int, float]) -> float:
    """Uniform perplexity linearly interpolated between the neighbouring integer widths."""
    lo = max(b for b in uniform if b <= avg + 1e-9)
    hi = min(b for b in uniform if b >= avg - 1e-9)
    if lo == hi:
        return uniform[lo]
    f = (avg - lo) / (hi - lo)
    return (1 - f) * uniform[lo] + f * uniform[hi]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--heldout-kib", type=int, default=64)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--work", default="out/router_eval", help="where the routers are written")
    ap.add_argument("--out", default="docs/results/router.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    model, spec = load_tiny()
    ids = heldout_ids("tiny", spec, args.heldout_kib)
    reader, store_path = open_store("tiny", "")
    sections = []
    for name in split_list(args.configs, "configs", example="--configs " + next(iter(CONFIGS))):
        bits_s, caps_s, alphas, gate_width, granularity = CONFIGS[name]
        bits = parse_bits(bits_s)
        weights = WidthWeights.from_store(reader, bits)
        uni = {b: uniform_ppl(model, ids, weights, k).ppl for k, b in enumerate(bits)}
        order = weight_order_ppl(model, spec, ids, weights, caps_s) if granularity == "slot" \
            else None
        rows = []
        for alpha in alphas:
            out = Path(args.work) / f"{name}-a{alpha:g}"
            lr = 0.003 if gate_width else 0.01
            t0 = time.perf_counter()
            res = train_router(RouterTrainConfig(bits=bits_s, capacity=caps_s, alpha=alpha,
                                                 steps=args.steps, out=str(out), lr=lr,
                                                 gate_width=gate_width, progress=False,
                                                 granularity=granularity))
            router = load_router(out, spec=spec, store_bits=(reader.layout.b1,
                                                             reader.bits_stored))
            mine = routed_ppl(model, ids, weights, router, f"router a={alpha:g}")
            rnd = [random_ppl(model, ids, weights, mine.shares, seed=s,
                              per_slot=granularity == "slot").ppl
                   for s in range(args.random_seeds)]
            rows.append((alpha, mine, rnd, res.seconds, time.perf_counter() - t0))
            print(f"{name} alpha={alpha:g}: router {mine.ppl:.4f} at {mine.avg_bits:.3f} bits, "
                  f"random {sum(rnd) / len(rnd):.4f}, uniform {uniform_at(mine.avg_bits, uni):.4f}"
                  f" ({res.seconds:.0f} s training)", flush=True)
        label = f"{name} (per {granularity}" + (f", MLP gate width {gate_width}, lr 0.003"
                                                 if gate_width else "") + ")"
        sections.append((label, bits, caps_s, uni, rows, order))
    reader.close()
    total = time.perf_counter() - t_start
    text = render(sections, args, total, len(ids))
    with atomic_write(Path(args.out)) as f:
        f.write(text)
    print(f"wrote {args.out} ({total:.0f} s)")
    return 0


def weight_order_ppl(model: torch.nn.Module, spec: object, ids: list[int],
                     weights: WidthWeights, caps_s: str) -> object:
    """Perplexity of the per-slot gate's starting point: no hidden-state term, the slots
    ordered by router weight alone (the ablation the trained gate must beat)."""
    gate = BitGate(spec.layers, spec.hidden, len(weights.bits), slots=spec.top_k)
    with torch.no_grad():
        for p in gate.proj.parameters():
            p.zero_()
    caps = parse_floats(caps_s, "capacity")
    return routed_ppl(model, ids, weights, BitRouter(gate, weights.bits, caps), "weight order")


def render(sections: list, args: argparse.Namespace, total: float, n_ids: int) -> str:
    """The markdown report."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = " ".join(["python benchmarks/router_eval.py", *sys.argv[1:]])
    lines = [
        "# The bit-width router: perplexity against average bits (measured)", "",
        f"- Measured: {now} on {platform.node()} ({platform.machine()}, {os.cpu_count()} "
        f"CPU cores shared with other jobs, 1 torch thread, float32; torch {torch.__version__},"
        f" Python {sys.version.split()[0]}); {total / 60:.1f} min in all.",
        f"- Command: `{cmd}`",
        f"- Model: the shipped tiny model (4 layers, 8 experts top-2); experts from the cached "
        f"bitplane store (b1=2, bK=8, groups of 64). Held-out: the first {args.heldout_kib} KiB "
        f"of the held-out split ({n_ids:,d} bytes, windows of 256, 16 windows = 4,080 tokens "
        "per forward: the capacity batch).",
        f"- Router: linear gate per layer (per token or per slot: the section says), "
        "straight-through, distillation target, "
        f"{args.steps} steps of 8 x 128 tokens, Adam lr 0.01, seed 0 (the other settings: "
        "`d2moe router train` defaults); train s is wall time on the shared VM.",
        "- Baselines: every uniform width (and, at a fractional average, the linear "
        "interpolation between the two neighbouring uniform widths, marked interp.); random "
        "allocation with the router's measured per-layer shares, per token or per slot like "
        f"the router (exactly the same average bits; mean of {args.random_seeds} seeds, range "
        "in brackets).", ""]
    for name, bits, caps, uni, rows, order in sections:
        lines += [f"## {name}: bits {','.join(map(str, bits))}, capacities {caps}", "",
                  "Uniform: " + ", ".join(f"{b} bits {p:.4f}" for b, p in uni.items()), ""]
        if order is not None:
            lines += [f"Router weights alone (an untrained per-slot gate: lighter slots to fewer "
                      f"bits): {order.ppl:.4f} at {order.avg_bits:.3f} bits", ""]
        lines += [

                  "| alpha | avg bits | shares (low..high) | router | random (same shares) | "
                  "uniform | router vs random | router vs uniform | train s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for alpha, mine, rnd, secs, _ in rows:
            k = len(bits)
            share = [sum(s[i] for s in mine.shares) / len(mine.shares) for i in range(k)]
            u = uniform_at(mine.avg_bits, uni)
            interp = "" if abs(mine.avg_bits - round(mine.avg_bits)) < 1e-9 else " (interp.)"
            r_mean = sum(rnd) / len(rnd)
            lines.append(
                f"| {alpha:g} | {mine.avg_bits:.3f} | {'/'.join(f'{v:.2f}' for v in share)} | "
                f"{mine.ppl:.4f} | {r_mean:.4f} [{min(rnd):.4f}, {max(rnd):.4f}] | "
                f"{u:.4f}{interp} | {100 * (mine.ppl / r_mean - 1):+.2f}% | "
                f"{100 * (mine.ppl / u - 1):+.2f}% | {secs:.0f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
