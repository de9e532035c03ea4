"""The one timeline format: `Event` rows written by the simulator and the executor alike.

Metrics, plots and the sim-versus-real comparison read these rows and nothing else.
Files: JSON lines (a header line, then one event per line) or .npz (one column per field).
"""

from __future__ import annotations

import json
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
    return dict(header.get("meta") or {})


def load_timeline(path: str | Path) -> Timeline:
    """Read a timeline written by `save_timeline`, validating format and version."""
    path = require_file(path, what="a timeline file")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            meta = _check_header(path, json.loads(str(z["header"])))
            cols = {n: z[n].tolist() for n in FIELDS}
        events = [Event(*row) for row in zip(*(cols[n] for n in FIELDS), strict=True)]
        return Timeline(events, meta)
    with open(path) as f:
        lines = f.read().splitlines()
    try:
        meta = _check_header(path, json.loads(lines[0]) if lines else None)
        events = [Event(**json.loads(line)) for line in lines[1:] if line.strip()]
    except (json.JSONDecodeError, TypeError) as exc:
        raise UserError(f"malformed timeline row: {exc}", path=str(path),
                        fix="re-create the timeline") from None
    return Timeline(events, meta)


def shift(events: Sequence[Event], offset_us: float) -> list[Event]:
    """The same events moved by `offset_us` (used to start a timeline at zero)."""
    return [e._replace(start_us=e.start_us + offset_us, end_us=e.end_us + offset_us)
            for e in events]
