"""NestedMatrix: one weight matrix quantized into nested bit planes, and its byte encoding.

Both nested formats share one shape (docs/formats-store.md):
  base  : b1 bit planes of a code (most significant first) + fp16 scale and zero per group
  plane : one bit per weight, for bits b1+1 .. bK; `mwq` adds one fp16 scale per group
An expert matrix at b bits is the base plus the first b - b1 planes. Planes are kept as
little-endian packed bit streams over the row-major [rows, cols] matrix, so a plane of a
[rows, cols] matrix is exactly ceil(rows*cols/8) bytes, as `d2moe.core.sizes` counts it.
Numpy only: the store and the quantizer run without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from d2moe.core.errors import UserError
from d2moe.core.sizes import QuantLayout

NESTED_KINDS = ("mwq", "bitplane")


@dataclass(frozen=True, eq=False)
class NestedMatrix:
    """A [rows, cols] matrix in nested planes; `planes[j]` is plane j (0 = base MSB)."""

    kind: str  # mwq | bitplane
    b1: int
    bK: int
    group: int
    rows: int
    cols: int
    planes: np.ndarray  # uint8 [bits_stored, ceil(rows*cols/8)], packed little-endian bits
    scale: np.ndarray  # float16 [rows, groups]
    zero: np.ndarray  # float16 [rows, groups]
    plane_scale: np.ndarray  # float16 [bits_stored - b1, rows, groups] (mwq); [0, ...] else

    @property
    def groups(self) -> int:
        """Groups per row: ceil(cols / group); the last one may be partial."""
        return math.ceil(self.cols / self.group)

    @property
    def bits_stored(self) -> int:
        """Highest bit-width this object can serve (b1 + residual planes held)."""
        return int(self.planes.shape[0])

    @property
    def layout(self) -> QuantLayout:
        """The size layout (core.sizes) this matrix is stored under."""
        return QuantLayout(kind=self.kind, b1=self.b1, bK=self.bK, group=self.group)

    def check_bits(self, bits: int) -> None:
        """Raise a UserError unless b1 <= bits <= bits_stored."""
        if not self.b1 <= bits <= self.bits_stored:
            raise UserError(f"{bits} bits is outside {self.b1}..{self.bits_stored} held here",
                            field="bits", fix=f"ask for {self.b1}..{self.bits_stored} bits")

    def truncated(self, bits: int) -> NestedMatrix:
        """The same matrix holding only the planes up to `bits` (a nested prefix)."""
        self.check_bits(bits)
        return replace(self, planes=self.planes[:bits],
                       plane_scale=self.plane_scale[:max(bits - self.b1, 0)])

    def plane_bits(self, j: int) -> np.ndarray:
        """Plane j unpacked to a uint8 0/1 array of shape [rows, cols]."""
        n = self.rows * self.cols
        return np.unpackbits(self.planes[j], count=n, bitorder="little").reshape(
            self.rows, self.cols)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """A 0/1 array (any shape, row-major) -> little-endian packed uint8 stream."""
    return np.packbits(np.ascontiguousarray(bits, dtype=np.uint8).reshape(-1),
                       bitorder="little")


def level_nbytes(layout: QuantLayout, rows: int, cols: int, bits: int) -> int:
    """Bytes of one stored level of a matrix: the base (bits == b1) or plane `bits`."""
    n, groups = rows * cols, rows * math.ceil(cols / layout.group)
    if bits == layout.b1:
        return math.ceil(n * layout.b1 / 8) + 2 * groups * layout.scale_bytes
    return math.ceil(n / 8) + (groups * layout.scale_bytes if layout.kind == "mwq" else 0)


def encode_level(m: NestedMatrix, bits: int) -> bytes:
    """The stored bytes of level `bits`: base = b1 planes as one bit stream + scale + zero."""
    m.check_bits(bits)
    if bits == m.b1:
        n = m.rows * m.cols
        if n % 8 == 0:
            codes = m.planes[:m.b1].reshape(-1)
        else:  # planes are padded to whole bytes: re-pack them as one stream
            codes = pack_bits(np.concatenate([np.unpackbits(m.planes[j], count=n,
                                                            bitorder="little")
                                              for j in range(m.b1)]))
        return b"".join((codes.tobytes(), m.scale.astype("<f2").tobytes(),
                         m.zero.astype("<f2").tobytes()))
    parts = [m.planes[bits - 1].tobytes()]
    if m.kind == "mwq":
        parts.append(m.plane_scale[bits - m.b1 - 1].astype("<f2").tobytes())
    return b"".join(parts)


def decode_levels(layout: QuantLayout, rows: int, cols: int,
                  levels: list[bytes | memoryview | np.ndarray], *, path: str | None = None,
                  where: str = "") -> NestedMatrix:
    """Inverse of `encode_level`: levels[0] is the base, levels[i] is plane b1 + i.

    A level of the wrong length is a UserError naming `path` (the store) and `where` (e.g.
    "layer 0 expert 3 tensor w1"), when the caller has them."""
    n, groups = rows * cols, math.ceil(cols / layout.group)
    plane_len = math.ceil(n / 8)
    raw = [np.frombuffer(lv, dtype=np.uint8) for lv in levels]
    for i, buf in enumerate(raw):
        want = level_nbytes(layout, rows, cols, layout.b1 + i)
        if buf.size != want:
            what = f"{where}: " if where else ""
            raise UserError(f"{what}stored level {layout.b1 + i} has {buf.size} bytes, but a "
                            f"{rows}x{cols} matrix in {layout.kind} (b1 {layout.b1}, group "
                            f"{layout.group}) needs {want}", path=path, field="nbytes",
                            fix="the store is damaged: re-run d2moe quantize")
    base = raw[0]
    ncode = math.ceil(n * layout.b1 / 8)
    if n % 8 == 0:
        base_planes = [base[j * plane_len:(j + 1) * plane_len] for j in range(layout.b1)]
    else:
        stream = np.unpackbits(base[:ncode], count=n * layout.b1, bitorder="little")
        base_planes = [pack_bits(stream[j * n:(j + 1) * n]) for j in range(layout.b1)]
    sbytes = rows * groups * 2

    def f16(buf: np.ndarray, start: int) -> np.ndarray:
        return buf[start:start + sbytes].view("<f2").astype(np.float16).reshape(rows, groups)

    scale, zero = f16(base, ncode), f16(base, ncode + sbytes)
    planes = base_planes + [buf[:plane_len] for buf in raw[1:]]
    if layout.kind == "mwq":
        pscale = np.stack([f16(buf, plane_len) for buf in raw[1:]]) if len(raw) > 1 else \
            np.zeros((0, rows, groups), np.float16)
    else:
        pscale = np.zeros((0, rows, groups), np.float16)
    return NestedMatrix(kind=layout.kind, b1=layout.b1, bK=layout.bK, group=layout.group,
                        rows=rows, cols=cols, planes=np.stack(planes), scale=scale, zero=zero,
                        plane_scale=pscale)


def as_matrix(w: np.ndarray, *, name: str = "weight") -> np.ndarray:
    """A non-empty 2-D matrix as float32 (values unchecked), or a UserError naming it."""
    arr = np.asarray(w)
    if arr.ndim != 2 or arr.size == 0:
        raise UserError(f"expected a non-empty 2-D matrix, got shape {arr.shape}", field=name,
                        fix="pass one [out, in] weight matrix")
    return arr.astype(np.float32, copy=False)


def check_matrix(w: np.ndarray, *, name: str = "weight") -> np.ndarray:
    """A finite 2-D float matrix as float32, or a UserError naming it."""
    arr = as_matrix(w, name=name)
    lo, hi = float(arr.min()), float(arr.max())  # a NaN or an inf shows in these: no temporaries
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UserError("holds NaN or infinite values", field=name,
                        fix="check the checkpoint; quantize finite weights only")
    if max(-lo, hi) > 65504.0:
        raise UserError("values exceed the fp16 range of the scales", field=name,
                        fix="rescale the weights below 65504")
    return arr


def grouped(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """[rows, cols] -> ([rows, groups, group] zero-padded, valid mask [groups, group])."""
    rows, cols = w.shape
    groups = math.ceil(cols / group)
    pad = groups * group - cols
    wg = np.pad(w, ((0, 0), (0, pad))).reshape(rows, groups, group)
    valid = (np.arange(groups * group) < cols).reshape(groups, group)
    return wg, valid


def ungrouped(a: np.ndarray, cols: int) -> np.ndarray:
    """Inverse of `grouped` for the data array: [rows, groups, group] -> [rows, cols]."""
    return a.reshape(a.shape[0], -1)[:, :cols]


def asym_params(wg: np.ndarray, valid: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """fp16 scale and zero per group so that w ~ code * scale + zero, code in 0..2^bits-1."""
    lo = np.where(valid, wg, np.inf).min(-1)
    hi = np.where(valid, wg, -np.inf).max(-1)
    # A constant group (or one whose range underflows fp16) gets scale 0: codes 0, w = zero.
    scale = ((hi - lo) / (2 ** bits - 1)).astype(np.float16)
    return scale, lo.astype(np.float16)


def asym_codes(wg: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Round-to-nearest codes of grouped weights under fp16 scale/zero (uint8)."""
    s = scale[..., None].astype(np.float32)
    q = np.rint((wg - zero[..., None].astype(np.float32)) / np.where(s > 0, s, 1.0))
    return np.clip(np.where(s > 0, q, 0), 0, 2 ** bits - 1).astype(np.uint8)


