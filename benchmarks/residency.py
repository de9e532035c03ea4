"""HEBF's residency memory: which experts stay resident decides whether HEBF beats LRU.

Simulates FIFO (the baseline: expert-ID order, LRU residency), `hebf-lru` (HEBF's order,
LRU), `hebf` (HEBF's order, the hottest over a long memory: heat halves every 256 layers),
`hebf-recent` (the hottest over a short one: every 2 steps), `hebf-adaptive` (whichever
of those two memories or recency lately predicted demand best) and `hebf-ghost` (whichever
would lately have loaded least, each replayed in a ghost pool at the budget) on synthetic
routing of several
locality levels (the chance a token reuses the previous token's experts at a layer) and,
with `--tiny`, the tiny model's real routing over its held-out text. Prints each policy's
decode tokens/s as a ratio to FIFO's on the same trace, profile and budget (the same run),
then per policy the geometric mean, the range and the cells behind FIFO. Simulated:
deterministic, on the named profiles (estimated unless `cpu-2core`/`h100`).

Usage: python benchmarks/residency.py [--specs mixtral-8x7b:jetson-agx-orin,...]
           [--budgets 10%,20%,30%,40%,60%] [--localities 0.1,0.3,0.6] [--decode-steps 128]
           [--policies hebf-lru,hebf,hebf-recent,hebf-adaptive,hebf-ghost] [--tiny | --no-tiny]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from d2moe.analysis.metrics import compute_metrics
from d2moe.core.cliargs import split_list
from d2moe.core.spec import load_spec
from d2moe.policies import make_policy
from d2moe.sim.cmd import SimulateConfig, prepare, simulate_policy
from d2moe.traces import save_trace, synth_trace
from d2moe.traces.synth import SynthConfig

BASELINE = "fifo"
SPECS = "mixtral-8x7b:jetson-agx-orin,mixtral-8x7b:rtx3060-laptop,llama-moe-3.5b:rtx3060-laptop," \
        "deepseek-v2-lite:rtx3060-laptop"


def ratios(trace: Path, spec: str, profile: str, budget: str, policies: list[str]
           ) -> dict[str, float]:
    """Decode tokens/s of each policy over FIFO's, one prepared workload."""
    prep = prepare(SimulateConfig(model_spec=spec, profile=profile, trace=str(trace),
                                  budget=budget, chrome=False))
    speed = {name: compute_metrics(simulate_policy(prep, make_policy(name))).decode_tokens_per_s
             for name in [BASELINE, *policies]}
    return {name: speed[name] / speed[BASELINE] for name in policies}


def tiny_trace(out: Path, decode_steps: int) -> Path:
    """The tiny model's routing over its held-out split (as `d2moe trace record` records)."""
    from d2moe.model.corpus import load_corpus
    from d2moe.model.load import load_model
    from d2moe.model.tokenizer import model_codec
    from d2moe.traces.record import record_trace

    encode, _ = model_codec("tiny")
    model, spec = load_model("tiny")
    text = load_corpus(1, 64 * 1024).heldout
    path = out / "tiny-record.npz"
    save_trace(path, record_trace(model, spec, encode(text), prefill_tokens=64,
                                  decode_steps=decode_steps, source="tiny held-out split"))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default=SPECS, help="SPEC:PROFILE pairs, comma-separated")
    ap.add_argument("--budgets", default="10%,20%,30%,40%,60%")
    ap.add_argument("--localities", default="0.1,0.3,0.6",
                    help="synthetic traces' locality (0.3: the generator's default)")
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--policies", default="hebf-lru,hebf,hebf-recent,hebf-adaptive,hebf-ghost",
                    help=f"compared with {BASELINE} (the baseline)")
    ap.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=True,
                    help="add the tiny model's recorded routing on the cpu-2core profile")
    args = ap.parse_args()
    budgets = split_list(args.budgets, "budgets", example="--budgets 20%,40%")
    policies = split_list(args.policies, "policies", example="--policies hebf,hebf-recent")
    pairs = [p.split(":") for p in split_list(args.specs, "specs",
                                              example="--specs mixtral-8x7b:rtx3060-laptop")]
    localities = [float(x) for x in split_list(args.localities, "localities",
                                                example="--localities 0.1,0.6")]
    print(f"simulated; decode tokens/s over {BASELINE}'s, same trace, profile and budget; "
          f"{args.decode_steps} decode steps; start "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", flush=True)
    width = max(11, *(len(p) for p in policies))
    head = f"{'spec':17s} {'profile':15s} {'routing':13s} {'budget':>6s} " + \
        " ".join(f"{p:>{width}s}" for p in policies)
    print(head + "\n" + "-" * len(head), flush=True)
    cells: dict[str, list[float]] = {p: [] for p in policies}

    def row(spec: str, profile: str, routing: str, trace: Path) -> None:
        for budget in budgets:
            r = ratios(trace, spec, profile, budget, policies)
            for p in policies:
                cells[p].append(r[p])
            print(f"{spec:17s} {profile:15s} {routing:13s} {budget:>6s} " +
                  " ".join(f"{r[p]:{width}.3f}" for p in policies), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for spec, profile in pairs:
            for loc in localities:
                trace = Path(tmp) / f"{spec}-{loc}.npz"
                save_trace(trace, synth_trace(load_spec(spec), SynthConfig(
                    locality=loc, decode_steps=args.decode_steps)))
                row(spec, profile, f"synth loc {loc:g}", trace)
        if args.tiny:
            row("tiny", "cpu-2core", "recorded", tiny_trace(Path(tmp), 4 * args.decode_steps))
    print(f"\nper policy over {len(next(iter(cells.values())))} cells (x {BASELINE}):")
    for p, xs in cells.items():
        gm = math.exp(sum(math.log(x) for x in xs) / len(xs))
        behind = sum(x < 0.995 for x in xs)
        print(f"  {p:{width}s} geomean {gm:.3f}, range {min(xs):.3f}-{max(xs):.3f}, "
              f"behind {BASELINE} (< 0.995x) in {behind}")


if __name__ == "__main__":
    main()
