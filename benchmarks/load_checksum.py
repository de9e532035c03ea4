"""Where a load's checksums run: a large level's CRC-32 on a helper thread while the next
level is read (the store reader since 2026-11-23, `quant.store.PIPELINE_MIN_BYTES`) against
each level checked right after its read (before; the baseline, measured in the same rounds).

Times the I/O lane's whole load of one expert from 0 to `--bits` bits (every level's read,
checksum, conversion, placement in the pool) on a random-weight nested store of the spec's
shape, O_DIRECT, the two variants alternating (`read_buffers.alternate_loads`). zlib.crc32
releases the GIL, and an O_DIRECT read waits on the disk, so the check of level k overlaps
the read of level k+1; the last level's check has nothing left to overlap. Prints the median
load of each and the median of the per-round ratios inline / pipelined.

Usage: python benchmarks/load_checksum.py [--spec mixtral-8x7b] [--rounds 8] [--bits 4]
                                         [--min-bytes 0] [--device cuda]
The Mixtral-shaped store takes about 0.36 GB of disk under the d2moe cache directory while
it runs (removed afterwards).
"""

from __future__ import annotations

import argparse

import torch
from decode_ab import print_machine
from read_buffers import alternate_loads, print_times

from d2moe.quant.store import PIPELINE_MIN_BYTES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="mixtral-8x7b", help="shipped spec name or YAML")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--min-bytes", type=int, default=PIPELINE_MIN_BYTES,
                    help="levels at least this large go to the helper thread (0: all)")
    ap.add_argument("--device", default="cpu", help="the pool's device: cpu or cuda")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.exit(2, f"load_checksum.py --device {args.device}: torch sees no CUDA device "
                   "(fix: --device cpu)\n")
    torch.set_num_threads(1)
    print_machine(f"{args.spec} expert shape, 0->{args.bits} bit loads into a {args.device} "
                  f"pool, {args.rounds} rounds, pipelined from {args.min_bytes} B levels")

    def pipeline(min_bytes: int | None):
        def setup(reader, pool) -> None:  # one read per level in both: only the checks differ
            reader.pipeline_min_bytes, reader.coalesce = min_bytes, False
        return setup

    times = alternate_loads(args.spec, args.bits, args.rounds, torch.device(args.device),
                            {"inline": pipeline(None), "pipelined": pipeline(args.min_bytes)})
    print_times(times, "inline", "pipelined")


if __name__ == "__main__":
    main()