# Rows quantized at a time: a block of 1 MiB of float32 weights keeps the quantizers'
# temporaries (padded groups, codes, residuals) in a core's cache instead of streaming
# several copies of a whole matrix through memory (2-4x faster on a 14336x4096 matrix, and
# the peak memory of one block, not of five matrix-sized arrays: benchmarks/quantize.py).
BLOCK_BYTES = 1 << 20


def quantize_matrix(w: np.ndarray, layout: QuantLayout, *, fit: str = "mean") -> NestedMatrix:
    """Quantize one matrix into the nested format `layout.kind` (mwq with plane-scale
    `fit`, or bitplane), a block of rows at a time: every group lies within one row, so
    the blocks' results put side by side are the whole matrix's, bit for bit."""
    if layout.kind == "mwq":
        from d2moe.quant.mwq import quantize_mwq

        def quantize(block: np.ndarray) -> NestedMatrix:
            return quantize_mwq(block, b1=layout.b1, bK=layout.bK, group=layout.group, fit=fit)
    elif layout.kind == "bitplane":
        from d2moe.quant.bitplane import quantize_bitplane

        def quantize(block: np.ndarray) -> NestedMatrix:
            return quantize_bitplane(block, b1=layout.b1, bK=layout.bK, group=layout.group)
    else:
        raise UserError(f"{layout.kind!r} is not a nested format", field="format",
                        fix=f"use one of {', '.join(NESTED_KINDS)}")
    w = as_matrix(w)  # (each block's quantizer checks its values: one pass in all)
    rows, cols = w.shape
    # a multiple of 8 rows: every block but the last fills whole bytes of each plane's bit
    # stream, so the packed streams of the blocks concatenate into the matrix's stream
    step = max(8, BLOCK_BYTES // (4 * cols) // 8 * 8)
    if rows <= step:
        return quantize(w)
    parts = [quantize(w[r:r + step]) for r in range(0, rows, step)]
    return replace(parts[0], rows=rows,
                   planes=np.concatenate([p.planes for p in parts], axis=1),
                   scale=np.concatenate([p.scale for p in parts]),
                   zero=np.concatenate([p.zero for p in parts]),
                   plane_scale=np.concatenate([p.plane_scale for p in parts], axis=1))
