"""`d2moe demo`: the built-in defaults, end to end, with no arguments and no download.

Simulation part: Mixtral-8x7B routing (a synthetic trace) on the estimated RTX 3060 laptop
profile, FIFO against HEBF: a table and the bubble timeline. The expert budget is what the
6 GiB GPU has left: 6 GiB minus Mixtral's fp16 non-expert weights (3.2 GB) and ~0.5 GB of
KV cache and activations = 2.5 GiB.

Real part (when torch is installed; `--no-real` skips it): the built-in tiny model runs on
this CPU with its experts streamed from disk under a 50% budget, FIFO against HEBF; the
simulator replays the same recorded routing on the shipped profile measured on a CPU like this
one (`d2moe validate --profile auto`: cpu-2core-xeon or cpu-2core), and both timelines are
drawn one above the other with the tokens/s error (`d2moe validate`).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field, replace
from typing import Any

from d2moe.core.cliargs import add_fields, from_args
from d2moe.sim.cmd import SimulateConfig, run_simulations

DEMO = SimulateConfig(model_spec="mixtral-8x7b", profile="rtx3060-laptop", policy="fifo,hebf",
                      budget="2.5GiB", out="out/demo")


@dataclass(frozen=True)
class DemoConfig:
    """Options of `d2moe demo` (the CLI is built from these fields); the rest is DEMO."""

    out: str = field(default=DEMO.out, metadata={"help": "output directory"})
    real: bool = field(default=True, metadata={
        "help": "also run the tiny model for real on the CPU and compare it with the "
                "simulator (needs torch; default: on)"})


def register(subparsers: Any) -> None:
    """Add the `demo` verb."""
    p = subparsers.add_parser(
        "demo", help="run the built-in demo (no arguments needed)",
        description="Simulate Mixtral-8x7B routing on the RTX 3060 laptop profile (estimated) "
                    "with what its 6 GiB leave for experts (2.5 GiB), FIFO against HEBF; "
                    "print the table and write the bubble timeline and metrics to --out.")
    add_fields(p, DemoConfig)
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    cfg = from_args(DemoConfig, args)
    result = run_simulations(replace(DEMO, out=cfg.out))
    print(result["table"])
    fifo, hebf = result["metrics"]["fifo"], result["metrics"]["hebf"]
    speedup = hebf.decode_tokens_per_s / fifo.decode_tokens_per_s
    print(f"\nHEBF vs FIFO: {speedup:.2f}x decode tokens/s (simulated, estimated profile)")
    print(f"bubble timeline: {cfg.out}/bubbles.png   Perfetto trace: {cfg.out}/chrome.json")
    if cfg.real:
        _real_side(cfg.out)
    print(f"demo took {time.perf_counter() - t0:.1f} s")
    return 0


def _real_side(out: str) -> None:
    """The tiny model for real on the CPU against the simulator on the same trace."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        print("\nreal side skipped: torch is not installed (pip install 'd2moe[executor]')")
        return
    from d2moe.executor.profile_choice import chosen_profile
    from d2moe.executor.validate import ValidateConfig, validate

    # the median of three real runs per row: one short run on a shared machine moves by
    # 10-20% from one to the next (docs/results/fidelity.md)
    cfg = ValidateConfig(policies="fifo,hebf", budgets="50%", max_new_tokens=24, progress=False,
                         profile="auto", repeats=3, out=f"{out}/real")
    profile = chosen_profile(cfg)
    print("\nreal side: the tiny model on this CPU (experts streamed from disk) against the "
          f"simulator replaying its routing on the measured {profile.name} profile")
    result = validate(cfg)
    from d2moe.analysis.fidelity import short_table, summary_line

    print(short_table(result["rows"]))
    print(summary_line(result["summary"]))
    print(f"real above simulated: {out}/real/timeline-50pct.png; full table: {out}/real/table.txt"
          " (timings on a shared machine vary from run to run: docs/profiling.md)")
    import torch

    from d2moe.profiles.measure import device_name, torch_threads

    src = profile.source
    with torch_threads(cfg.threads):  # as the real side ran
        here = device_name(torch.device("cpu"))
    if src.device == here:
        print(f"the {profile.name} profile was measured on a machine like this one ({here}, "
              f"{src.date}); `d2moe validate --profile measure` measures this one itself")
    else:
        print(f"no shipped profile is of a machine like this one: {profile.name} is of "
              f"{src.device} (measured {src.date}; this machine: {here}), so the error holds "
              "the difference between the two; `d2moe validate --profile measure` measures "
              "this one first")
