"""Summary metrics of one timeline, from its Event rows only (never backend internals).

Definitions (times in µs; the span is first step start to last step end):
- tokens/s per phase: Σ tokens of that phase's step rows / Σ their durations.
- busy time of a lane: length of the union of its intervals inside the span (compute counts
  `run`, `substitute` and `non_expert`, not `stall`; I/O counts `load` and `prefetch`);
  idle = span - busy.
- exposed I/O: Σ `stall` durations, the load time that compute could not hide.
- a demand is a (step, layer, expert) with at least one `run`; it is a hit when no `load`
  row has the same (step, layer, expert) (a prefetched expert counts as a hit). A demand
  served only by a `substitute` row (System 2) is neither: `substituted_runs` counts them.
- resident bytes: `meta["initial_resident_bytes"]` (default 0), + bytes at each load or
  prefetch start, - bytes at each evict.
- lower bound (method.md part 4, two-machine flow shop): per (step, layer),
  non_expert + max(Σ load, Σ run) (runs include substitutes); summed over all (step,
  layer). Only on-demand `load` rows enter it: prefetches are issued ahead, to hide behind
  earlier layers. It bounds the total from below when one I/O lane serves the loads and a
  layer's loads start after its router (its non_expert) has run, as both backends do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from d2moe.analysis.columns import (
    DECODE,
    EVICT,
    LOAD,
    NON_EXPERT,
    PREFETCH,
    PREFILL,
    RUN,
    STALL,
    SUBSTITUTE,
    EventColumns,
    clip,
    event_columns,
    union_length_us,
)
from d2moe.core.events import Timeline


@dataclass(frozen=True)
class Metrics:
    """What one run achieved. Times in µs, sizes in bytes, fractions in [0, 1]."""

    total_us: float
    steps: int
    decode_steps: int
    decode_tokens: int
    decode_us: float
    decode_tokens_per_s: float
    prefill_steps: int
    prefill_tokens: int
    prefill_us: float
    prefill_tokens_per_s: float
    io_busy_us: float
    io_idle_us: float
    io_bubble_pct: float
    compute_busy_us: float
    compute_idle_us: float
    compute_bubble_pct: float
    exposed_io_us: float
    demands: int
    hits: int
    hit_rate: float  # hits / demands; 1.0 when there is no demand (nothing missed)
    bytes_loaded: int  # load + prefetch
    bytes_prefetched: int
    bytes_evicted: int
    initial_resident_bytes: int
    peak_resident_bytes: int
    final_resident_bytes: int
    runs: int
    loads: int
    prefetches: int
    evicts: int
    stalls: int
    degraded_runs: int  # runs at fewer bits than their demand asked (bits_to < bits_from)
    substituted_runs: int  # runs served by another resident expert (System 2)
    mean_run_bits: float  # token-weighted bit-width of the runs
    bound_us: float
    gap_to_bound: float  # total_us / bound_us - 1
    decode_bound_us: float
    decode_gap_to_bound: float  # decode_us / decode_bound_us - 1
    per_step: dict[str, np.ndarray] | None = field(default=None, compare=False, repr=False)

    def as_dict(self, *, per_step: bool = False) -> dict[str, Any]:
        """JSON-ready dict (plain Python numbers; per-step arrays as lists when asked)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_step"}
        if per_step and self.per_step is not None:
            out["per_step"] = {k: v.tolist() for k, v in self.per_step.items()}
        return out


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def _keys(c: EventColumns, rows: np.ndarray) -> np.ndarray:
    """One int64 per (step, layer, expert) of the selected rows (layer, expert >= -1)."""
    width_e = int(c.expert.max()) + 2 if len(c) else 1
    width_l = int(c.layer.max()) + 2 if len(c) else 1
    return (c.step[rows] * width_l + (c.layer[rows] + 1)) * width_e + (c.expert[rows] + 1)


