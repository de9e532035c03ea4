"""PackedExpertMatrix: one expert matrix in the kernels' plane-major layout (torch tensors).

Word-major ("K-major"): planes[j] is an int32 [ceil(cols/32), rows] array whose element
[w, n] holds columns 32*w .. 32*w+31 of row n of plane j (bit t = column 32*w + t): 32
weights per int32 per plane, rows padded to whole words. Scales are fp16 [groups, rows].
With this orientation a tile of words [BLOCK_W, BLOCK_N] is one coalesced load and every
thread reuses each activation across the rows it holds. From the store's row-major bit
stream this is a reinterpretation as int32 [rows, words] (no bit shuffling when cols is a
multiple of 32) plus one transpose, done once per load.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from d2moe.core.errors import UserError

if TYPE_CHECKING:
    import torch

    from d2moe.quant.nested import NestedMatrix


class Geometry:
    """Mixin: a [rows, cols] matrix in 32-column words and `group`-column scale groups
    (the class provides `cols` and `group`)."""

    cols: int
    group: int

    @property
    def words(self) -> int:
        """int32 words per row of one plane: ceil(cols / 32)."""
        return math.ceil(self.cols / 32)

    @property
    def groups(self) -> int:
        """Groups per row: ceil(cols / group)."""
        return math.ceil(self.cols / self.group)


class NestedGeometry(Geometry):
    """Mixin: Geometry plus the bit-width check of a matrix holding planes b1..bits_held."""

    b1: int

    @property
    def bits_held(self) -> int:
        raise NotImplementedError

    def check_bits(self, bits: int) -> None:
        """Raise a UserError unless b1 <= bits <= bits_held."""
        if not self.b1 <= bits <= self.bits_held:
            raise UserError(f"{bits} bits is outside {self.b1}..{self.bits_held} resident",
                            field="bits", fix="load the missing planes first")


@dataclass(frozen=True, eq=False)
class PackedExpertMatrix(NestedGeometry):
    """A [rows, cols] nested matrix resident at `bits_held` bits, ready for the kernels."""

    kind: str  # mwq | bitplane
    b1: int
    bK: int
    group: int
    rows: int
    cols: int
    # int32 [bits_held, words, rows], or one contiguous [words, rows] tensor per plane (the
    # CUDA pool's views of its level blocks: no gathering copy; the kernels take either)
    planes: torch.Tensor | tuple[torch.Tensor, ...]
    scale: torch.Tensor  # float16 [groups, rows]
    zero: torch.Tensor  # float16 [groups, rows]
    # float16 [bits_held - b1, groups, rows] (mwq; [0, ...] else), or one [groups, rows] each
    plane_scale: torch.Tensor | tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        """Separate planes are checked once here, not on every kernel call: each a contiguous
        int32 [words, rows] on the scales' device."""
        if isinstance(self.planes, tuple):
            import torch

            want = (self.words, self.rows)
            for j, plane in enumerate(self.planes):
                if plane.dtype != torch.int32 or tuple(plane.shape) != want \
                        or not plane.is_contiguous() or plane.device != self.scale.device:
                    raise UserError(
                        f"plane {j} is {plane.dtype} {tuple(plane.shape)} on {plane.device}, "
                        f"expected contiguous int32 {want} on {self.scale.device}",
                        field="planes",
                        fix="pass word-major planes as PackedExpertMatrix.from_nested builds them")

    @property
    def bits_held(self) -> int:
        """Planes resident: the highest bit-width this object serves."""
        return len(self.planes)

    @property
    def device(self) -> torch.device:
        """Where the tensors live."""
        return self.scale.device

    def nbytes_at(self, bits: int) -> int:
        """Bytes the kernels read from this matrix at `bits` (planes + scales)."""
        self.check_bits(bits)
        per_plane = self.rows * self.words * 4
        params = 2 * self.rows * self.groups * 2
        extra = (bits - self.b1) * self.rows * self.groups * 2 if self.kind == "mwq" else 0
        return bits * per_plane + params + extra

    def to(self, device: str | torch.device) -> PackedExpertMatrix:
        """A copy on `device`."""
        return PackedExpertMatrix(
            kind=self.kind, b1=self.b1, bK=self.bK, group=self.group, rows=self.rows,
            cols=self.cols, planes=_to(self.planes, device), scale=self.scale.to(device),
            zero=self.zero.to(device), plane_scale=_to(self.plane_scale, device))

    @classmethod
    def from_nested(cls, m: NestedMatrix, bits: int | None = None,
                    device: str | torch.device = "cpu") -> PackedExpertMatrix:
        """Pack the first `bits` (default: all held) planes of a NestedMatrix."""
        import torch

        bits = m.bits_stored if bits is None else bits
        m.check_bits(bits)
        planes = np.stack([plane_words(m.planes[j], m.rows, m.cols).T for j in range(bits)])

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        return cls(kind=m.kind, b1=m.b1, bK=m.bK, group=m.group, rows=m.rows, cols=m.cols,
                   planes=t(planes), scale=t(m.scale.T), zero=t(m.zero.T),
                   plane_scale=t(m.plane_scale[:max(bits - m.b1, 0)].transpose(0, 2, 1)))


def _to(t: torch.Tensor | tuple[torch.Tensor, ...],
        device: str | torch.device) -> torch.Tensor | tuple[torch.Tensor, ...]:
    return tuple(a.to(device) for a in t) if isinstance(t, tuple) else t.to(device)


def plane_words(stream: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A packed little-endian bit stream of a [rows, cols] plane -> int32 [rows, ceil(cols/32)]."""
    words = math.ceil(cols / 32)
    if cols % 32 == 0 and sys.byteorder == "little":  # the stream already is the word array
        return np.frombuffer(stream.tobytes(), dtype=np.int32).reshape(rows, words).copy()
    bits = np.unpackbits(stream, count=rows * cols, bitorder="little").reshape(rows, cols)
    bits = np.pad(bits, ((0, 0), (0, words * 32 - cols)))
    packed = np.packbits(bits, axis=1, bitorder="little")  # [rows, words*4] bytes
    return packed.view("<i4").astype(np.int32).reshape(rows, words)
