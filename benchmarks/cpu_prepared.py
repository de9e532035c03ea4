"""The CPU executor's decode with each expert's kernel inputs (plane views and the fallback's
float32 parameters) kept across runs, against rebuilding them for every run (before).

The tiny model decodes `--tokens` tokens at 4 bits with its experts streamed from a nested
store (O_DIRECT), HEBF, at each budget; per repeat both variants run back to back in this one
process, alternating which goes first. "rebuild" makes the pool build fresh `PlaneViews` for
every expert run (so the fallback prepares the parameters again), as the code did before
2026-11-23 06:40 UTC. Prints decode tok/s (median, min-max) of each and the median of the
per-repeat ratios kept / rebuild: the baseline is measured in the same run
(benchmarks/decode_ab.py).

Usage: python benchmarks/cpu_prepared.py [--repeats 16] [--budgets 100%,50%,25%]
Run with one torch thread (the default) on a quiet machine: timings drift.
"""

from __future__ import annotations

import torch
from decode_ab import run_ab


def rebuild(pool):
    """The earlier behaviour: fresh views (and parameters) for every expert run."""
    pool._kernel_inputs = pool._build_plane_views  # noqa: SLF001
    return torch.inference_mode()


if __name__ == "__main__":
    run_ab(__doc__, ("rebuild", rebuild), ("kept", lambda pool: torch.inference_mode()))
