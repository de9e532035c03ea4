"""The real executor's decode under `torch.inference_mode` (what `generate`, the profile's
probes, serving and evaluation use since 2026-11-23) against `torch.no_grad` (before).

The tiny model decodes `--tokens` tokens at 4 bits with its experts streamed from a nested
store (O_DIRECT), HEBF, at each budget; per repeat both modes run back to back in this one
process, alternating which goes first, with the same decode loop as `generate` (greedy, KV
cache). Prints decode tok/s (median, min-max) of each and the median of the per-repeat ratios
inference_mode / no_grad: the baseline is measured in the same run (benchmarks/decode_ab.py).

Usage: python benchmarks/inference_mode.py [--repeats 20] [--budgets 100%,50%,25%]
Run with one torch thread (the default) on a quiet machine: timings drift.
"""

from __future__ import annotations

import torch
from decode_ab import run_ab

if __name__ == "__main__":
    run_ab(__doc__, ("no_grad", lambda pool: torch.no_grad()),
           ("inference_mode", lambda pool: torch.inference_mode()), repeats=20)
