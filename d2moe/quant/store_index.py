"""The nested store's index (index.json): what it holds and how it is checked when a store is
opened (docs/formats-store.md, "index.json"): format, version, SHA-256, then its structure
(spec, layout, tensor shapes, and every entry's ids, file name, offset, length and layout).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from d2moe.core.errors import UserError
from d2moe.core.fileio import STORE_FORMAT, json_sha256
from d2moe.core.sizes import QuantLayout
from d2moe.core.spec import ModelSpec, spec_from_dict
from d2moe.quant.nested import NESTED_KINDS, level_nbytes
from d2moe.quant.source import parse_source

STORE_VERSION = 1
ALIGN_BYTES = 4096  # O_DIRECT needs offsets (and lengths) aligned to the logical block size
TENSORS = ("w1", "w3", "w2")  # matching ModelSpec.expert_shapes
DAMAGED_FIX = "the store is damaged: re-run d2moe quantize"


@dataclass(frozen=True)
class StoreEntry:
    """One level (`bits`: b1 = base, else plane `bits`) of one tensor of one expert."""

    layer: int
    expert: int
    tensor: str
    bits: int
    file: str
    offset: int
    nbytes: int
    crc32: int

    def describe(self) -> str:
        """A name for error messages."""
        return (f"layer {self.layer} expert {self.expert} tensor {self.tensor} "
                f"bits {self.bits} ({self.file} @ {self.offset})")


@dataclass(frozen=True)
class StoreIndex:
    """A checked index: the model spec, the layout, the widest level stored, each tensor's
    (rows, cols), the entries by (layer, expert, tensor, bits), and the source record."""

    spec: ModelSpec
    layout: QuantLayout
    bits_stored: int
    shapes: dict[str, tuple[int, int]]
    entries: dict[tuple[int, int, str, int], StoreEntry]
    source: dict[str, str] | None  # the checkpoint it came from (quant/source.py)


def parse_index(index: Any, where: str) -> StoreIndex:
    """Check a loaded index.json (format, version, SHA-256, then its structure); `where`
    names it in errors, each a UserError naming the field."""
    if not isinstance(index, dict) or index.get("format") != STORE_FORMAT:
        raise UserError("not a nested store index", path=where, field="format",
                        fix="point at a directory written by d2moe quantize")
    if index.get("version") != STORE_VERSION:
        raise UserError(f"store version {index.get('version')} is not {STORE_VERSION}",
                        path=where, field="version", fix="re-run d2moe quantize")
    # a version-1 index written before the digest existed has none: its structure is
    # still checked below (docs/formats-store.md, "index.json")
    if "sha256" in index and index["sha256"] != index_digest(index):
        raise UserError("checksum mismatch: index.json was damaged or edited", path=where,
                        field="sha256", fix=DAMAGED_FIX)
    if not isinstance(index.get("spec"), dict):
        raise UserError("missing or not a mapping", path=where, field="spec",
                        fix=DAMAGED_FIX)
    spec = spec_from_dict(index["spec"], path=where)
    layout = _parse_layout(index.get("layout"), where)
    bits_stored = _whole(index.get("bits_stored"), layout.b1, layout.bK, where,
                         "bits_stored")
    for key, want in (("align_bytes", ALIGN_BYTES), ("checksum", "crc32")):
        if index.get(key) != want:
            raise UserError(f"{index.get(key)!r} is not {want!r}", path=where, field=key,
                            fix=DAMAGED_FIX)
    shapes = tensor_shapes(spec)
    want_shapes = {t: list(s) for t, s in shapes.items()}
    if index.get("tensors") != want_shapes:
        raise UserError(f"{index.get('tensors')!r} does not match the model spec's "
                        f"{want_shapes}", path=where, field="tensors", fix=DAMAGED_FIX)
    entries = _parse_entries(index.get("entries"), spec, layout, bits_stored, shapes, where)
    return StoreIndex(spec, layout, bits_stored, shapes, entries,
                      parse_source(index.get("source"), where))


def tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(rows, cols) of each stored expert tensor."""
    return dict(zip(TENSORS, spec.expert_shapes, strict=True))


def index_digest(index: Mapping[str, Any]) -> str:
    """SHA-256 of an index's fields other than `sha256`, as canonical JSON (sorted keys, no
    spaces: the pattern of d2moe/experts/store.py), so any edited or damaged field shows."""
    return json_sha256(index, without="sha256")


def _whole(value: Any, lo: int, hi: int | None, where: str, field: str) -> int:
    """`value` if it is a whole number in lo..hi (hi None: no upper bound), else a UserError
    naming the index and `field`."""
    if type(value) is not int or value < lo or (hi is not None and value > hi):
        want = f"{lo}" if hi == lo else f"a whole number in {lo}..{'' if hi is None else hi}"
        raise UserError(f"{value!r} is not {want}", path=where, field=field, fix=DAMAGED_FIX)
    return value


