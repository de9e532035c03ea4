"""The nested store on disk: one data file per MoE layer and a JSON index (docs/formats-store.md).

Per expert, its levels follow one another in increasing bits: the base (b1), then planes
b1+1 .. bits_stored. A level holds the expert's tensors (w1, w3, w2) back to back and
starts on a 4096-byte boundary, so one plane of one expert is one contiguous read that
O_DIRECT accepts, and raising an expert from b to b' reads levels b+1..b' only. Each
(layer, expert, tensor, level) entry carries its offset, length and CRC-32, checked on read;
index.json carries the SHA-256 of its other fields, and its structure (sizes, offsets, file
names) is checked when a store is opened.

A store is written into a hidden sibling directory and moved into place at `close()`, so an
interrupted (re-)quantize leaves the old store as it was (docs/formats-store.md, "Writing").
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import stat
import threading
import weakref
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from d2moe.core.errors import UserError
from d2moe.core.fileio import (
    STORE_FORMAT,
    STORE_INDEX,
    atomic_write,
    check_outside_store,
    ensure_dir,
    malformed_json,
    path_error,
    remove_stale_temps,
    temp_prefix,
)
from d2moe.core.sizes import QuantLayout
from d2moe.core.spec import ModelSpec
from d2moe.quant.nested import (
    NESTED_KINDS,
    NestedMatrix,
    decode_levels,
    encode_level,
)
from d2moe.quant.store_files import (
    beside_store,
    fsync_dir,
    replace_dir,
)
from d2moe.quant.store_index import (  # (the index's names, also imported from here)
    ALIGN_BYTES,
    DAMAGED_FIX,
    STORE_VERSION,
    TENSORS,
    StoreEntry,
    index_digest,
    parse_index,
    tensor_shapes,
)

# a level at least this large is checksummed on a helper thread while the next level is read
# (zlib.crc32 releases the GIL): a Mixtral-shaped expert's 0->4 bit load 1.2-1.44x faster,
# a LLaMA-MoE one 1.04x; below it the hand-off costs more than the overlap gives (a tiny
# expert's 35 KiB levels: 0.85x). benchmarks/load_checksum.py
PIPELINE_MIN_BYTES = 1 << 20


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


def read_groups(sizes: Sequence[int], pipeline_min_bytes: int | None) -> list[list[int]]:
    """Which of a raise's levels (`sizes`: bytes, in file order) each read takes, as index
    lists: a level of `pipeline_min_bytes` or more is read alone (its checksum then runs on
    the helper thread while the next read goes on); a run of smaller neighbours is one read,
    since below that size the disk's per-request latency costs more than a check that
    overlaps (a tiny expert's 0->4 bit raise: one 62 KB read, not three of 14-35 KB).
    The store reader and the simulator (`sim.costs`) both take their reads from here."""
    groups: list[list[int]] = []
    for i, n in enumerate(sizes):
        small = pipeline_min_bytes is None or n < pipeline_min_bytes
        if small and groups and groups[-1][-1] == i - 1 and \
                (pipeline_min_bytes is None or sizes[i - 1] < pipeline_min_bytes):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def read_sizes(sizes: Sequence[int], pipeline_min_bytes: int | None) -> list[int]:
    """Bytes of each read that fetches levels of `sizes` (`read_groups`)."""
    return [sum(sizes[i] for i in g) for g in read_groups(sizes, pipeline_min_bytes)]


def _first_damaged(items: list[tuple[StoreEntry, np.ndarray]]) -> StoreEntry | None:
    """The first entry whose bytes fail their CRC-32, else None."""
    for e, data in items:
        if zlib.crc32(data) != e.crc32:
            return e
    return None


def _align_up(n: int, align: int = ALIGN_BYTES) -> int:
    return -(-n // align) * align


class StoreWriter:
    """Writes a store layer by layer; `close()` writes the index and moves the store into place.

    Everything is written into a hidden directory beside `path` (same parent, so the final
    rename stays on one file system); a store already at `path` is replaced only by
    `close()`, keeping its other files (e.g. `router/`, `expert_stats.json`). `abort()`, an
    exception inside `with StoreWriter(...)`, or the writer being dropped unclosed removes the
    hidden directory and leaves `path` untouched. The hidden directory's name carries the
    writer's pid (`.NAME.PID-HOST.XXXXXXXX.tmp`): one left by a killed writer is removed by
    the next writer of `path` (`core.fileio.remove_stale_temps`), a live one's never.
    """

    def __init__(self, path: str | Path, spec: ModelSpec, layout: QuantLayout,
                 bits_stored: int | None = None,
                 source: Mapping[str, str] | None = None) -> None:
        if layout.kind not in NESTED_KINDS or layout.scale_bytes != 2:
            raise UserError(f"a nested store needs kind mwq or bitplane with fp16 scales, got "
                            f"{layout.kind!r}", field="format", fix="use mwq or bitplane")
        self.path, self.spec, self.layout = Path(path), spec, layout
        self.source = dict(source) if source is not None else None  # quant/source.py
        self.bits_stored = layout.bK if bits_stored is None else bits_stored
        layout.check_bits(self.bits_stored)
        self.entries: list[StoreEntry] = []
        self.shapes = tensor_shapes(spec)
        # a link to a store is followed: the directory it names is the one replaced
        self._target = Path(os.path.realpath(self.path))
        if self._target.exists() and not self._target.is_dir():
            raise UserError("exists and is not a directory", path=str(self.path),
                            fix="name a new directory or an existing store")
        if self._target.is_dir() and not (self._target / STORE_INDEX).is_file() \
                and any(self._target.iterdir()):  # never swap away a directory of the user's
            raise UserError("is a directory with files in it but no nested store",
                            path=str(self.path),
                            fix="name a new or empty directory, or an existing store to replace")
        check_outside_store(self._target)  # never a store inside another store
        self._check_others()
        ensure_dir(self._target.parent)
        remove_stale_temps(self._target, old=True)  # what a killed writer of it left
        tmp = self._target.with_name(f"{temp_prefix(self._target)}{secrets.token_hex(4)}.tmp")
        try:
            os.mkdir(tmp, 0o777)  # the umask applies, as for any new directory
        except OSError as exc:
            raise path_error(exc, self.path, "cannot write the store beside it") from None
        self.tmp = tmp
        self._cleanup = weakref.finalize(self, shutil.rmtree, tmp, ignore_errors=True)

    def _check_others(self) -> None:
        """Refuse to carry a router or statistics, made from a store of other expert weights
        (another recorded source), into this one: they would pass for this store's."""
        old = beside_store(self._target)
        if self.source is None or old is None or not isinstance(old[0], dict):
            return  # no old store, or one (or a new one) without a source: nothing to tell
        (source, others) = old
        if others and source.get("expert_sha256") != self.source["expert_sha256"]:
            raise UserError(f"holds {', '.join(others)}, made from a store of other expert "
                            f"weights ({source.get('path')})", path=str(self.path),
                            fix="move them away first, or name another output directory")

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()  # a no-op after close(); else nothing half-written stays behind

    def write_layer(self, layer: int,
                    experts: Iterable[tuple[int, Mapping[str, NestedMatrix]]]) -> None:
        """Write one layer file from (expert, {tensor: matrix}) pairs, one expert in memory."""
        if not self._cleanup.alive:
            raise UserError("the store writer is closed", path=str(self.path),
                            fix="open a new StoreWriter")
        name = f"layer_{layer:03d}.bin"
        entries: list[StoreEntry] = []
        with atomic_write(self.tmp / name, "wb") as f:
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
        """Write the index (with its SHA-256), move the store into place and return the
        index's path there."""
        try:
            index = {
                "format": STORE_FORMAT, "version": STORE_VERSION,
                "spec": dataclasses.asdict(self.spec),
                "layout": dataclasses.asdict(self.layout),
                "bits_stored": self.bits_stored, "align_bytes": ALIGN_BYTES,
                "checksum": "crc32",
                "tensors": {t: list(s) for t, s in self.shapes.items()},
                "entries": [[e.layer, e.expert, e.tensor, e.bits, e.file, e.offset, e.nbytes,
                             e.crc32] for e in sorted(self.entries, key=_entry_order)],
            }
            if self.source is not None:
                index["source"] = self.source
            index["sha256"] = index_digest(index)
            with atomic_write(self.tmp / STORE_INDEX, "w") as f:
                json.dump(index, f, indent=0)
            fsync_dir(self.tmp)
            replace_dir(self.tmp, self._target)
        except BaseException:
            self.abort()
            raise
        self._cleanup.detach()
        return self.path / STORE_INDEX

    def abort(self) -> None:
        """Remove the unfinished store (a no-op after `close()`); `path` stays as it was."""
        self._cleanup()


def _entry_order(e: StoreEntry) -> tuple[int, int, int, int]:
    return e.layer, e.expert, e.bits, TENSORS.index(e.tensor)


class StoreReader:
    """Reads levels of experts from a store; thread-safe (os.pread on shared descriptors).

    `direct=True` asks for O_DIRECT (page cache bypassed) where the OS and file system
    allow it; `direct_io` says whether it is on. Levels of `pipeline_min_bytes` or more are
    read alone and checksummed on one helper thread while the next read goes on (None:
    never); with `coalesce`, neighbouring smaller levels of one raise are one read
    (`read_groups`; False: one read per level, the reader before 2026-11-24).
    """

    def __init__(self, path: str | Path, *, verify: bool = True, direct: bool = False,
                 pipeline_min_bytes: int | None = PIPELINE_MIN_BYTES,
                 coalesce: bool = True) -> None:
        self.path = Path(path)
        self.verify = verify
        self.pipeline_min_bytes = pipeline_min_bytes
        self.coalesce = coalesce
        self._checker: ThreadPoolExecutor | None = None  # started at the first pipelined level
        index_path = self.path / STORE_INDEX
        if not index_path.is_file():
            raise UserError("not a nested store (no index.json)", path=str(self.path),
                            fix="create one with d2moe quantize --out DIR")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError("not a UTF-8 JSON file", path=str(index_path),
                            fix=DAMAGED_FIX) from None
        except json.JSONDecodeError as exc:
            raise UserError(malformed_json(exc),
                            path=str(index_path), fix=DAMAGED_FIX) from None
        except OSError as exc:
            raise path_error(exc, index_path, "cannot read it") from None
        self._parse(index, str(index_path))
        self.direct_io = bool(direct) and hasattr(os, "O_DIRECT")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _parse(self, index: Any, where: str) -> None:
        """Check the index (`store_index.parse_index`) and keep what it holds."""
        ix = parse_index(index, where)
        self.spec, self.layout, self.bits_stored = ix.spec, ix.layout, ix.bits_stored
        self.shapes, self.entries, self.source = ix.shapes, ix.entries, ix.source

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
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # a directory opens, then reads
                    os.close(fd)  # fail with EISDIR and no file name
                    raise UserError("not a regular file (a directory?)", path=str(path),
                                    fix="re-run d2moe quantize")
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

        Reads as `reads` groups the levels; a large read's checksums run on the helper
        thread while the next read goes on; every check has finished (or raised, naming the
        first damaged entry) on return."""
        entries = self.entries_for(layer, expert, bits_from, bits_to)
        out: dict[int, dict[str, np.ndarray]] = {}
        by_level: dict[int, list[StoreEntry]] = {}
        for e in entries:
            by_level.setdefault(e.bits, []).append(e)
        reads = self.reads(self.byte_ranges(layer, expert, bits_from, bits_to))
        checks: list[Future[StoreEntry | None] | StoreEntry | None] = []
        for k, (span, levels) in enumerate(reads):
            buf = np.frombuffer(self.read_range(span), dtype=np.uint8)
            items = []
            for r in levels:
                level = out.setdefault(r.bits, {})
                for e in by_level[r.bits]:
                    at = e.offset - span.offset
                    level[e.tensor] = data = buf[at:at + e.nbytes]
                    if data.size != e.nbytes:  # a short read: the file was cut
                        raise self._damaged(e, "the data file ends inside")
                    items.append((e, data))
            if not self.verify:
                continue
            min_bytes = self.pipeline_min_bytes
            if k + 1 < len(reads) and min_bytes is not None and span.nbytes >= min_bytes:
                checks.append(self._helper().submit(_first_damaged, items))
            else:  # the last read (nothing left to overlap with) or a small one
                checks.append(_first_damaged(items))
        for c in checks:  # in file order: the first damaged entry is the one reported
            bad = c.result() if isinstance(c, Future) else c
            if bad is not None:
                raise self._damaged(bad, "checksum mismatch in")
        return out

    def reads(self, ranges: Sequence[ByteRange]) -> list[tuple[ByteRange, list[ByteRange]]]:
        """The reads that fetch `ranges` (one raise's levels, in file order): (the span read,
        the levels in it), grouped by `read_groups` where `coalesce` is on and neighbours
        lie back to back in one file (only the alignment padding between them)."""
        groups = read_groups([r.nbytes for r in ranges], self.pipeline_min_bytes) \
            if self.coalesce else [[i] for i in range(len(ranges))]
        out: list[tuple[ByteRange, list[ByteRange]]] = []
        for group in groups:
            levels = [ranges[group[0]]]
            for r in (ranges[i] for i in group[1:]):
                prev = levels[-1]
                gap = r.offset - (prev.offset + prev.nbytes)
                if r.file == prev.file and 0 <= gap < ALIGN_BYTES:
                    levels.append(r)
                else:  # not back to back (a store written otherwise): a read of its own
                    out.append((_span(levels), levels))
                    levels = [r]
            out.append((_span(levels), levels))
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
        return {t: decode_levels(self.layout, *self.shapes[t], [levels[b][t] for b in order],
                                 path=str(self.path),
                                 where=f"layer {layer} expert {expert} tensor {t}")
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
    with StoreReader(src) as reader, \
            StoreWriter(dst, reader.spec, reader.layout, bits_stored=bits,
                        source=reader.source) as writer:
        layers = sorted({e.layer for e in reader.entries.values()})
        for layer in layers:
            experts = sorted({e.expert for e in reader.entries.values() if e.layer == layer})
            writer.write_layer(layer, ((e, reader.read_expert(layer, e, bits)) for e in experts))
        return writer.close()


def _span(levels: Sequence[ByteRange]) -> ByteRange:
    """One read covering `levels` (back to back in one file), named for the first's bits."""
    first, last = levels[0], levels[-1]
    return ByteRange(first.file, first.offset, last.offset + last.nbytes - first.offset,
                     first.bits)
