"""Export timelines to the Chrome trace event format (JSON), which Perfetto opens.

Format: https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU
One process (pid) per timeline, one thread (tid) per lane named by "thread_name" metadata
rows; interval events are "X" complete events (ts, dur in µs), evictions "i" instants, and
resident bytes a "C" counter track. A lane whose intervals overlap (several I/O lanes) is
split into numbered tracks, because Perfetto expects the slices of one thread to nest.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from d2moe.analysis.metrics import resident_curve
from d2moe.analysis.timeline_plot import timeline_label
from d2moe.core.errors import UserError
from d2moe.core.events import Event, Timeline
from d2moe.core.fileio import atomic_write

# Track order top to bottom; a lane's extra tracks (overlaps) get tid base*100 + k.
LANE_TIDS = {"step": 1, "compute": 2, "io": 3, "memory": 4}
COUNTER = "resident MiB"


def _name(e: Event) -> str:
    """Slice title: what ran, where, at how many bits."""
    where = f"L{e.layer}E{e.expert}"
    if e.kind in ("prefill", "decode"):
        return f"{e.kind} {e.step}"
    if e.kind == "non_expert":
        return f"L{e.layer} non-expert"
    if e.kind == "run":
        return f"{where} {e.bits_to}b"
    if e.kind == "substitute":
        return f"{where} by a similar expert, {e.bits_to}b"
    if e.kind == "stall":
        return f"stall on {where}"
    return f"{e.kind} {where} {e.bits_from}->{e.bits_to}b"


def _args(e: Event) -> dict[str, int]:
    return {"step": e.step, "layer": e.layer, "expert": e.expert, "bits_from": e.bits_from,
            "bits_to": e.bits_to, "tokens": e.tokens, "bytes": e.bytes}


def _tracks(events: list[Event]) -> list[int]:
    """Greedy interval partitioning: the track index of each event (0 when none overlap)."""
    order = sorted(range(len(events)), key=lambda i: (events[i].start_us, events[i].end_us))
    free: list[tuple[float, int]] = []  # (end of its last slice, track)
    out = [0] * len(events)
    n_tracks = 0
    for i in order:
        e = events[i]
        if free and free[0][0] <= e.start_us:
            _, track = heapq.heappop(free)
        else:
            track, n_tracks = n_tracks, n_tracks + 1
        out[i] = track
        heapq.heappush(free, (e.end_us, track))
    return out


def chrome_events(timeline: Timeline, pid: int, label: str) -> list[dict[str, Any]]:
    """The trace events of one timeline as process `pid` named `label`."""
    out: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": label}},
        {"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": pid}},
    ]
    by_lane: dict[str, list[Event]] = {}
    for e in timeline.events:
        by_lane.setdefault(e.lane if e.lane in LANE_TIDS else "memory", []).append(e)
    for lane, events in sorted(by_lane.items(), key=lambda kv: LANE_TIDS[kv[0]]):
        base = LANE_TIDS[lane]
        tracks = [0] * len(events) if lane == "memory" else _tracks(events)
        n_tracks = max(tracks) + 1
        for k in range(n_tracks):
            tid = base if k == 0 else base * 100 + k
            name = lane if n_tracks == 1 else f"{lane} #{k + 1}"
            out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                        "args": {"name": name}})
            out.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                        "args": {"sort_index": base * 100 + k}})
        for e, k in zip(events, tracks, strict=True):
            tid = base if k == 0 else base * 100 + k
            row = {"name": _name(e), "cat": e.kind, "pid": pid, "tid": tid, "ts": e.start_us,
                   "args": _args(e)}
            if e.kind == "evict":
                row.update(ph="i", s="t")
            else:
                row.update(ph="X", dur=e.dur_us)
            out.append(row)
    t_us, level = resident_curve(timeline)
    out.extend({"ph": "C", "name": COUNTER, "pid": pid, "ts": t,
                "args": {"MiB": b / 2**20}} for t, b in zip(t_us.tolist(), level.tolist(),
                                                            strict=True))
    return out


def export_chrome(timelines: Timeline | Sequence[Timeline], path: str | Path, *,
                  labels: Sequence[str] | None = None) -> Path:
    """Write one or more timelines as a Chrome/Perfetto trace JSON, atomically."""
    items = [timelines] if isinstance(timelines, Timeline) else list(timelines)
    labels = list(labels) if labels is not None else [timeline_label(t) for t in items]
    if len(labels) != len(items):
        raise UserError(f"{len(labels)} labels for {len(items)} timelines", field="labels",
                        fix="give one label per timeline")
    trace_events: list[dict[str, Any]] = []
    for pid, (t, label) in enumerate(zip(items, labels, strict=True), start=1):
        trace_events.extend(chrome_events(t, pid, label))
    doc = {"traceEvents": trace_events, "displayTimeUnit": "ms",
           "otherData": {f"{pid}: {label}": t.meta
                         for pid, (t, label) in enumerate(zip(items, labels, strict=True),
                                                          start=1)}}
    path = Path(path)
    with atomic_write(path, "w") as f:
        f.write(json.dumps(doc, separators=(",", ":"), default=str))  # C encoder: faster
    return path
