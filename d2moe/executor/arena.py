"""A pre-allocated byte arena for resident expert levels: allocation never fails while the
bytes in use fit, because every block is movable and the arena compacts when fragmented.

Bookkeeping only (offsets and sizes); the bytes live in one tensor allocated once, so the
device's memory use is the arena's size from the start and never grows. The owner of a
block is told its new offset after a compaction (`on_move`), mixtral-offloading-style:
cache bookkeeping apart from data movement.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ALIGN = 256  # bytes: every block starts on this boundary (vector loads, cp.async)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class Block:
    """A live allocation: `nbytes` at `offset` of the arena; `tag` names its owner."""

    offset: int
    nbytes: int
    tag: Any


class Arena:
    """First-fit over a sorted list of blocks, compacting toward offset 0 when no hole fits.

    Invariant: blocks are disjoint, sorted by offset, inside [0, capacity_bytes).
    """

    def __init__(self, capacity_bytes: int, *, mover: Callable[[int, int, int], None],
                 on_move: Callable[[Block], None] | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.blocks: list[Block] = []
        self._offsets: list[int] = []
        self._mover = mover  # (src_offset, dst_offset, nbytes): copy bytes, dst < src
        self._on_move = on_move
        self.used_bytes = 0
        self.peak_bytes = 0
        self.compactions = 0

    @staticmethod
    def footprint(nbytes: int) -> int:
        """Arena bytes a block of `nbytes` occupies (aligned)."""
        return _align(nbytes)

    def alloc(self, nbytes: int, tag: Any) -> Block:
        """A block of `nbytes` (aligned up); compacts first if no hole is large enough."""
        size = _align(nbytes)
        if self.used_bytes + size > self.capacity_bytes:
            raise MemoryError(f"arena full: {self.used_bytes} + {size} > {self.capacity_bytes}")
        offset = self._find_hole(size)
        if offset is None:
            self.compact()
            offset = self.blocks[-1].offset + self.blocks[-1].nbytes if self.blocks else 0
        block = Block(offset, size, tag)
        i = bisect.bisect_left(self._offsets, offset)
        self.blocks.insert(i, block)
        self._offsets.insert(i, offset)
        self.used_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        return block

    def free(self, block: Block) -> None:
        """Return a block to the arena."""
        i = bisect.bisect_left(self._offsets, block.offset)
        if i >= len(self.blocks) or self.blocks[i] is not block:
            raise ValueError(f"not a live block: {block}")
        del self.blocks[i]
        del self._offsets[i]
        self.used_bytes -= block.nbytes

    def _find_hole(self, size: int) -> int | None:
        prev_end = 0
        for b in self.blocks:
            if b.offset - prev_end >= size:
                return prev_end
            prev_end = b.offset + b.nbytes
        return prev_end if self.capacity_bytes - prev_end >= size else None

    def compact(self) -> None:
        """Slide every block down to close the holes, in offset order (so each move's
        destination is free: it lies below the block and above the previous one)."""
        self.compactions += 1
        end = 0
        for b in self.blocks:
            if b.offset != end:
                self._mover(b.offset, end, b.nbytes)
                b.offset = end
                if self._on_move is not None:
                    self._on_move(b)
            end += b.nbytes
        self._offsets = [b.offset for b in self.blocks]


def chunked_move(copy: Callable[[int, int, int], None]) -> Callable[[int, int, int], None]:
    """Make a non-overlapping `copy(src, dst, n)` safe for a downward move that overlaps:
    copy in ascending chunks no longer than the distance moved."""

    def move(src: int, dst: int, nbytes: int) -> None:
        step = src - dst
        if step <= 0:
            raise ValueError("the arena only moves blocks down")
        done = 0
        while done < nbytes:
            n = min(step, nbytes - done)
            copy(src + done, dst + done, n)
            done += n

    return move
