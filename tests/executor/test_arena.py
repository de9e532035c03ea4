"""The arena never fails while the bytes fit, keeps blocks disjoint, and moves data intact."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.executor.arena import ALIGN, Arena, chunked_move


def _arena(capacity: int):
    mem = np.zeros(capacity, dtype=np.uint8)

    def copy(src: int, dst: int, n: int) -> None:
        assert dst + n <= src or src + n <= dst, "copy() must never see an overlap"
        mem[dst:dst + n] = mem[src:src + n]

    return mem, Arena(capacity, mover=chunked_move(copy))


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(1, 6 * ALIGN)), max_size=60))
def test_alloc_never_fails_while_bytes_fit_and_data_survives_compaction(ops):
    capacity = 16 * ALIGN
    mem, arena = _arena(capacity)
    live = []  # (block, fill byte)
    for i, (free, nbytes) in enumerate(ops):
        if free and live:
            block, _ = live.pop(i % len(live))
            arena.free(block)
            continue
        if arena.used_bytes + Arena.footprint(nbytes) > capacity:
            continue
        block = arena.alloc(nbytes, tag=i)
        fill = i % 251 + 1
        mem[block.offset:block.offset + block.nbytes] = fill
        live.append((block, fill))
        spans = sorted((b.offset, b.offset + b.nbytes) for b in arena.blocks)
        assert all(a[1] <= b[0] for a, b in pairwise(spans))
        assert spans[-1][1] <= capacity
        for b, f in live:
            assert (mem[b.offset:b.offset + b.nbytes] == f).all()
    assert arena.used_bytes == sum(b.nbytes for b, _ in live)


def test_fragmented_arena_compacts_to_fit():
    mem, arena = _arena(4 * ALIGN)
    blocks = [arena.alloc(ALIGN, tag=i) for i in range(4)]
    for i, b in enumerate(blocks):
        mem[b.offset:b.offset + ALIGN] = i + 1
    arena.free(blocks[0])
    arena.free(blocks[2])  # two one-unit holes, no two-unit hole
    big = arena.alloc(2 * ALIGN, tag="big")
    assert arena.compactions == 1 and big.offset == 2 * ALIGN
    assert (mem[0:ALIGN] == 2).all() and (mem[ALIGN:2 * ALIGN] == 4).all()
