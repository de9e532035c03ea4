"""The one timeline format: `Event` rows written by the simulator and the executor alike.

Metrics, plots and the sim-versus-real comparison read these rows and nothing else.
Files: JSON lines (a header line, then one event per line) or .npz (one column per field).
"""

from __future__ import annotations

import json
import operator
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from d2moe.core.errors import UserError
from d2moe.core.fileio import atomic_write, require_file

if TYPE_CHECKING:
    from d2moe.core.jobs import Load, Run

TIMELINE_FORMAT = "d2moe.timeline"
TIMELINE_VERSION = 1

# Lanes and the kinds each carries. Evictions are instants on the memory lane;
# a stall is the compute lane waiting on a load (its `expert` is the awaited one); a
# `substitute` is a run whose tokens were routed to `expert` but ran on a similar resident
# expert (System 2). Request rows (concurrent serving) use `step` for the request id:
# `request` spans arrival to last token (`tokens` = output tokens, `bytes` = prompt
# tokens), `first_token` spans arrival to the first output token.
LANES = {
    "io": ("load", "prefetch"),
    "compute": ("run", "non_expert", "stall", "substitute"),
    "memory": ("evict",),
    "step": ("prefill", "decode"),
    "request": ("request", "first_token"),
}
KINDS = {kind: lane for lane, kinds in LANES.items() for kind in kinds}


class Event(NamedTuple):
    """One interval on one lane. Times in microseconds from the run's start.

    A NamedTuple (immutable, C-speed construction): backends emit one per job."""

    lane: str
    kind: str
    step: int
    layer: int  # -1 for whole-step rows
    expert: int  # -1 where no expert applies
    bits_from: int
    bits_to: int
    tokens: int
    bytes: int
    start_us: float
    end_us: float

    @property
    def dur_us(self) -> float:
        return self.end_us - self.start_us


def run_event(step: int, layer: int, run: Run, start_us: float, end_us: float) -> Event:
    """The compute row of one run (both backends): `substitute` when another expert's
    weights served it; bits_from = the bits its tokens were routed at, bits_to = run bits."""
    kind = "run" if run.served_by is None else "substitute"
    return Event("compute", kind, step, layer, run.key.expert, run.routed_bits, run.bits,
                 run.tokens, 0, start_us, end_us)


def load_event(step: int, load: Load, nbytes: int, start_us: float, end_us: float) -> Event:
    """The I/O row of one load or prefetch (both backends); `layer` is the loaded expert's."""
    return Event("io", "prefetch" if load.prefetch else "load", step, load.key.layer,
                 load.key.expert, load.bits_from, load.bits_to, 0, nbytes, start_us, end_us)


FIELDS = Event._fields
INT_FIELDS = tuple(n for n in FIELDS if n not in ("lane", "kind", "start_us", "end_us"))


@dataclass
class Timeline:
    """Events plus free-form metadata (backend, policy, model, profile, budget, ...)."""

    events: list[Event]
    meta: dict[str, Any]

    def of_kind(self, *kinds: str) -> list[Event]:
        return [e for e in self.events if e.kind in kinds]


def save_timeline(path: str | Path, timeline: Timeline) -> None:
    """Write `.jsonl` or `.npz` (by suffix), atomically."""
    path = Path(path)
    header = {"format": TIMELINE_FORMAT, "version": TIMELINE_VERSION, "meta": timeline.meta}
    if path.suffix == ".npz":
        cols: dict[str, np.ndarray] = {}
        for name in FIELDS:
            vals = [getattr(e, name) for e in timeline.events]
            if name in ("lane", "kind"):
                cols[name] = np.array(vals, dtype="U16")
            elif name in ("start_us", "end_us"):
                cols[name] = np.array(vals, dtype=np.float64)
            else:
                cols[name] = np.array(vals, dtype=np.int64)
        cols["header"] = np.array(json.dumps(header))
        with atomic_write(path, "wb") as f:
            np.savez_compressed(f, **cols)
        return
    with atomic_write(path, "w") as f:
        f.write(json.dumps(header) + "\n")
        for e in timeline.events:
            f.write(json.dumps(e._asdict()) + "\n")


def _check_header(path: Path, header: Any) -> dict[str, Any]:
    if not isinstance(header, dict) or header.get("format") != TIMELINE_FORMAT:
        raise UserError("not a d2moe timeline", path=str(path), field="format",
                        fix="pass a file written by `d2moe simulate` or `d2moe run`")
    if header.get("version") != TIMELINE_VERSION:
        raise UserError(f"timeline version {header.get('version')} is not supported "
                        f"(this d2moe reads version {TIMELINE_VERSION})", path=str(path),
                        field="version", fix="re-create the timeline with this d2moe")
    meta = header.get("meta") or {}
    if not isinstance(meta, dict):
        raise UserError(f"expected a mapping, got {type(meta).__name__}", path=str(path),
                        field="meta", fix=_FIX_DAMAGED)
    return dict(meta)