def _parse_layout(raw: Any, where: str) -> QuantLayout:
    """The index's `layout`: a nested kind, 1 <= b1 <= bK <= 8, group >= 1, fp16 scales."""
    names = [f.name for f in dataclasses.fields(QuantLayout)]
    if not isinstance(raw, dict) or sorted(raw) != sorted(names):
        raise UserError(f"expected a mapping of {', '.join(names)}", path=where, field="layout",
                        fix=DAMAGED_FIX)
    if raw["kind"] not in NESTED_KINDS:
        raise UserError(f"{raw['kind']!r} is not a nested format ({' or '.join(NESTED_KINDS)})",
                        path=where, field="layout.kind", fix=DAMAGED_FIX)
    b1 = _whole(raw["b1"], 1, 8, where, "layout.b1")
    bK = _whole(raw["bK"], b1, 8, where, "layout.bK")
    group = _whole(raw["group"], 1, None, where, "layout.group")
    scale_bytes = _whole(raw["scale_bytes"], 2, 2, where, "layout.scale_bytes")
    return QuantLayout(kind=raw["kind"], b1=b1, bK=bK, group=group, scale_bytes=scale_bytes)


def _bare_name(value: Any) -> bool:
    """Whether `value` names a file inside the store directory itself."""
    return isinstance(value, str) and value not in ("", ".", "..") \
        and not any(c in value for c in "/\\\0")


def _parse_entries(raw: Any, spec: ModelSpec, layout: QuantLayout, bits_stored: int,
                   shapes: Mapping[str, tuple[int, int]], where: str
                   ) -> dict[tuple[int, int, str, int], StoreEntry]:
    """The index's entries, each checked against the spec and layout: ids in range, a bare
    file name, offset >= 0, the byte length the layout implies, one 4096-aligned contiguous
    run per level (what `byte_ranges` and O_DIRECT rely on)."""
    if not isinstance(raw, list):
        raise UserError("expected a list", path=where, field="entries", fix=DAMAGED_FIX)
    b1 = layout.b1
    out: dict[tuple[int, int, str, int], StoreEntry] = {}
    for i, row in enumerate(raw):
        field = f"entries[{i}]"
        if not isinstance(row, list) or len(row) != 8:
            raise UserError("expected [layer, expert, tensor, bits, file, offset, nbytes, "
                            "crc32]", path=where, field=field, fix=DAMAGED_FIX)
        layer = _whole(row[0], 0, spec.layers - 1, where, f"{field}.layer")
        expert = _whole(row[1], 0, spec.experts - 1, where, f"{field}.expert")
        tensor = row[2]
        if tensor not in TENSORS:
            raise UserError(f"tensor {tensor!r} is not one of {', '.join(TENSORS)}",
                            path=where, field=f"{field}.tensor", fix=DAMAGED_FIX)
        bits = _whole(row[3], b1, bits_stored, where, f"{field}.bits")
        if not _bare_name(row[4]):
            raise UserError(f"file {row[4]!r} is not a file name inside the store",
                            path=where, field=f"{field}.file", fix=DAMAGED_FIX)
        offset = _whole(row[5], 0, None, where, f"{field}.offset")
        want = level_nbytes(layout, *shapes[tensor], bits)
        if row[6] != want:
            raise UserError(f"{row[6]!r} bytes, but level {bits} of {tensor} "
                            f"{'x'.join(map(str, shapes[tensor]))} is {want} bytes in "
                            f"this layout", path=where, field=f"{field}.nbytes", fix=DAMAGED_FIX)
        crc = _whole(row[7], 0, 2 ** 32 - 1, where, f"{field}.crc32")
        e = StoreEntry(layer, expert, tensor, bits, row[4], offset, want, crc)
        if (layer, expert, tensor, bits) in out:
            raise UserError(f"a second entry for {e.describe()}", path=where, field=field,
                            fix=DAMAGED_FIX)
        out[(layer, expert, tensor, bits)] = e
    for (layer, expert, tensor, bits), e in out.items():
        k = TENSORS.index(tensor)
        prev = out.get((layer, expert, TENSORS[k - 1], bits)) if k else None
        if (k == 0 and e.offset % ALIGN_BYTES) or (prev is not None and (
                prev.file != e.file or prev.offset + prev.nbytes != e.offset)):
            raise UserError(f"{e.describe()} does not follow the level's layout (each level "
                            f"starts on a {ALIGN_BYTES}-byte boundary, its tensors back to back)",
                            path=where, field="entries", fix=DAMAGED_FIX)
    return out
