"""The probes of `d2moe profile` that run the real backend (`StreamingExperts`) and read its
timeline rows: the non-expert rows (head apart) and a decode layer's first-run excess with
every expert resident, the non-expert row right after loads, the lanes' fixed costs (from
the same decode steps), and each lane's speed while the other is busy (the overlap
speeds)."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from d2moe.core.sizes import QuantLayout
from d2moe.core.spec import ModelSpec
from d2moe.profiles.timing import Bar, clear_excess

FULL_MODEL_PROBE_BYTES = 256 * 2**20  # a spec this small is probed whole, else cut


def resident_probe_spec(spec: ModelSpec, layout: QuantLayout,
                        cap_bytes: int = FULL_MODEL_PROBE_BYTES) -> ModelSpec:
    """The spec that `measure_non_expert` runs: the spec itself when its weights (non-expert
    and every expert at the widest bits) fit in `cap_bytes`, so that each layer finds the
    caches as the other layers of a real run leave them; else cut to 2 layers of at most 4
    experts (a Mixtral-sized model: each layer's weights exceed the caches anyway)."""
    from d2moe.core.sizes import all_experts_bytes

    if spec.non_expert_bytes + all_experts_bytes(spec, layout.bK, layout) <= cap_bytes:
        return spec
    experts = min(spec.experts, 4)
    return dataclasses.replace(spec, layers=min(spec.layers, 2), experts=experts,
                               top_k=min(spec.top_k, 2, experts))


@dataclasses.dataclass(frozen=True)
class ResidentRows:
    """What `measure_non_expert` read from the real backend's rows: with every expert
    resident, (tokens, us per layer, head us) of the non-expert rows, how much longer (us) the
    first run of a decode layer took than the layer's later runs
    (`executor.layer_first_run_us`), and how much longer a decode layer's non-expert row took
    right after a plan with loads, in a run under a small budget
    (`executor.non_expert_after_load_us`)."""

    non_expert: list[tuple[int, float, float]]
    layer_first_run_us: float
    non_expert_after_load_us: float = 0.0
    loaded_rows: tuple[Any, ...] = ()  # the decode steps under a quarter of the experts
    resident_rows: tuple[Any, ...] = ()  # the steps with every expert resident


def measure_non_expert(spec: ModelSpec, layout: QuantLayout, device: Any,
                       tokens: Sequence[int], repeats: int, scratch: Path,
                       bar: Bar, *, sync_rows: bool = False, dtype: Any = None
                       ) -> ResidentRows:
    """The non-expert rows the executor itself records, and the first-run excess per layer.

    A random-weight copy of the model (`resident_probe_spec`: whole where small) runs through
    `StreamingExperts` with every expert resident, so the rows hold what a real run's do:
    attention, router, the backend's bookkeeping; layer 0's row also holds the step's head
    (LM head, sampling, embedding), kept apart (`non_expert_per_layer`).
    Decode steps in every repeat (1 token; the lanes' costs and the overlap speeds come from
    them, whatever `tokens` asks); more tokens: one prefill per generation. The expert
    table times runs back to back; here the first run of each decode layer follows the
    layer's non-expert slice, and what it takes beyond the layer's later runs is kept too.
    In turn with each resident round, the same model decodes under a quarter of the experts
    (FIFO: each layer loads): its rows right after a plan with loads, against the resident
    rows, give `non_expert_after_load_us`, its loads and runs the overlap speeds, and both
    backends' decode layers the lanes' fixed costs (`lane_costs_from_rows`) (on a large
    shape, which loads one or two experts a step, it decodes on until MIN_BESIDE loads
    overlapped runs, at most MORE_DECODES more times). `sync_rows`: both backends', as
    the executor's runs will have it; `dtype`: the model's (None: float32).
    """
    import torch

    from d2moe.core.sizes import all_experts_bytes
    from d2moe.executor.backend import StreamingExperts
    from d2moe.executor.pool import ExpertPool
    from d2moe.model.generate import generate
    from d2moe.model.transformer import Transformer
    from d2moe.policies import make_policy
    from d2moe.profiles.probe_store import write_random_store
    from d2moe.quant.store import StoreReader

    small = resident_probe_spec(spec, layout)
    bits = min(layout.b1 + 2, layout.bK)
    reader = StoreReader(write_random_store(scratch / "d2moe-probe-model", small, layout),
                         direct=True)
    model = Transformer(small, with_experts=False)
    model.init_weights(seed=0)
    model.to(device, dtype or torch.float32)
    every = all_experts_bytes(small, bits, layout)
    backend = StreamingExperts(reader, make_policy("hebf"),
                               ExpertPool(small, layout, every, device), bits=bits,
                               sync_rows=sync_rows)
    one = every // (small.layers * small.experts)
    few = max(small.top_k, small.layers * small.experts // 4) * one
    loaded = StreamingExperts(reader, make_policy("fifo"), ExpertPool(small, layout, few, device),
                              bits=bits, sync_rows=sync_rows)
    gen = torch.Generator().manual_seed(5)

    def prompt(n: int) -> list[int]:
        return torch.randint(0, spec.vocab, (n,), generator=gen).tolist()

    def run(on: Any, n: int, new_tokens: int) -> None:
        on.resume()  # the two backends take turns: the other's run is in no row of this one
        generate(model, prompt(n), new_tokens, backend=on)

    run(backend, 8, 2 + small.layers)  # warm: every expert in
    run(loaded, 2, 3)
    first, first_loaded = backend.step + 1, loaded.step + 1
    for _ in range(repeats):
        # decode steps whatever `tokens` asks: the lanes' costs and the overlap speeds come
        # from them (the 1-token table row too, when asked)
        run(backend, 2, 3)  # two decode steps
        run(loaded, 2, 6)  # five: the overlap speeds' samples (few per step on a large
        #                    shape, where each layer loads one or two)
        for n in tokens:
            if n != 1:
                run(backend, n, 1)
            bar.step("non-expert")
    for _ in range(MORE_DECODES):  # a large shape loads one or two
        # experts a step: decode on, in turn as above, until the overlap speeds have enough
        # loads beside runs to read (six in a Mixtral-shaped profile gave io 0.57-1.0)
        if _loads_beside_runs([e for e in loaded.events if e.step >= first_loaded]) \
                >= MIN_BESIDE:
            break
        run(backend, 2, 3)
        run(loaded, 2, 6)
    timeline = backend.finish()
    loaded_events = [e for e in loaded.finish().events if e.step >= first_loaded]
    reader.close()
    events = [e for e in timeline.events if e.step >= first]
    return ResidentRows(non_expert_per_layer(events, tokens), layer_first_run_excess(events),
                        after_load_excess(loaded_events, events),
                        tuple(e for e in loaded_events if e.lane in ("io", "compute")),
                        tuple(e for e in events if e.lane in ("io", "compute")))


MIN_ALONE = 3  # jobs alone a lane needs before its nominal times are scaled to them
MIN_BESIDE, MORE_DECODES = 16, 8  # loads beside runs the loaded probe aims for; at most
# this many more of its five-step decodes to get them


def _loads_beside_runs(events: Sequence[Any]) -> int:
    """How many loads in `events` overlap a run: the samples of the overlap speeds."""
    runs = [e for e in events if e.kind in ("run", "substitute")]
    return sum(1 for ld in events if ld.kind in ("load", "prefetch") and any(
        r.start_us < ld.end_us and r.end_us > ld.start_us for r in runs))


def overlap_speeds_from_rows(events: Sequence[Any], load_us: Callable[[Any, float], float],
                             run_us: Callable[[Any, bool, bool], float]) -> dict[str, float]:
    """How the lanes slow each other, read from a real run's rows as the fluid model of
    `sim/contention.py` has it. The I/O lane: a load's nominal time = its time alone + speed
    x its time beside runs, summed over the loads that overlapped (a ratio of sums: the
    lane's total time is kept, and a few stalled loads weigh by their length). The compute
    lane: a run beside a load takes its nominal time plus a wait, `overlap_run_wait_us`, the
    mean excess of the runs that overlapped a load (compute speed 1): on the development VM
    such a tiny run took about 100 us more than alone whichever kernel ran it, where a speed
    would shrink with a faster kernel (docs/results/fidelity.md, 2026-11-24).

    `load_us(row, idle_us)`: a load row's nominal time (cold cost after `idle_us` included);
    `run_us(row, first_after_its_load, first_of_plan)`: a run row's. How the two lanes share
    the CPU depends on which of them was running first (benchmarks/overlap_patterns.py), so
    the speeds come from the interleavings the executor itself produces, not from a
    synthetic pattern. 1.0 for a lane that never overlapped.

    A lane's nominal times are first scaled by how long its jobs that overlapped nothing
    took against theirs (at least `MIN_ALONE` such jobs), so a speed compares jobs beside
    the other lane with jobs alone in the same rows: the figures above were measured
    seconds to minutes earlier, and on a shared machine a slow stretch would otherwise be
    read as contention (a 1-layer Mixtral-shaped probe, runs alone 1.34x their table time:
    compute speed 0.05 without, 0.44 with; docs/results/fidelity.md)."""
    loads = sorted((e for e in events if e.kind in ("load", "prefetch")),
                   key=lambda e: e.start_us)
    runs = sorted((e for e in events if e.kind in ("run", "substitute")),
                  key=lambda e: e.start_us)

    def overlap(job: Any, others: Sequence[Any]) -> float:
        return sum(max(0.0, min(job.end_us, o.end_us) - max(job.start_us, o.start_us))
                   for o in others if o.start_us < job.end_us and o.end_us > job.start_us)

    io: list[tuple[float, float, float]] = []  # per job (nominal, took, overlap) us
    last_end = -math.inf
    for ld in loads:
        io.append((load_us(ld, ld.start_us - last_end), ld.end_us - ld.start_us,
                   overlap(ld, runs)))
        last_end = ld.end_us
    loaded: dict[tuple[int, int], set[int]] = {}
    for ld in loads:
        loaded.setdefault((ld.step, ld.layer), set()).add(ld.expert)
    seen: set[tuple[int, int, int]] = set()
    plan_started: set[tuple[int, int]] = set()
    cpu: list[tuple[float, float, float]] = []
    for r in runs:
        plan = (r.step, r.layer)
        first_after = r.expert in loaded.get(plan, ()) and (*plan, r.expert) not in seen
        seen.add((*plan, r.expert))
        cpu.append((run_us(r, first_after, plan not in plan_started), r.end_us - r.start_us,
                    overlap(r, loads)))
        plan_started.add(plan)

    def scale_of(jobs: list[tuple[float, float, float]]) -> float:
        alone = [(nominal, took) for nominal, took, over in jobs if over == 0]
        return (sum(took for _, took in alone) / sum(nominal for nominal, _ in alone)
                if len(alone) >= MIN_ALONE and all(n > 0 for n, _ in alone) else 1.0)

    def speed(jobs: list[tuple[float, float, float]]) -> float:
        scale = scale_of(jobs)
        # fluid model: took = nominal - speed x over + over, so the work done beside the
        # other lane, nominal - (took - over), is speed x over; summed over the jobs, the
        # simulated lane is as busy as the real one. (Least squares weighted each job by its
        # overlap: a few stalled loads, 3-4x the others, pulled a Mixtral-shaped profile's io
        # speed to 0.05-0.5 where the real rows' loads ran 0.83 of their speed alone.)
        beside = [job for job in jobs if job[2] > 0]
        num = sum(nominal * scale - (took - over) for nominal, took, over in beside)
        den = sum(over for _, _, over in beside)
        return round(min(1.0, max(0.05, num / den)), 3) if den > 0 else 1.0

    def wait(jobs: list[tuple[float, float, float]]) -> float:
        scale = scale_of(jobs)
        beside = [took - nominal * scale for nominal, took, over in jobs if over > 0]
        return round(max(0.0, statistics.fmean(beside)), 2) if beside else 0.0

    return {"overlap_io_speed": speed(io), "overlap_compute_speed": 1.0,
            "overlap_run_wait_us": wait(cpu)}


def after_load_excess(loaded: Sequence[Any], resident: Sequence[Any]) -> float:
    """Mean decode non-expert row right after a plan with loads in `loaded` minus the mean
    such row in `resident` (us), 0 unless clear of their noise (`clear_excess`). Layer 0's
    rows (which also hold the step's head) are measured against layer 0's, the others
    against the others'; layer 0 follows the previous step's last layer."""
    with_loads = {(e.step, e.layer) for e in loaded if e.kind == "load"}
    last = max((e.layer for e in loaded if e.kind == "non_expert"), default=0)

    def decode_rows(events: Sequence[Any]) -> list[Any]:
        return [e for e in events if e.kind == "non_expert" and e.tokens == 1]

    def follows_loads(e: Any) -> bool:
        before = (e.step, e.layer - 1) if e.layer else (e.step - 1, last)
        return before in with_loads

    base: dict[bool, list[float]] = {True: [], False: []}  # layer 0 or not -> rows
    for e in decode_rows(resident):
        base[e.layer == 0].append(e.end_us - e.start_us)
    mean = {k: statistics.fmean(v) for k, v in base.items() if v}
    after = [e.end_us - e.start_us - mean[e.layer == 0] for e in decode_rows(loaded)
             if (e.layer == 0) in mean and follows_loads(e)]
    spread = [us - mean[k] for k, v in base.items() for us in v]
    return round(clear_excess(after, spread), 2)


def non_expert_per_layer(events: Sequence[Any],
                         tokens: Sequence[int]) -> list[tuple[int, float, float]]:
    """(tokens, us, head us) per token count: the mean non-expert row of layers >= 1, and
    what layer 0's row takes beyond it (the step's head: the previous step's LM head and
    sampling, the embedding; the simulator charges it to layer 0, as the executor's rows
    do). A one-layer model: its one row, head included and 0 apart."""
    rows: dict[tuple[int, bool], list[float]] = {}
    for e in events:
        if e.kind == "non_expert":
            rows.setdefault((e.tokens, e.layer == 0), []).append(e.end_us - e.start_us)
    out = []
    for n in tokens:
        first = statistics.fmean(rows[(n, True)])
        if (n, False) not in rows:
            out.append((n, round(first, 2), 0.0))
            continue
        per_layer = statistics.fmean(rows[(n, False)])
        out.append((n, round(per_layer, 2), round(max(first - per_layer, 0.0), 2)))
    return out


PREEMPTED = 3.0  # a decode run over this many times the median of its kind was preempted


def decode_runs(events: Sequence[Any]) -> tuple[list[float], list[float]]:
    """(first runs, later runs) in us of the layers of one-token (decode) steps with two runs
    or more and no stall (every expert resident), each without its runs over PREEMPTED times
    its own median: a run the OS took the core from (a 60 us tiny run once took 338 us in
    the probe) says nothing of the costs read from these, and one such run in 30 layers
    kept the first-run excess from clearing its noise in some profiles. (Each against its
    own median: a first run may cost several later ones where the later are cheap.)"""
    decode = {e.step for e in events if e.kind == "non_expert" and e.tokens == 1}
    layers: dict[tuple[int, int], list[Any]] = {}
    for e in events:
        if e.lane == "compute" and e.kind in ("run", "stall") and e.step in decode:
            layers.setdefault((e.step, e.layer), []).append(e)
    firsts, laters = [], []
    for rows in layers.values():
        rows.sort(key=lambda e: e.start_us)
        if len(rows) < 2 or any(r.kind == "stall" for r in rows):
            continue
        firsts.append(rows[0].end_us - rows[0].start_us)
        laters += [r.end_us - r.start_us for r in rows[1:]]
    def kept(runs: list[float]) -> list[float]:
        cap = PREEMPTED * statistics.median(runs) if runs else 0.0
        return [us for us in runs if us <= cap]

    return kept(firsts), kept(laters)


def layer_first_run_excess(events: Sequence[Any]) -> float:
    """Mean first-run duration minus mean later-run duration (us, at least 0) over the
    decode layers of `decode_runs`; 0 when there are none (top-1 models) or the difference
    is not clear of the runs' noise (`clear_excess`)."""
    firsts, laters = decode_runs(events)
    return round(clear_excess(firsts, laters), 2)


def lane_costs_from_rows(*timelines: Sequence[Any]) -> dict[str, float]:
    """layer_us, run_us, wake_us and handoff_us from real timelines' decode rows (means over
    every timeline given; 0 when unseen).

    A decode layer's dispatch is from its non-expert end to its first compute row, plus
    from its last run to the next non-expert start, when that is the same step's next layer
    or the next step's first and both are one-token rows (a later generation begins with
    a prefill after `resume()`, and what ran in between is no dispatch). layer_us: the
    mean dispatch of the layers without loads (of all layers when every one loads), less
    one run_us (the simulator charges run_us to every run, the last one too, and the gap
    after the last run holds that run's bookkeeping); handoff_us: the mean dispatch of the
    layers with loads less that of the layers without (both seen, else 0); run_us: the gap
    between consecutive runs with no stall between; wake_us: from a load's end to the end
    of the stall waiting for it."""
    dispatch: dict[bool, list[float]] = {False: [], True: []}  # has loads -> head + tail
    gaps: list[float] = []
    wakes: list[float] = []
    for events in timelines:
        _dispatch_rows(events, dispatch, gaps, wakes)

    def mean(xs: list[float]) -> float:
        return max(statistics.fmean(xs), 0.0) if xs else 0.0

    run_us = round(mean(gaps), 2)
    free = dispatch[False] or dispatch[True]
    handoff = mean(dispatch[True]) - mean(free) if dispatch[False] and dispatch[True] else 0.0
    return {"layer_us": round(max(mean(free) - run_us, 0.0), 2), "run_us": run_us,
            "wake_us": round(mean(wakes), 2), "handoff_us": round(max(handoff, 0.0), 2)}


def _dispatch_rows(events: Sequence[Any], dispatch: dict[bool, list[float]],
                   gaps: list[float], wakes: list[float]) -> None:
    """Add one timeline's decode dispatches, gaps between runs and wakes (see
    `lane_costs_from_rows`)."""
    by_layer: dict[tuple[int, int], list[Any]] = {}
    for e in events:
        if e.lane in ("compute", "io"):
            by_layer.setdefault((e.step, e.layer), []).append(e)
    ne = {k: r for k, rs in by_layer.items() for r in rs if r.kind == "non_expert"}
    order = sorted(k for k in by_layer if k in ne and ne[k].tokens == 1)
    for idx, k in enumerate(order):
        rows = sorted(by_layer[k], key=lambda e: e.start_us)
        comp = [r for r in rows if r.kind in ("run", "stall")]
        if not comp:
            continue
        runs = [r for r in comp if r.kind == "run"]
        nxt = order[idx + 1] if idx + 1 < len(order) else None
        follows = nxt is not None and (nxt == (k[0], k[1] + 1) or (nxt[0] == k[0] + 1
                                                                  and nxt[1] == 0))
        loads = {r.expert: r for r in rows if r.kind == "load"}
        if follows and runs:
            dispatch[bool(loads)].append(comp[0].start_us - ne[k].end_us
                                         + ne[nxt].start_us - runs[-1].end_us)
        for a, b in zip(comp, comp[1:], strict=False):
            if a.kind == "run" and b.kind == "run":
                gaps.append(b.start_us - a.end_us)
        for r in comp:
            if r.kind == "stall" and r.expert in loads:
                wakes.append(r.end_us - loads[r.expert].end_us)