def _bound(c: EventColumns, decode_steps: np.ndarray,
           with_per_step: bool) -> tuple[float, float, np.ndarray | None]:
    """(bound over all (step, layer), bound over decode steps, per-step bound or None)."""
    rows = c.mask("non_expert", "run", "substitute", "load")
    if not rows.any():
        return 0.0, 0.0, None
    width_l = int(c.layer[rows].max()) + 2
    gkey = c.step[rows] * width_l + (c.layer[rows] + 1)
    uniq, inv = np.unique(gkey, return_inverse=True)
    kind, dur = c.kind[rows], c.dur_us[rows]
    n = uniq.size
    ne = np.bincount(inv, weights=np.where(kind == NON_EXPERT, dur, 0.0), minlength=n)
    run = np.bincount(inv, weights=np.where((kind == RUN) | (kind == SUBSTITUTE), dur, 0.0),
                      minlength=n)
    load = np.bincount(inv, weights=np.where(kind == LOAD, dur, 0.0), minlength=n)
    per_group = ne + np.maximum(load, run)
    group_step = uniq // width_l
    is_decode = np.isin(group_step, decode_steps)
    per_step = None
    if with_per_step:
        steps, sinv = np.unique(group_step, return_inverse=True)
        per_step = np.stack([steps.astype(np.float64),
                             np.bincount(sinv, weights=per_group, minlength=steps.size)])
    return float(per_group.sum()), float(per_group[is_decode].sum()), per_step


def resident_curve(timeline: Timeline) -> tuple[np.ndarray, np.ndarray]:
    """Resident bytes over time as a step function: value `bytes[i]` holds from `t_us[i]`.

    The first point is the span's start at the initial resident bytes, the last the span's
    end at the final resident bytes. Changes at the same instant are merged (frees before
    allocations: an eviction precedes the load it makes room for), so the curve's maximum
    is the true peak.
    """
    return _resident_curve(event_columns(timeline), _initial_bytes(timeline))


def _initial_bytes(timeline: Timeline) -> int:
    return int(timeline.meta.get("initial_resident_bytes", 0) or 0)


def _resident_curve(c: EventColumns, initial: int) -> tuple[np.ndarray, np.ndarray]:
    t0, t1 = c.step_span_us()
    alloc = (c.kind == LOAD) | (c.kind == PREFETCH)
    free = c.kind == EVICT
    t = np.concatenate((c.start_us[free], c.start_us[alloc]))
    delta = np.concatenate((-c.bytes[free], c.bytes[alloc])).astype(np.int64)
    is_alloc = np.concatenate((np.zeros(free.sum(), bool), np.ones(alloc.sum(), bool)))
    if t.size == 0:
        return np.array([t0, t1]), np.array([initial, initial], dtype=np.int64)
    order = np.lexsort((is_alloc, t))  # by time, frees first at ties
    t, level = t[order], initial + np.cumsum(delta[order])
    last = np.r_[t[1:] != t[:-1], True]  # keep the level after all changes at one instant
    t, level = t[last], level[last]
    # Close the curve at the span's end (or the last change, if later) at the final level.
    start, end = min(t0, float(t[0])), max(t1, float(t[-1]))
    return np.r_[start, t, end], np.r_[np.int64(initial), level, level[-1]]


