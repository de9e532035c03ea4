"""The nested store on disk: one data file per MoE layer and a JSON index (docs/formats-store.md).

Per expert, its levels follow one another in increasing bits: the base (b1), then planes
b1+1 .. bits_stored. A level holds the expert's tensors (w1, w3, w2) back to back and
starts on a 4096-byte boundary, so one plane of one expert is one contiguous read that
O_DIRECT accepts, and raising an expert from b to b' reads levels b+1..b' only. Each
(layer, expert, tensor, level) entry carries its offset, length and CRC-32, checked on read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import zlib
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from d2moe.core.errors import UserError
from d2moe.core.fileio import atomic_write
from d2moe.core.sizes import QuantLayout
from d2moe.core.spec import ModelSpec, spec_from_dict
from d2moe.quant.nested import NESTED_KINDS, NestedMatrix, decode_levels, encode_level

STORE_FORMAT = "d2moe.nested-store"
STORE_VERSION = 1
INDEX_NAME = "index.json"
ALIGN_BYTES = 4096  # O_DIRECT needs offsets (and lengths) aligned to the logical block size
TENSORS = ("w1", "w3", "w2")  # matching ModelSpec.expert_shapes
# a level at least this large is checksummed on a helper thread while the next level is read
# (zlib.crc32 releases the GIL): a Mixtral-shaped expert's 0->4 bit load 1.2-1.44x faster,
# a LLaMA-MoE one 1.04x; below it the hand-off costs more than the overlap gives (a tiny
# expert's 35 KiB levels: 0.85x). benchmarks/load_checksum.py
PIPELINE_MIN_BYTES = 1 << 20


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
class ByteRange:
    """One contiguous read: `nbytes` at `offset` of `file` (relative to the store)."""

    file: str
    offset: int
    nbytes: int
    bits: int  # the level it holds


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A fresh, writable, page-aligned uint8 buffer for an O_DIRECT read: a slice of a heap
    array. Not a fresh anonymous mapping: the heap reuses pages it already has, where each new
    mapping pays a page fault per 4 KiB as the read fills it (a Mixtral-shaped expert's 0->4
    bit load: 203 -> 94 ms median on the development VM; benchmarks/read_buffers.py)."""
    raw = np.empty(nbytes + ALIGN_BYTES, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN_BYTES
    return raw[start:start + nbytes]


def _first_damaged(items: list[tuple[StoreEntry, np.ndarray]]) -> StoreEntry | None:
    """The first entry whose bytes fail their CRC-32, else None."""
    for e, data in items:
        if zlib.crc32(data) != e.crc32:
            return e
    return None


def _align_up(n: int, align: int = ALIGN_BYTES) -> int:
    return -(-n // align) * align


def tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(rows, cols) of each stored expert tensor."""
    return dict(zip(TENSORS, spec.expert_shapes, strict=True))


class StoreWriter:
    """Writes a store layer by layer; `close()` writes the index (both atomically)."""

    def __init__(self, path: str | Path, spec: ModelSpec, layout: QuantLayout,
                 bits_stored: int | None = None) -> None:
        if layout.kind not in NESTED_KINDS or layout.scale_bytes != 2:
            raise UserError(f"a nested store needs kind mwq or bitplane with fp16 scales, got "
                            f"{layout.kind!r}", field="format", fix="use mwq or bitplane")
        self.path, self.spec, self.layout = Path(path), spec, layout
        self.bits_stored = layout.bK if bits_stored is None else bits_stored
        layout.check_bits(self.bits_stored)
        self.entries: list[StoreEntry] = []
        self.shapes = tensor_shapes(spec)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_layer(self, layer: int,
                    experts: Iterable[tuple[int, Mapping[str, NestedMatrix]]]) -> None:
        """Write one layer file from (expert, {tensor: matrix}) pairs, one expert in memory."""
        name = f"layer_{layer:03d}.bin"
        entries: list[StoreEntry] = []
        with atomic_write(self.path / name, "wb") as f:
            pos = 0
            for expert, mats in experts:
                self._check(layer, expert, mats)
                for bits in range(self.layout.b1, self.bits_stored + 1):
                    pad = _align_up(pos) - pos
                    f.write(b"\0" * pad)
                    pos += pad
                    for tensor in TENSORS:
                        data = encode_level(mats[tensor], bits)
                        f.write(data)
                        entries.append(StoreEntry(layer, expert, tensor, bits, name, pos,
                                                  len(data), zlib.crc32(data)))
                        pos += len(data)
        self.entries = [e for e in self.entries if e.layer != layer] + entries

    def _check(self, layer: int, expert: int, mats: Mapping[str, NestedMatrix]) -> None:
        where = f"layer {layer} expert {expert}"
        for tensor, shape in self.shapes.items():
            m = mats.get(tensor)
            if m is None:
                raise UserError(f"{where}: tensor {tensor} missing", field=tensor,
                                fix="pass w1, w3 and w2 of every expert")
            if (m.rows, m.cols) != shape or m.layout != self.layout \
                    or m.bits_stored < self.bits_stored:
                raise UserError(f"{where}: tensor {tensor} is {m.kind} {m.rows}x{m.cols} with "
                                f"{m.bits_stored} bits, expected {self.layout.kind} "
                                f"{shape[0]}x{shape[1]} with {self.bits_stored}", field=tensor,
                                fix="the checkpoint does not match the model spec")

    def close(self) -> Path:
        """Write the index; returns its path."""
        index = {
            "format": STORE_FORMAT, "version": STORE_VERSION,
            "spec": dataclasses.asdict(self.spec),
            "layout": dataclasses.asdict(self.layout),
            "bits_stored": self.bits_stored, "align_bytes": ALIGN_BYTES, "checksum": "crc32",
            "tensors": {t: list(s) for t, s in self.shapes.items()},
            "entries": [[e.layer, e.expert, e.tensor, e.bits, e.file, e.offset, e.nbytes,
                         e.crc32] for e in sorted(self.entries, key=_entry_order)],
        }
        target = self.path / INDEX_NAME
        with atomic_write(target, "w") as f:
            json.dump(index, f, indent=0)
        return target


def _entry_order(e: StoreEntry) -> tuple[int, int, int, int]:
    return e.layer, e.expert, e.bits, TENSORS.index(e.tensor)


class StoreReader:
    """Reads levels of experts from a store; thread-safe (os.pread on shared descriptors).

    `direct=True` asks for O_DIRECT (page cache bypassed) where the OS and file system
    allow it; `direct_io` says whether it is on. Levels of `pipeline_min_bytes` or more are
    checksummed on one helper thread while the next level is read (None: never).
    """

    def __init__(self, path: str | Path, *, verify: bool = True, direct: bool = False,
                 pipeline_min_bytes: int | None = PIPELINE_MIN_BYTES) -> None:
        self.path = Path(path)
        self.verify = verify
        self.pipeline_min_bytes = pipeline_min_bytes
        self._checker: ThreadPoolExecutor | None = None  # started at the first pipelined level
        index_path = self.path / INDEX_NAME
        if not index_path.is_file():
            raise UserError("not a nested store (no index.json)", path=str(self.path),
                            fix="create one with d2moe quantize --out DIR")
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"malformed JSON: {exc.msg} at line {exc.lineno}",
                            path=str(index_path), fix="re-run d2moe quantize") from None
        self._parse(index, str(index_path))
        self.direct_io = bool(direct) and hasattr(os, "O_DIRECT")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _parse(self, index: Any, where: str) -> None:
        if not isinstance(index, dict) or index.get("format") != STORE_FORMAT:
            raise UserError("not a nested store index", path=where, field="format",
                            fix="point at a directory written by d2moe quantize")
        if index.get("version") != STORE_VERSION:
            raise UserError(f"store version {index.get('version')} is not {STORE_VERSION}",
                            path=where, field="version", fix="re-run d2moe quantize")
        try:
            self.spec = spec_from_dict(index["spec"], path=where)
            self.layout = QuantLayout(**index["layout"])
            self.bits_stored = int(index["bits_stored"])
            self.shapes = {t: (int(s[0]), int(s[1])) for t, s in index["tensors"].items()}
            rows = [StoreEntry(int(a), int(b), str(c), int(d), str(e), int(f), int(g), int(h))
                    for a, b, c, d, e, f, g, h in index["entries"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"malformed index ({exc})", path=where,
                            fix="re-run d2moe quantize") from None
        self.entries = {(e.layer, e.expert, e.tensor, e.bits): e for e in rows}

    # -- what to read -------------------------------------------------------------------

    def _levels(self, bits_from: int, bits_to: int) -> range:
        """Levels that raise an expert from `bits_from` (0 = absent) to `bits_to`."""
        b1 = self.layout.b1
        if not b1 <= bits_to <= self.bits_stored:
            raise UserError(f"{bits_to} bits is outside the store's {b1}..{self.bits_stored}",
                            path=str(self.path), field="bits",
                            fix=f"ask for {b1}..{self.bits_stored} bits")
        if bits_from != 0 and not b1 <= bits_from <= bits_to:
            raise UserError(f"cannot raise from {bits_from} to {bits_to} bits",
                            path=str(self.path), field="bits_from",
                            fix=f"use 0 (absent) or {b1}..{bits_to}")
        return range(b1 if bits_from == 0 else bits_from + 1, bits_to + 1)

    def entries_for(self, layer: int, expert: int, bits_from: int,
                    bits_to: int) -> list[StoreEntry]:
        """Index entries, in file order, of the levels bits_from+1..bits_to of one expert."""
        out = []
        for bits in self._levels(bits_from, bits_to):
            for tensor in TENSORS:
                e = self.entries.get((layer, expert, tensor, bits))
                if e is None:
                    raise UserError(f"no entry for layer {layer} expert {expert} tensor "
                                    f"{tensor} bits {bits}", path=str(self.path),
                                    field="entries", fix="check layer/expert ids")
                out.append(e)
        return out

    def byte_ranges(self, layer: int, expert: int, bits_from: int, bits_to: int, *,
                    aligned: bool = False) -> list[ByteRange]:
        """One contiguous read per level; `aligned` rounds lengths up to 4096 for O_DIRECT."""
        ranges: list[ByteRange] = []
        for e in self.entries_for(layer, expert, bits_from, bits_to):
            last = ranges[-1] if ranges else None
            if last is not None and last.bits == e.bits and last.file == e.file \
                    and last.offset + last.nbytes == e.offset:
                ranges[-1] = dataclasses.replace(last, nbytes=last.nbytes + e.nbytes)
            else:
                ranges.append(ByteRange(e.file, e.offset, e.nbytes, e.bits))
        if aligned:
            ranges = [dataclasses.replace(r, nbytes=_align_up(r.nbytes)) for r in ranges]
        return ranges

    def expert_nbytes(self, layer: int, expert: int, bits_from: int, bits_to: int) -> int:
        """Payload bytes moved by a raise (equals core.sizes.load_bytes for the layout)."""
        return sum(e.nbytes for e in self.entries_for(layer, expert, bits_from, bits_to))

    # -- reading ------------------------------------------------------------------------

    def _fd(self, name: str) -> int:
        with self._lock:
            fd = self._fds.get(name)
            if fd is None:
                path = self.path / name
                flags = os.O_RDONLY | (os.O_DIRECT if self.direct_io else 0)
                try:
                    fd = os.open(path, flags)
                except FileNotFoundError:
                    raise UserError("data file missing", path=str(path),
                                    fix="re-run d2moe quantize") from None
                except OSError:  # file system refuses O_DIRECT (tmpfs): fall back
                    if not self.direct_io:
                        raise
                    self.direct_io = False
                    fd = os.open(path, os.O_RDONLY)
                self._fds[name] = fd
            return fd

    def read_range(self, r: ByteRange) -> memoryview:
        """The bytes of one range (O_DIRECT: into a page-aligned buffer)."""
        fd = self._fd(r.file)
        if self.direct_io:
            buf = aligned_buffer(_align_up(r.nbytes))
            got = os.preadv(fd, [buf], r.offset)
            return memoryview(buf)[:min(got, r.nbytes)]
        return memoryview(os.pread(fd, r.nbytes, r.offset))

    def read_planes(self, layer: int, expert: int, bits_from: int,
                    bits_to: int) -> dict[int, dict[str, np.ndarray]]:
        """{bits: {tensor: uint8 bytes}} of levels bits_from+1..bits_to, checksums verified.

        A large level's checksum runs on the helper thread while the next level is read;
        every check has finished (or raised, naming the first damaged entry) on return."""
        entries = self.entries_for(layer, expert, bits_from, bits_to)
        out: dict[int, dict[str, np.ndarray]] = {}
        by_level: dict[int, list[StoreEntry]] = {}
        for e in entries:
            by_level.setdefault(e.bits, []).append(e)
        ranges = self.byte_ranges(layer, expert, bits_from, bits_to)
        checks: list[Future[StoreEntry | None] | StoreEntry | None] = []
        for k, r in enumerate(ranges):
            buf = np.frombuffer(self.read_range(r), dtype=np.uint8)
            level = out.setdefault(r.bits, {})
            items = []
            for e in by_level[r.bits]:
                level[e.tensor] = data = buf[e.offset - r.offset:e.offset - r.offset + e.nbytes]
                if data.size != e.nbytes:  # a short read: the file was cut
                    raise self._damaged(e, "the data file ends inside")
                items.append((e, data))
            if not self.verify:
                continue
            min_bytes = self.pipeline_min_bytes
            if k + 1 < len(ranges) and min_bytes is not None and r.nbytes >= min_bytes:
                checks.append(self._helper().submit(_first_damaged, items))
            else:  # the last level (nothing left to overlap with) or a small one
                checks.append(_first_damaged(items))
        for c in checks:  # in file order: the first damaged entry is the one reported
            bad = c.result() if isinstance(c, Future) else c
            if bad is not None:
                raise self._damaged(bad, "checksum mismatch in")
        return out

    def _damaged(self, e: StoreEntry, what: str) -> UserError:
        return UserError(f"{what} {e.describe()}", path=str(self.path / e.file),
                         field="crc32", fix="the store is damaged: re-run d2moe quantize")

    def _helper(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._checker is None:
                self._checker = ThreadPoolExecutor(1, thread_name_prefix="d2moe-crc")
            return self._checker

    def read_expert(self, layer: int, expert: int, bits: int) -> dict[str, NestedMatrix]:
        """All tensors of one expert at `bits` bits as NestedMatrix objects."""
        levels = self.read_planes(layer, expert, 0, bits)
        order = sorted(levels)
        return {t: decode_levels(self.layout, *self.shapes[t], [levels[b][t] for b in order])
                for t in TENSORS}

    def close(self) -> None:
        """Close the data files and stop the checksum thread."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            checker, self._checker = self._checker, None
        if checker is not None:
            checker.shutdown(wait=True)

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cut_store(src: str | Path, dst: str | Path, bits: int) -> Path:
    """Copy a store keeping only the levels up to `bits` (a nested prefix of every expert)."""
    with StoreReader(src) as reader:
        writer = StoreWriter(dst, reader.spec, reader.layout, bits_stored=bits)
        layers = sorted({e.layer for e in reader.entries.values()})
        for layer in layers:
            experts = sorted({e.expert for e in reader.entries.values() if e.layer == layer})
            writer.write_layer(layer, ((e, reader.read_expert(layer, e, bits)) for e in experts))
        return writer.close()
