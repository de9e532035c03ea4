"""A load's small levels in one read: neighbouring levels below `PIPELINE_MIN_BYTES` fetched
in one request (`quant.store.read_groups`, the store reader since 2026-11-24) against one
request per level (before; the baseline, measured in the same rounds).

Times the I/O lane's whole load of one expert from 0 to `--bits` bits (reads, checksums,
conversion, placement in the pool) on a random-weight nested store of the spec's shape,
O_DIRECT, the two variants alternating (`read_buffers.alternate_loads`). Below about 1 MiB a
read costs the disk's per-request latency more than its bytes, so a tiny expert's 0->4 bit
load (three levels of 8-32 KiB) is mostly three latencies; a Mixtral-shaped expert's levels
(25-49 MiB) are read alone either way, its checks pipelined, and its loads should not move.
Prints the median load of each and the median of the per-round ratios per-level / joined.
With --decode instead: the tiny model's decode tokens/s under HEBF at each budget, the
reader's grouping on and replaced by one read per level, interleaved (`decode_ab.run_ab`).

Usage: python benchmarks/load_coalesce.py [--spec tiny] [--rounds 24] [--bits 4]
       python benchmarks/load_coalesce.py --decode [--repeats 16] [--budgets 25%,50%]
"""

from __future__ import annotations

import contextlib
import sys
from unittest import mock

import torch
from decode_ab import run_ab
from read_buffers import alternate_loads, load_ab_args, print_times

import d2moe.quant.store as store_module


def per_level(pool) -> contextlib.AbstractContextManager:
    """The reader before 2026-11-24: its grouping replaced by one read per level."""
    return mock.patch.object(store_module, "read_groups",
                             lambda sizes, _min: [[i] for i in range(len(sizes))])


def decode() -> None:
    """Decode tokens/s with reads per level against joined (`--decode`)."""
    sys.argv.remove("--decode")
    run_ab(__doc__, ("per-level", per_level), ("joined", lambda pool: contextlib.nullcontext()))


def main() -> None:
    if "--decode" in sys.argv:
        return decode()
    args = load_ab_args(__doc__, 24, {"--decode": "decode tokens/s instead, with its own "
                                   "options: --repeats, --budgets, --tokens (see above)"})

    def coalesce(on: bool):
        return lambda reader, pool: setattr(reader, "coalesce", on)

    times = alternate_loads(args.spec, args.bits, args.rounds, torch.device(args.device),
                            {"per-level": coalesce(False), "joined": coalesce(True)})
    print_times(times, "per-level", "joined")


if __name__ == "__main__":
    main()
