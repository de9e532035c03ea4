"""The resident pool: expert levels in one pre-allocated device buffer under a byte budget.

Accounting (`ResidentSet`, the same object the simulator uses) decides what may be
resident; the `Arena` decides where its bytes sit; this class moves the bytes. The buffer
is allocated once at its full size, so the device's memory use never grows after start-up,
and the arena compacts instead of failing when the budget's bytes are free but scattered.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from d2moe.core.errors import UserError
from d2moe.core.jobs import Evict, ExpertKey, Load
from d2moe.core.sizes import QuantLayout, all_experts_bytes, fmt_bytes
from d2moe.core.spec import ModelSpec
from d2moe.executor.arena import ALIGN, Arena, Block, chunked_move
from d2moe.executor.levels import LevelFormat
from d2moe.kernels.packed import PackedExpertMatrix
from d2moe.kernels.torch_fallback import PlaneViews, prepared_nbytes
from d2moe.policies.view import ResidentSet, ResidentView, Sizes
from d2moe.quant.store import TENSORS

# Host bytes the CPU pool may hold in prepared kernel parameters (float32 scale and zero per
# group: a quarter of a 4-bit level's bytes) beyond the budget. The tiny model's experts fit
# whole (about 0.5 MiB at 4 bits); one Mixtral-sized matrix (7 MiB) does not, and there the
# parameters cost about 1% of the run they are rebuilt in.
PREPARED_CAP_BYTES = 4 << 20


class ExpertPool:
    """Expert levels resident on `device`; `moving` guards compaction against readers."""

    def __init__(self, spec: ModelSpec, layout: QuantLayout, budget_bytes: int,
                 device: torch.device, *, copies: bool = False,
                 word_major: bool = False) -> None:
        self.spec, self.layout, self.device = spec, layout, device
        # CPU: row-major levels read as numpy views (the torch fallback). Elsewhere, or with
        # `word_major` (the CUDA layout on the CPU: the Triton interpreter, in tests),
        # word-major levels handed to the Triton kernels where they lie
        self.cpu = device.type == "cpu" and not word_major
        self.fmt = LevelFormat(spec, layout, row_major=self.cpu)
        sizes = Sizes.of(spec, layout)
        if copies:
            # Separate copies per bit-width (Matryoshka-Free, Hold-in-Memory, ...) emulated on
            # the nested store: the b-bit prefix of a bitplane code has the bytes of a b-bit
            # RTN copy; without nesting, raising an expert evicts it and reloads it whole.
            sizes = replace(sizes, nested=False)
        self.accounting = ResidentSet(sizes, budget_bytes)
        levels = range(layout.b1, layout.bK + 1)
        # The pool's level may be a little larger than the store's (rows padded to whole
        # int32 words) and every block is aligned: size the arena for the worst case of
        # budget_bytes of store levels, so accounting, not the arena, binds. Never more than
        # every expert at its widest level (a budget above 100% is a budget of 100%: an
        # expert holds one prefix of its levels, or one copy, at a time).
        ratio = max(Arena.footprint(self.fmt.nbytes(b)) / self.fmt.store_nbytes(b)
                    for b in levels)
        every = all_experts_bytes(spec, layout.bK, layout)
        self.capacity_bytes = int(min(budget_bytes, every) * ratio) + ALIGN
        # CPU: zero-filled, so its pages are committed now and a load never pays first-touch
        # page faults (measured: first admits into a fresh Mixtral pool took up to 3x longer)
        alloc = torch.zeros if self.cpu else torch.empty
        try:
            self.buffer = alloc(self.capacity_bytes, dtype=torch.uint8, device=device)
        except (RuntimeError, MemoryError) as exc:  # torch's out-of-memory (CPU or CUDA)
            reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise UserError(f"cannot allocate an expert pool of "
                            f"{fmt_bytes(self.capacity_bytes)} on {device} ({reason})",
                            field="budget", fix="give a smaller budget") from None
        self.host = self.buffer.numpy() if self.cpu else None  # the same bytes (CPU)
        # CPU: numpy views of each resident level's parts, parsed once per placement:
        # (key, level bits) -> (block offset they were taken at, {tensor: {part: array}})
        self._views: dict[tuple[ExpertKey, int], tuple[int, dict[str, dict[str, np.ndarray]]]] = {}
        # Kernel inputs per (key, bits), kept with the offsets of the levels they view (and,
        # CPU, the bytes of the fallback's float32 parameters prepared on them, which then
        # outlive one run); least recently used first, those bytes under a fixed cap
        self._inputs: OrderedDict[tuple[ExpertKey, int],
                                  tuple[tuple[int, ...], dict[str, Any], int]] = OrderedDict()
        self._inputs_bytes = 0
        self._inputs_lock = threading.Lock()  # the I/O lane evicts while the compute lane runs
        # The mover holds the buffer, not the pool: no reference cycle, so a dropped pool
        # frees its (committed) buffer at once instead of at the next cyclic collection.
        self.arena = Arena(self.capacity_bytes,
                           mover=chunked_move(functools.partial(_copy_within, self.buffer)))
        self.blocks: dict[ExpertKey, dict[int, Block]] = {}  # key -> {level bits: block}
        self.moving = threading.Lock()  # held by readers of blocks and by compaction
        self._staging: torch.Tensor | None = None  # CUDA: pinned host bytes, one level

    @property
    def view(self) -> ResidentView:
        """The accounting's read-only view, the one a policy plans against."""
        return self.accounting.view

    def evict(self, ev: Evict) -> int:
        """Drop the levels above `ev.bits_to`; returns the bytes freed (accounting)."""
        freed = self.accounting.apply_evict(ev)
        levels = self.blocks[ev.key]
        for bits in [b for b in levels if b > ev.bits_to or ev.bits_to == 0]:
            self.arena.free(levels.pop(bits))
            self._views.pop((ev.key, bits), None)
            with self._inputs_lock:
                self._drop_inputs((ev.key, bits))
        if not levels:
            del self.blocks[ev.key]
        return freed

    def levels_of(self, ld: Load) -> range:
        """The stored levels a load brings in."""
        b1 = self.layout.b1
        return range(b1 if ld.bits_from == 0 else ld.bits_from + 1, ld.bits_to + 1)

    def admit(self, ld: Load, data: dict[int, np.ndarray]) -> int:
        """Account for `ld`, place each level's pool bytes; returns the bytes (accounting)."""
        nbytes = self.accounting.apply_load(ld)
        levels = self.blocks.setdefault(ld.key, {})
        for bits in self.levels_of(ld):
            raw = data[bits]
            block = self._alloc(raw.size, (ld.key, bits))
            self._upload(self.buffer[block.offset:block.offset + raw.size], raw)
            levels[bits] = block
        return nbytes

    def admit_stored(self, ld: Load, stored: dict[int, dict[str, np.ndarray]]) -> int:
        """`admit` from the store's bytes ({level bits: {tensor: uint8}}): on the CPU each
        level is converted straight into its block (no staging copy) and its views parsed;
        returns the bytes."""
        if not self.cpu:
            return self.admit(ld, {b: self.fmt.convert(b, stored[b]) for b in self.levels_of(ld)})
        nbytes = self.accounting.apply_load(ld)
        levels = self.blocks.setdefault(ld.key, {})
        for bits in self.levels_of(ld):
            size = self.fmt.nbytes(bits)
            block = self._alloc(size, (ld.key, bits))
            self.fmt.convert(bits, stored[bits], out=self.host[block.offset:block.offset + size])
            levels[bits] = block
            # parse the level's views here, on the I/O lane (about 100 us per 0->4 bit load
            # of the tiny model, measured), not in the expert's first run on the compute lane
            self._level_views(ld.key, bits)
        return nbytes

    def _alloc(self, nbytes: int, tag: object) -> Block:
        """A block for `nbytes`, compacting (under `moving`) when no hole fits."""
        if self.arena.used_bytes + Arena.footprint(nbytes) > self.capacity_bytes:
            raise MemoryError("arena full although the accounting admitted the load")
        return self.arena.alloc(nbytes, tag) if self._fits(nbytes) \
            else self._alloc_compacting(nbytes, tag)

    def _upload(self, dst: torch.Tensor, raw: np.ndarray) -> None:
        """Host bytes into the pool. On CUDA through a pinned staging buffer, as an async copy
        on the caller's current stream, waited for before the buffer is reused."""
        if self.device.type != "cuda":
            dst.copy_(torch.from_numpy(raw))
            return
        if self._staging is None or self._staging.numel() < raw.size:
            largest = max(self.fmt.nbytes(b) for b in range(self.layout.b1, self.layout.bK + 1))
            self._staging = torch.empty(max(largest, raw.size), dtype=torch.uint8,
                                        pin_memory=True)
        stage = self._staging[:raw.size]
        stage.numpy()[:] = raw
        dst.copy_(stage, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()

    def _fits(self, nbytes: int) -> bool:
        return self.arena._find_hole(Arena.footprint(nbytes)) is not None  # noqa: SLF001

    def _alloc_compacting(self, nbytes: int, tag: object) -> Block:
        with self.moving:  # no reader holds a view into a block while blocks move
            cuda = self.device.type == "cuda"
            if cuda:  # queued kernels may still read the blocks about to move
                torch.cuda.synchronize(self.device)
            block = self.arena.alloc(nbytes, tag)
            if cuda:  # the moves must land before any reader sees the new offsets
                torch.cuda.synchronize(self.device)
            return block

    def matrices(self, key: ExpertKey, bits: int) -> dict[str, PackedExpertMatrix | PlaneViews]:
        """`key` at `bits` bits as kernel inputs (w1, w3, w2). Call with `moving` held. CUDA:
        views of each plane in its level block, which the kernels address where they lie
        (until 2026-11-23 they were stacked into one tensor per matrix: a copy of every
        plane on every run); CPU: views of the blocks, no copy (`PlaneViews`)."""
        return self._kernel_inputs(key, bits)

    def _level_views(self, key: ExpertKey, bits: int) -> dict[str, dict[str, np.ndarray]]:
        """Numpy views of one resident level's parts (CPU, row-major), cached per placement:
        a compaction moves the block, and the offset check re-parses it."""
        block = self.blocks[key][bits]
        hit = self._views.get((key, bits))
        if hit is not None and hit[0] == block.offset:
            return hit[1]
        views: dict[str, dict[str, np.ndarray]] = {t: {} for t in TENSORS}
        at = block.offset
        for tensor, part, start, n, dtype, shape in self.fmt.slots(bits):
            views[tensor][part] = self.host[at + start:at + start + n].view(dtype).reshape(shape)
        self._views[(key, bits)] = (block.offset, views)
        return views

    def _kernel_inputs(self, key: ExpertKey, bits: int) -> dict[str, Any]:
        """Each matrix's planes as views of their level blocks (CPU: `PlaneViews`; CUDA:
        `PackedExpertMatrix`, `packed_views`), reused while every level they view stays
        where it was (a moved or replaced level has another offset; a level evicted and
        loaded again holds the same store bytes): a run pays a lookup, not ~30 views. Kept
        only while the CPU fallback's parameters prepared on them fit PREPARED_CAP_BYTES
        with the others kept: host memory outside the budget, so fixed like its scratch
        (CUDA inputs hold no bytes of their own)."""
        levels = self.blocks[key]
        offsets = tuple(levels[b].offset for b in range(self.layout.b1, bits + 1))
        with self._inputs_lock:
            hit = self._inputs.get((key, bits))
            if hit is not None and hit[0] == offsets:
                self._inputs.move_to_end((key, bits))
                return hit[1]
            self._drop_inputs((key, bits))
        if self.cpu:
            inputs: dict[str, Any] = self._build_plane_views(key, bits)
            nbytes = sum(prepared_nbytes(v, bits) for v in inputs.values())
        else:
            inputs, nbytes = packed_views(self.buffer, self.fmt, self.layout, levels, bits), 0
        if nbytes <= PREPARED_CAP_BYTES:
            with self._inputs_lock:
                while self._inputs and self._inputs_bytes + nbytes > PREPARED_CAP_BYTES:
                    self._drop_inputs(next(iter(self._inputs)))
                self._inputs[(key, bits)] = (offsets, inputs, nbytes)
                self._inputs_bytes += nbytes
        return inputs

    def _drop_inputs(self, kb: tuple[ExpertKey, int]) -> None:
        """Forget the kept inputs of (key, bits). Call with `_inputs_lock` held."""
        hit = self._inputs.pop(kb, None)
        if hit is not None:
            self._inputs_bytes -= hit[2]

    def _build_plane_views(self, key: ExpertKey, bits: int) -> dict[str, PlaneViews]:
        lay = self.layout
        parts: dict[str, dict[str, np.ndarray]] = {t: {} for t in TENSORS}
        for b in range(lay.b1, bits + 1):
            for tensor, views in self._level_views(key, b).items():
                parts[tensor].update(views)
        n_ps = bits - lay.b1 if lay.kind == "mwq" else 0
        return {t: PlaneViews(kind=lay.kind, b1=lay.b1, bK=lay.bK, group=lay.group,
                              rows=g.rows, cols=g.cols,
                              planes=tuple(parts[t][f"plane{j}"] for j in range(bits)),
                              scale=parts[t]["scale"], zero=parts[t]["zero"],
                              plane_scale=tuple(parts[t][f"pscale{i}"] for i in range(n_ps)))
                for t, g in self.fmt.geoms.items()}


def _copy_within(buffer: torch.Tensor, src: int, dst: int, nbytes: int) -> None:
    """Copy `nbytes` of `buffer` from `src` to `dst` (non-overlapping: see chunked_move)."""
    buffer[dst:dst + nbytes].copy_(buffer[src:src + nbytes])


def packed_views(buffer: torch.Tensor, fmt: LevelFormat, layout: QuantLayout,
                 levels: dict[int, Block], bits: int) -> dict[str, PackedExpertMatrix]:
    """The kernel inputs of one expert at `bits` from its word-major level blocks in
    `buffer` (uint8): every plane, scale and plane scale a view where it lies, no copy."""
    parts: dict[str, dict[str, torch.Tensor]] = {t: {} for t in TENSORS}
    for b in range(layout.b1, bits + 1):
        offset = levels[b].offset
        for tensor, part, n in fmt.parts(b):
            parts[tensor][part] = buffer[offset:offset + n]
            offset += n
    out = {}
    for tensor, g in fmt.geoms.items():
        p = parts[tensor]

        def words(t: torch.Tensor, g=g) -> torch.Tensor:
            return t.view(torch.int32).view(g.words, g.rows)

        def aux(t: torch.Tensor, g=g) -> torch.Tensor:
            return t.view(torch.float16).view(g.groups, g.rows)

        n_ps = bits - layout.b1 if layout.kind == "mwq" else 0
        out[tensor] = PackedExpertMatrix(
            kind=layout.kind, b1=layout.b1, bK=layout.bK, group=layout.group, rows=g.rows,
            cols=g.cols, planes=tuple(words(p[f"plane{j}"]) for j in range(bits)),
            scale=aux(p["scale"]), zero=aux(p["zero"]),
            plane_scale=tuple(aux(p[f"pscale{i}"]) for i in range(n_ps)))
    return out
