"""Resident levels in the kernels' layout: how one stored level of an expert maps to bytes
in the pool, and how the pool's bytes become `PackedExpertMatrix` views again.

A level is the base (bits == b1: b1 bit planes, scale, zero) or one residual plane (its bit
plane and, for MWQ, its scale), for all three matrices (w1, w3, w2) back to back, as in the
store. In a CUDA pool each bit plane is word-major int32 [words, rows] and each per-group
array is fp16 [groups, rows] (d2moe/kernels/packed.py), so the conversion (a
reinterpretation and a transpose) happens once, on the I/O lane, when the level is loaded.
A CPU pool keeps the store's row-major order ([rows, words] planes, [rows, groups] arrays:
`row_major`), which is what the CPU fallback reads (kernels/torch_fallback.py: PlaneViews),
so neither lane transposes; the byte sizes are the same either way.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

from d2moe.core.errors import UserError
from d2moe.core.sizes import QuantLayout
from d2moe.core.spec import ModelSpec
from d2moe.kernels.packed import Geometry, plane_words
from d2moe.quant.nested import level_nbytes
from d2moe.quant.store import TENSORS


@dataclass(frozen=True)
class MatrixGeom(Geometry):
    """One expert matrix [rows, cols]: word-major plane and per-group array byte sizes."""

    rows: int
    cols: int
    group: int

    @property
    def plane_nbytes(self) -> int:
        return self.words * self.rows * 4

    @property
    def aux_nbytes(self) -> int:
        return self.groups * self.rows * 2


class LevelFormat:
    """Byte layout of each level in the pool, for one model and store layout."""

    def __init__(self, spec: ModelSpec, layout: QuantLayout, *, row_major: bool = False) -> None:
        self.layout, self.row_major = layout, row_major
        self.geoms = {t: MatrixGeom(o, i, layout.group)
                      for t, (o, i) in zip(TENSORS, _shapes(spec), strict=True)}
        # Row-major with every row whole words (and little-endian): `_plane` and `_aux` are
        # views of the stored bytes in store order, so a level's pool bytes are its stored
        # bytes, one copy a tensor (a base level of b1 = 2: 3 copies instead of 12, and no
        # views to build; benchmarks/level_copy.py)
        self.stored_is_pool = row_major and sys.byteorder == "little" and all(
            g.cols % 32 == 0 for g in self.geoms.values())
        self._slots: dict[int, tuple[tuple[str, str, int, int, type, tuple[int, int]], ...]] = {}

    def parts(self, bits: int) -> list[tuple[str, str, int]]:
        """(tensor, part, nbytes) in pool order for level `bits`: parts are `plane{j}` (bit
        plane j, 0 = most significant), `scale`, `zero` and `pscale{i}` (MWQ plane i's scale)."""
        b1, out = self.layout.b1, []
        for t, g in self.geoms.items():
            if bits == b1:
                out += [(t, f"plane{j}", g.plane_nbytes) for j in range(b1)]
                out += [(t, "scale", g.aux_nbytes), (t, "zero", g.aux_nbytes)]
            else:
                out.append((t, f"plane{bits - 1}", g.plane_nbytes))
                if self.layout.kind == "mwq":
                    out.append((t, f"pscale{bits - b1 - 1}", g.aux_nbytes))
        return out

    def slots(self, bits: int) -> tuple[tuple[str, str, int, int, type, tuple[int, int]], ...]:
        """(tensor, part, start, nbytes, dtype, row-major shape) of each part of level
        `bits`, start counted from the level's first byte: how a CPU pool views a level
        (int32 [rows, words] planes, fp16 [rows, groups] arrays). Built once per bits."""
        hit = self._slots.get(bits)
        if hit is None:
            out, pos = [], 0
            for t, part, n in self.parts(bits):
                g = self.geoms[t]
                plane = part.startswith("plane")
                out.append((t, part, pos, n, np.int32 if plane else np.float16,
                            (g.rows, g.words) if plane else (g.rows, g.groups)))
                pos += n
            hit = self._slots[bits] = tuple(out)
        return hit

    def nbytes(self, bits: int) -> int:
        """Pool bytes of level `bits` (equals the store's when cols % 32 == 0)."""
        _, _, start, n, _, _ = self.slots(bits)[-1]
        return start + n

    def store_nbytes(self, bits: int) -> int:
        return sum(level_nbytes(self.layout, g.rows, g.cols, bits) for g in self.geoms.values())

    def convert(self, bits: int, levels: dict[str, np.ndarray],
                out: np.ndarray | None = None) -> np.ndarray:
        """The store's bytes of level `bits` ({tensor: uint8}) -> the pool's bytes (uint8),
        written into `out` (uint8 [nbytes(bits)], e.g. the level's block) when given."""
        self._check_stored(bits, levels)
        if out is None:
            out = np.empty(self.nbytes(bits), dtype=np.uint8)
        pos = 0

        def put(chunk: np.ndarray) -> None:
            nonlocal pos
            flat = out[pos:pos + chunk.nbytes]
            if chunk.dtype == np.uint8 and chunk.flags.c_contiguous:
                flat[:] = chunk.reshape(-1)
            else:  # a transpose or a dtype view: written through a view of the same shape
                np.copyto(flat.view(chunk.dtype).reshape(chunk.shape), chunk)
            pos += chunk.nbytes

        if self.stored_is_pool:
            for t in self.geoms:
                put(levels[t])
            return out
        b1 = self.layout.b1
        for t, g in self.geoms.items():
            raw = levels[t]
            n = g.rows * g.cols
            plane_len = math.ceil(n / 8)
            sbytes = g.aux_nbytes
            if bits == b1:
                ncode = math.ceil(n * b1 / 8)
                if n % 8:
                    stream = np.unpackbits(raw[:ncode], count=n * b1, bitorder="little")
                    planes = [np.packbits(stream[j * n:(j + 1) * n], bitorder="little")
                              for j in range(b1)]
                else:
                    planes = [raw[j * plane_len:(j + 1) * plane_len] for j in range(b1)]
                for p in planes:
                    put(self._plane(p, g))
                put(self._aux(raw, ncode, g))
                put(self._aux(raw, ncode + sbytes, g))
            else:
                put(self._plane(raw[:plane_len], g))
                if self.layout.kind == "mwq":
                    put(self._aux(raw, plane_len, g))
        if pos != out.size:
            raise ValueError(f"level {bits}: wrote {pos} of {out.size} pool bytes")
        return out

    def _check_stored(self, bits: int, levels: dict[str, np.ndarray]) -> None:
        """Each tensor of level `bits` has the bytes the layout implies, else a UserError
        naming the level (raised on an I/O lane, it reaches the user like any other)."""
        for t, g in self.geoms.items():
            want = level_nbytes(self.layout, g.rows, g.cols, bits)
            got = levels[t].size if t in levels else 0
            if got != want:
                raise UserError(f"stored level {bits} of tensor {t} ({g.rows}x{g.cols}) has "
                                f"{got} bytes, the store's layout ({self.layout.kind}, b1 "
                                f"{self.layout.b1}, group {self.layout.group}) needs {want}",
                                field=f"level {bits}",
                                fix="the store is damaged: re-run d2moe quantize")

    def _plane(self, stream: np.ndarray, g: MatrixGeom) -> np.ndarray:
        """One stored plane -> int32 [rows, words] (row-major) or its transpose."""
        if g.cols % 32 == 0 and sys.byteorder == "little":  # the stream is the word array
            words = stream.view("<i4").reshape(g.rows, g.words)
        else:
            words = plane_words(stream, g.rows, g.cols)
        return words if self.row_major else words.T

    def _aux(self, raw: np.ndarray, start: int, g: MatrixGeom) -> np.ndarray:
        """fp16 [rows, groups] at `start` of a stored level -> [rows, groups] or [groups,
        rows]."""
        a = raw[start:start + g.aux_nbytes].view("<f2").reshape(g.rows, g.groups)
        return a if self.row_major else a.T


def _shapes(spec: ModelSpec) -> tuple[tuple[int, int], ...]:
    """(rows, cols) of w1, w3, w2 in TENSORS order (ModelSpec.expert_shapes)."""
    shapes = dict(zip(("w1", "w3", "w2"), spec.expert_shapes, strict=True))
    return tuple(shapes[t] for t in TENSORS)