# what a damaged .npz raises while it is read: a bad CRC or directory (BadZipFile), bad
# compressed data (zlib.error), a cut-off member (EOFError), a bad .npy header or a pickled
# member (ValueError), a flipped flag or method byte (NotImplementedError / RuntimeError)
_DAMAGED_NPZ = (OSError, ValueError, EOFError, RuntimeError, zlib.error, zipfile.BadZipFile)
_FIX_DAMAGED = "re-create the timeline (d2moe simulate, run or validate)"
_FIELD_SET = set(FIELDS)


def load_timeline(path: str | Path) -> Timeline:
    """Read a timeline written by `save_timeline`, validating format, version and every
    row's fields (a damaged or foreign file is a UserError naming it, never a traceback)."""
    path = require_file(path, what="a timeline file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [n for n in ("header", *FIELDS) if n not in z.files]
                if "header" in missing:
                    raise UserError("no header: not a d2moe timeline", path=str(path),
                                    field="header", fix=_FIX_DAMAGED)
                meta = _check_header(path, json.loads(str(z["header"])))
                if missing:
                    raise UserError(f"no column {missing[0]!r}", path=str(path),
                                    field=missing[0], fix=_FIX_DAMAGED)
                cols = {n: z[n] for n in FIELDS}
        except _DAMAGED_NPZ as exc:
            reason = " ".join(str(exc).split())  # one line
            raise UserError(f"unreadable timeline .npz ({reason})", path=str(path),
                            fix=_FIX_DAMAGED) from None
    else:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError:
            raise UserError("not a timeline: binary, and not an .npz", path=str(path),
                            fix="pass events.npz or a .jsonl timeline (d2moe simulate, run "
                                "or validate --out)") from None
        try:
            meta = _check_header(path, json.loads(lines[0]) if lines else None)
            rows = [json.loads(line) for line in lines[1:] if line.strip()]
        except json.JSONDecodeError as exc:
            raise UserError(f"malformed timeline row: {exc}", path=str(path),
                            fix=_FIX_DAMAGED) from None
        get = operator.itemgetter(*FIELDS)
        try:
            if any(len(r) != len(FIELDS) for r in rows):
                raise TypeError
            values = [get(r) for r in rows]
        except (TypeError, KeyError):  # a row that is no object, or of other fields
            i, row = next((i, r) for i, r in enumerate(rows)
                          if not isinstance(r, dict) or r.keys() != _FIELD_SET)
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise UserError(f"row {i} has fields {got}, expected {list(FIELDS)}",
                            path=str(path), fix=_FIX_DAMAGED) from None
        cols = dict(zip(FIELDS, map(list, zip(*values, strict=True)), strict=True)) \
            if values else {n: [] for n in FIELDS}
    cols = _checked_columns(path, cols)
    return Timeline([Event(*row) for row in zip(*(cols[n] for n in FIELDS), strict=True)],
                    meta)


def _checked_columns(path: Path, cols: dict[str, Any]) -> dict[str, list]:
    """The columns as lists, checked as every metric and plot reads them: one length, a
    known (lane, kind) pair per row, whole numbers, finite times (a UserError naming the
    first bad field). Column-wise in numpy: a check per row would triple a large .npz's
    load time."""
    def bad(name: str, what: str) -> UserError:
        return UserError(what, path=str(path), field=name, fix=_FIX_DAMAGED)

    out = {n: cols[n].tolist() if isinstance(cols[n], np.ndarray) else cols[n]
           for n in ("lane", "kind")}
    arrays = {n: np.asarray(cols[n]) for n in (*INT_FIELDS, "start_us", "end_us")}
    n = len(out["lane"])
    if len(out["kind"]) != n or any(a.shape != (n,) for a in arrays.values()):
        raise bad("lane", "columns of different lengths")
    for name in ("lane", "kind"):
        odd = next((v for v in out[name] if not isinstance(v, str)), None)
        if odd is not None:
            raise bad(name, f"not text: {odd!r}")
    for lane, kind in set(zip(out["lane"], out["kind"], strict=True)):
        if KINDS.get(kind) != lane:
            raise bad("kind", f"kind {kind!r} on lane {lane!r}")
    for name in INT_FIELDS:
        if arrays[name].size and arrays[name].dtype.kind not in "iu":
            raise bad(name, f"not whole numbers ({arrays[name].dtype})")
        out[name] = arrays[name].tolist()
    for name in ("start_us", "end_us"):
        a = arrays[name]
        if a.size and (a.dtype.kind not in "iuf" or not np.isfinite(a).all()):
            raise bad(name, "not finite numbers")
        out[name] = a.astype(np.float64).tolist()
    return out


def shift(events: Sequence[Event], offset_us: float) -> list[Event]:
    """The same events moved by `offset_us` (used to start a timeline at zero)."""
    return [e._replace(start_us=e.start_us + offset_us, end_us=e.end_us + offset_us)
            for e in events]
