"""The sweep's results table: JSON lines appended one complete, fsynced line at a time.

A killed run can leave at most one torn line, the last; reading ignores it and
`TableWriter` cuts it off before appending, so the file stays one row per line.
Each line carries `row_sha256`, a digest of the rest of the row checked on read, so a
hand-edited value is an error rather than a number in the figures.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from d2moe.core.errors import UserError
from d2moe.core.fileio import atomic_write, ensure_dir, json_sha256

TABLE_NAME = "table.jsonl"
CSV_NAME = "table.csv"
LOCK_NAME = ".sweep.lock"
# Statuses: `ok`, `does-not-fit` (the budget cannot hold what the cell needs) and `error`
# (other bad input). A resumed sweep skips `ok` and `does-not-fit` cells, reruns `error` ones.
FINISHED = ("ok", "does-not-fit")
# The cell's own columns, first in the CSV; the metrics follow.
CELL_COLUMNS = ("cell_id", "status", "message", "trace", "model", "profile", "profile_source",
                "run_kind", "budget", "budget_bytes", "policy", "bits", "layout", "b1", "bK",
                "group", "host_cache", "step_limit", "engine", "wall_s", "sim_wall_s",
                "finished_at", "oracle_hit_rate")
DIGEST = "row_sha256"  # in table.jsonl only: the first 16 hex digits of row_digest(row)
_FIX_EDITED = "delete the line (the sweep then reruns its cell)"
_FIX_FOREIGN = "give the sweep an output directory of its own (--out), or move this file away"


def row_digest(row: dict[str, Any]) -> str:
    """The first 16 hex digits of the SHA-256 of the row's canonical JSON (sorted keys, no
    spaces, without `row_sha256`): what a reader recomputes to notice an edited row."""
    return json_sha256(row, without=DIGEST, default=_plain)[:16]


def table_line(row: dict[str, Any]) -> str:
    """A row as the table stores it: one line of JSON with its `row_sha256` (no newline).
    Benchmarks that write JSON-lines tables of their own use it too, so edits show."""
    line = json.dumps({**row, DIGEST: row_digest(row)}, default=_plain, allow_nan=True)
    if "\n" in line:
        raise ValueError("a table row must serialize to one line")
    return line


def read_rows(path: str | Path, *, any_rows: bool = False) -> tuple[list[dict[str, Any]], int]:
    """The complete rows of a table (without their digests) and the byte length they span.

    A torn last line, from a killed run, is left out (`TableWriter` cuts it off). Anything
    else that is not a row is a UserError, so that someone else's file is never appended
    to or cut: a line that is not a JSON object, an object with neither a digest nor a
    `cell_id`, or a row whose `row_sha256` does not match it
    (edited by hand). A row without the digest (written before digests) is taken as it is.
    `any_rows` (reading only, as the plots do): any JSON object is a row, the sweep's or a
    benchmark's; digests are still checked where a row has one."""
    path = Path(path)
    if not path.exists():
        return [], 0
    *complete, tail = path.read_bytes().split(b"\n")  # after the last newline: torn or b""
    if any_rows:  # reading only: a last row without its newline is a row, else torn
        complete, tail = complete + [tail] * (_parse(tail) is not None), b""
    if not _torn(tail, last_of_file=True):
        raise UserError(f"line {len(complete) + 1} is not a row of a sweep table",
                        path=str(path), fix=_FIX_FOREIGN)
    fix_edited = "delete or repair that line" if any_rows else _FIX_EDITED
    rows: list[dict[str, Any]] = []
    good = 0
    for i, line in enumerate(complete):
        row = _parse(line) if line.strip() else {}
        if row is None:
            if i == len(complete) - 1 and not tail and _torn(line):  # cut by a crash
                break
            raise UserError(f"line {i + 1} is not a JSON object", path=str(path),
                            fix=fix_edited if rows or any_rows else _FIX_FOREIGN)
        if row and DIGEST not in row and not any_rows and not _row_shaped(row):
            raise UserError(f"line {i + 1} is not a row of a sweep table (no cell_id or "
                            f"{DIGEST})", path=str(path), fix=_FIX_FOREIGN)
        # a complete line that parses was not torn: a digest mismatch, even on the last
        # line, is an edit (pop: the rows returned hold the data only)
        if DIGEST in row and row_digest(row) != row.pop(DIGEST):
            raise UserError(f"line {i + 1} does not match its {DIGEST} (edited after it "
                            "was written?)", path=str(path), field=DIGEST, fix=fix_edited)
        if row:
            rows.append(row)
        good += len(line) + 1
    return rows, good


def _parse(line: bytes) -> dict[str, Any] | None:
    """A line's JSON object, or None when it is none."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) else None


def _row_shaped(row: dict[str, Any]) -> bool:
    return "cell_id" in row  # every row the sweep writes has one


_ROW_START = b'{"cell_id": "'  # how every row the sweep writes begins (cells.Cell.fields)


def _torn(line: bytes, last_of_file: bool = False) -> bool:
    """Whether bytes can be our row cut short by a crash: nothing, the NUL bytes some file
    systems leave after a power loss, the first bytes of a row, or a row's start that does
    not parse; at the end of the file, also a whole row whose newline was not written.
    Anything else (someone's JSON, even cut short) is not ours to cut."""
    body = line.strip(b"\0")
    if not body or _ROW_START.startswith(body):
        return True
    if not body.startswith(_ROW_START):
        return False
    return last_of_file or _parse(body) is None


def latest(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last row per cell id (a rerun `error` cell supersedes its earlier row)."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        out[str(row.get("cell_id", len(out)))] = row
    return out


def finished_ids(rows: Iterable[dict[str, Any]]) -> set[str]:
    """Cell ids whose latest row is finished (`ok` or `does-not-fit`): skipped on resume."""
    return {cid for cid, row in latest(rows).items() if row.get("status") in FINISHED}


class TableWriter:
    """Appends rows to a table: one json.dumps line each, flushed and fsynced."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        ensure_dir(self.path.parent)
        self.rows, good = read_rows(self.path)
        self._f: IO[str] = open(self.path, "a+")  # noqa: SIM115 (closed in close())
        if self.path.stat().st_size > good:  # cut a torn last line off before appending
            self._f.truncate(good)
            self._sync()

    def append(self, row: dict[str, Any]) -> None:
        """Write one row and its digest as one complete line, then flush and fsync."""
        self._f.write(table_line(row) + "\n")
        self._sync()
        self.rows.append(row)

    def _sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        """Close the file (rows written so far are already on disk)."""
        self._f.close()

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(value: Any) -> Any:
    """numpy scalars and other number-likes as plain Python numbers."""
    if hasattr(value, "item"):
        return value.item()
    return float(value)


def columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The CSV's columns: the cell's own first, then the rest in first-seen order."""
    seen: dict[str, None] = dict.fromkeys(CELL_COLUMNS)
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """(Re)write `rows` as CSV atomically."""
    cols = columns(rows)
    with atomic_write(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="", extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if v is None else v for k, v in row.items()})
    return Path(path)


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold a lock on `out` so two sweeps never append to one table at once."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    ensure_dir(out)
    with open(out / LOCK_NAME, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError("another sweep is writing to this directory", path=str(out),
                            fix="wait for it, or pass another --out") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
