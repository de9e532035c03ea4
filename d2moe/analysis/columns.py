"""A columnar view of a timeline's Event rows: one numpy array per field, built once.

Metrics, plots and exports read these arrays so that a million events cost seconds, not
minutes. Kinds are small integer codes (`KIND_CODES`); the lane follows from the kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

import numpy as np

from d2moe.core.errors import UserError
from d2moe.core.events import FIELDS, INT_FIELDS, KINDS, Timeline

KIND_NAMES: tuple[str, ...] = tuple(KINDS)
KIND_CODES: dict[str, int] = {k: i for i, k in enumerate(KIND_NAMES)}
PREFILL, DECODE = KIND_CODES["prefill"], KIND_CODES["decode"]
RUN, NON_EXPERT, STALL = KIND_CODES["run"], KIND_CODES["non_expert"], KIND_CODES["stall"]
LOAD, PREFETCH, EVICT = KIND_CODES["load"], KIND_CODES["prefetch"], KIND_CODES["evict"]
SUBSTITUTE = KIND_CODES["substitute"]


@dataclass(frozen=True, eq=False)
class EventColumns:
    """Event fields as parallel arrays (times float64 µs, the rest int64; kind as codes)."""

    kind: np.ndarray
    step: np.ndarray
    layer: np.ndarray
    expert: np.ndarray
    bits_from: np.ndarray
    bits_to: np.ndarray
    tokens: np.ndarray
    bytes: np.ndarray
    start_us: np.ndarray
    end_us: np.ndarray

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    @property
    def dur_us(self) -> np.ndarray:
        """end - start of every row."""
        return self.end_us - self.start_us

    def mask(self, *kinds: str) -> np.ndarray:
        """Boolean mask of rows whose kind is one of `kinds`."""
        return np.isin(self.kind, [KIND_CODES[k] for k in kinds])

    def select(self, rows: np.ndarray) -> EventColumns:
        """The subset of rows picked by a boolean mask or an index array."""
        return EventColumns(**{name: getattr(self, name)[rows] for name in _FIELDS})

    def step_span_us(self) -> tuple[float, float]:
        """(first step start, last step end); all events' span when there are no step rows."""
        steps = self.mask("prefill", "decode")
        if steps.any():
            return float(self.start_us[steps].min()), float(self.end_us[steps].max())
        if len(self) == 0:
            return 0.0, 0.0
        return float(self.start_us.min()), float(self.end_us.max())


_FIELDS = tuple(n for n in FIELDS if n != "lane")  # the lane follows from the kind


def event_columns(timeline: Timeline) -> EventColumns:
    """Columns of `timeline.events`; raises UserError on an unknown kind or a negative span."""
    events = timeline.events
    n = len(events)
    try:
        kind = np.fromiter(map(KIND_CODES.__getitem__, map(attrgetter("kind"), events)),
                           dtype=np.int8, count=n)
    except KeyError as exc:
        raise UserError(f"unknown event kind {exc.args[0]!r} (known: {', '.join(KIND_NAMES)})",
                        field="kind", fix="re-create the timeline with this d2moe") from None
    cols: dict[str, np.ndarray] = {"kind": kind}
    for name in INT_FIELDS:
        cols[name] = np.fromiter(map(attrgetter(name), events), dtype=np.int64, count=n)
    for name in ("start_us", "end_us"):
        cols[name] = np.fromiter(map(attrgetter(name), events), dtype=np.float64, count=n)
    bad = np.flatnonzero(cols["end_us"] < cols["start_us"])
    if bad.size:
        e = events[int(bad[0])]
        raise UserError(f"{bad.size} event(s) end before they start, first: {e}",
                        field="end_us", fix="re-create the timeline")
    return EventColumns(**cols)


def union_length_us(start_us: np.ndarray, end_us: np.ndarray) -> float:
    """Length of the union of intervals [start, end) (overlaps counted once)."""
    if start_us.size == 0:
        return 0.0
    order = np.argsort(start_us, kind="stable")
    s, e = start_us[order], end_us[order]
    # Running max of earlier ends: the part of interval i before it is already covered.
    covered_to = np.maximum.accumulate(e)
    prev = np.concatenate(([-np.inf], covered_to[:-1]))
    return float(np.maximum(0.0, e - np.maximum(s, prev)).sum())


def clip(start_us: np.ndarray, end_us: np.ndarray, lo_us: float,
         hi_us: float) -> tuple[np.ndarray, np.ndarray]:
    """Intervals clipped to [lo, hi] (an interval outside becomes empty)."""
    s = np.clip(start_us, lo_us, hi_us)
    return s, np.maximum(s, np.clip(end_us, lo_us, hi_us))