def compute_metrics(timeline: Timeline, *, per_step: bool = False) -> Metrics:
    """Metrics of `timeline` (see the module docstring for every definition)."""
    c = event_columns(timeline)
    kind, dur = c.kind, c.dur_us
    t0, t1 = c.step_span_us()
    total = t1 - t0

    is_dec, is_pre = kind == DECODE, kind == PREFILL
    dec_tokens, pre_tokens = int(c.tokens[is_dec].sum()), int(c.tokens[is_pre].sum())
    dec_us, pre_us = float(dur[is_dec].sum()), float(dur[is_pre].sum())

    io = (kind == LOAD) | (kind == PREFETCH)
    comp = (kind == RUN) | (kind == SUBSTITUTE) | (kind == NON_EXPERT)
    io_busy = union_length_us(*clip(c.start_us[io], c.end_us[io], t0, t1))
    comp_busy = union_length_us(*clip(c.start_us[comp], c.end_us[comp], t0, t1))

    is_run, is_load, is_stall = kind == RUN, kind == LOAD, kind == STALL
    demand_keys = np.unique(_keys(c, is_run))
    missed = np.isin(demand_keys, _keys(c, is_load))
    demands, hits = int(demand_keys.size), int((~missed).sum())

    initial = _initial_bytes(timeline)
    _, level = _resident_curve(c, initial)
    run_tokens = c.tokens[is_run]

    decode_step_ids = np.unique(c.step[is_dec])
    bound, dec_bound, step_bound = _bound(c, decode_step_ids, per_step)
    steps_table = None
    if per_step:
        steps_table = _per_step(c, step_bound)

    return Metrics(
        total_us=total,
        steps=int((is_dec | is_pre).sum()),
        decode_steps=int(is_dec.sum()),
        decode_tokens=dec_tokens,
        decode_us=dec_us,
        decode_tokens_per_s=_ratio(dec_tokens, dec_us) * 1e6,
        prefill_steps=int(is_pre.sum()),
        prefill_tokens=pre_tokens,
        prefill_us=pre_us,
        prefill_tokens_per_s=_ratio(pre_tokens, pre_us) * 1e6,
        io_busy_us=io_busy,
        io_idle_us=total - io_busy,
        io_bubble_pct=100.0 * _ratio(total - io_busy, total),
        compute_busy_us=comp_busy,
        compute_idle_us=total - comp_busy,
        compute_bubble_pct=100.0 * _ratio(total - comp_busy, total),
        exposed_io_us=float(dur[is_stall].sum()),
        demands=demands,
        hits=hits,
        hit_rate=hits / demands if demands else 1.0,
        bytes_loaded=int(c.bytes[io].sum()),
        bytes_prefetched=int(c.bytes[kind == PREFETCH].sum()),
        bytes_evicted=int(c.bytes[kind == EVICT].sum()),
        initial_resident_bytes=initial,
        peak_resident_bytes=int(level.max()),
        final_resident_bytes=int(level[-1]),
        runs=int(is_run.sum()),
        loads=int(is_load.sum()),
        prefetches=int((kind == PREFETCH).sum()),
        evicts=int((kind == EVICT).sum()),
        stalls=int(is_stall.sum()),
        degraded_runs=int((c.bits_to[is_run] < c.bits_from[is_run]).sum()),
        substituted_runs=int((kind == SUBSTITUTE).sum()),
        mean_run_bits=_ratio(float((c.bits_to[is_run] * run_tokens).sum()),
                             float(run_tokens.sum())),
        bound_us=bound,
        gap_to_bound=total / bound - 1.0 if bound > 0 else 0.0,
        decode_bound_us=dec_bound,
        decode_gap_to_bound=dec_us / dec_bound - 1.0 if dec_bound > 0 else 0.0,
        per_step=steps_table,
    )


def _per_step(c: EventColumns, step_bound: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per step row: step, is_decode, start_us, dur_us, tokens, stall_us, bound_us."""
    rows = np.flatnonzero((c.kind == DECODE) | (c.kind == PREFILL))
    rows = rows[np.argsort(c.start_us[rows], kind="stable")]
    step = c.step[rows]
    stall = c.kind == STALL
    stall_by_step = {int(s): float(d) for s, d in
                     zip(*_sum_by(c.step[stall], c.dur_us[stall]), strict=True)}
    bound_by_step: dict[int, float] = {}
    if step_bound is not None:
        bound_by_step = {int(s): float(b) for s, b in zip(*step_bound, strict=True)}
    return {
        "step": step,
        "is_decode": c.kind[rows] == DECODE,
        "start_us": c.start_us[rows],
        "dur_us": c.dur_us[rows],
        "tokens": c.tokens[rows],
        "stall_us": np.array([stall_by_step.get(int(s), 0.0) for s in step]),
        "bound_us": np.array([bound_by_step.get(int(s), 0.0) for s in step]),
    }


def _sum_by(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, inv = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inv, weights=values, minlength=uniq.size)


def compare(a: Metrics, b: Metrics) -> dict[str, float]:
    """Relative error of `a` against reference `b` per field, in %: 100 (a - b) / |b|.

    0 where both are 0; ±inf where only the reference is 0.
    """
    out: dict[str, float] = {}
    for name, va in a.as_dict().items():
        vb = getattr(b, name)
        if vb == 0:
            out[name] = 0.0 if va == 0 else math.copysign(math.inf, va)
        else:
            out[name] = 100.0 * (va - vb) / abs(vb)
    return out
