"""A CPU pool's level copied through as stored (`LevelFormat.stored_is_pool`, since
2026-11-24) against converted part by part (each plane and per-group array reshaped and
copied alone: the baseline, measured in the same rounds).

Times the I/O lane's whole load of one expert from 0 to `--bits` bits (reads, checksums,
conversion, placement, the level views) on a random-weight nested store of the spec's
shape, O_DIRECT, the two variants alternating (`read_buffers.alternate_loads`). Rows of
whole 32-bit words lie in the store as the CPU pool keeps them, so the conversion is one
copy a tensor: a base level of b1 = 2 bits takes 3 copies instead of 12 (and the views
those built), a Mixtral-shaped load the same bytes in fewer calls. Prints the median load
of each and the median of the per-round ratios part-by-part / copied.

Usage: python benchmarks/level_copy.py [--spec tiny] [--rounds 48] [--bits 4]
"""

from __future__ import annotations

import torch
from read_buffers import alternate_loads, load_ab_args, print_times


def main() -> None:
    args = load_ab_args(__doc__, 48)
    if args.device != "cpu":
        raise SystemExit("level_copy.py: the copy-through path is the CPU pool's (--device cpu)")

    def copied(on: bool):
        return lambda reader, pool: setattr(pool.fmt, "stored_is_pool", on)

    times = alternate_loads(args.spec, args.bits, args.rounds, torch.device(args.device),
                            {"part-by-part": copied(False), "copied": copied(True)})
    print_times(times, "part-by-part", "copied")


if __name__ == "__main__":
    main()
