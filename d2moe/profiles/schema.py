"""Hardware profiles: the schema (units in the key names; read strictly by `files.py`) and
the cost model API.

Load model (`Profile.load_us`): a request streams disk -> [host RAM ->] device, paying each
hop's fixed latency once and the path's slowest bandwidth: t = sum(latency_us) + bytes / min(BW).
A discrete GPU's path is disk + link (PCIe); a unified-memory device (Jetson) reads straight
into the shared memory (no link). Tier "host" (an expert cached in host RAM) pays the link only.

Expert run (`Profile.run_us`), roofline form:
  launch_us + max(expert_bytes(bits) / mem_GBps, 2 * tokens * params / peak_TFLOPs)
            + dequant_ns_per_Mweight_bit * params/1e6 * bits / 1e3      (0 at 16 bits: dense)
or a measured table over (shape, bits, tokens), interpolated linearly, extrapolation recorded
in `Profile.extrapolations`.
Non-expert part of a layer (`Profile.non_expert_us`): layer_overhead_us + roofline over the
spec's non-expert weights (at dtype_bytes) and flops, or a measured table over tokens; a
measured table may add the step's head (`Profile.head_us`: LM head, sampling, embedding),
which the simulator charges to layer 0 as the executor's rows do (0 in roofline profiles and
in tables measured before 2026-11-23 11:20 UTC, which spread it over the layers instead).
Executor lane costs (`Profile.executor`, optional, measured by `d2moe profile`): the fixed
costs of the real executor's lanes beyond the disk and the kernels (per layer, per load, per
byte loaded, per run, per hand-off between the lanes); the simulator adds them when present.
Every cost is memoized per profile: a cached call is one dict lookup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from d2moe.core.errors import UserError
from d2moe.core.sizes import DENSE_BITS, QuantLayout, expert_bytes
from d2moe.core.spec import ModelSpec
from d2moe.profiles.cost import (
    BYTES_PER_US_PER_GBPS,
    Table1D,
    Table2D,
    dequant_us,
    interp_1d,
    roofline_us,
    transfer_us,
)

_DEFAULT_LAYOUT = QuantLayout()


PLAN_BASE = "hebf"  # the policy whose planning the profile's layer_us holds (its probe's)


@dataclass(frozen=True)
class Source:
    """Where the figures come from: `measured` (device, date, command) or `estimated` (basis)."""

    kind: str
    device: str = ""
    date: str = ""
    command: str = ""
    basis: tuple[tuple[str, str], ...] = ()  # (figure, spec-sheet value it comes from)


@dataclass(frozen=True)
class Link:
    """One hop of the load path: sustained read bandwidth and fixed per-request latency.

    `reads` (optional, the disk of measured profiles): (bytes, us) of single requests as
    measured; a request then takes their interpolation (linear between points, linear from
    the two nearest beyond) instead of the fit `latency_us` + bytes / `read_GBps`. On the
    development VM's disk throughput keeps rising past 4 MiB (1.24 GB/s at 4 MiB, 2.2 at 16
    and 64 MiB; 2026-11-23 14:35 UTC), which no latency + bandwidth line follows.
    """

    read_GBps: float
    latency_us: float
    reads: tuple[tuple[int, float], ...] = ()

    def request_us(self, nbytes: float) -> float:
        """One request of `nbytes` (0 for none)."""
        if nbytes <= 0:
            return 0.0
        if not self.reads:
            return self.latency_us + nbytes / (self.read_GBps * BYTES_PER_US_PER_GBPS)
        us, _ = interp_1d([n for n, _ in self.reads], [t for _, t in self.reads], nbytes)
        return max(us, 0.0)


@dataclass(frozen=True)
class ExpertRoofline:
    """Expert run cost from the device's memory bandwidth and tensor throughput."""

    mem_GBps: float
    peak_TFLOPs: float
    dequant_ns_per_Mweight_bit: float
    launch_us: float


@dataclass(frozen=True)
class ExpertRow:
    """A measured expert run: `shape` is the spec name or its w1 shape 'FFNxHIDDEN'."""

    shape: str
    bits: int
    tokens: int
    latency_us: float


@dataclass(frozen=True)
class ExpertTable:
    """Measured expert runs, interpolated over (bits, tokens) per shape."""

    rows: tuple[ExpertRow, ...]


@dataclass(frozen=True)
class NonExpertRoofline:
    """Per-layer attention/norm/router cost from bandwidth, throughput and fixed overhead."""

    mem_GBps: float
    peak_TFLOPs: float
    layer_overhead_us: float


@dataclass(frozen=True)
class NonExpertRow:
    """A measured non-expert layer time for one model spec at `tokens` tokens, and what the
    step's head adds to layer 0 (0: not measured apart, spread over the layers)."""

    model: str
    tokens: int
    latency_us: float
    head_us: float = 0.0


@dataclass(frozen=True)
class NonExpertTable:
    """Measured non-expert layer times, interpolated over tokens per model."""

    rows: tuple[NonExpertRow, ...]


@dataclass(frozen=True)
class ExecutorCosts:
    """Fixed costs of the real executor's lanes, beyond the disk reads and the expert kernels.

    A load issues the store reader's read requests (a large level alone, small neighbours
    joined; each pays the disk's `latency_us`), checks each read's CRC-32s at `check_GBps` (a
    large read's on a helper thread while the next is read: `profiles.cost.store_reads_us`),
    pays `evict_us` for each eviction it makes first (freeing the expert's blocks, forgetting
    its views and kernel inputs: 11-13 us inside the tiny model's runs on the development VM, 6
    us in the probe's loop) and then `load_us` + bytes / `load_GBps` on the I/O lane (layout
    conversion, placement in the pool; the checksums too in profiles without `check_GBps`,
    measured before 2026-11-23); a layer with expert work pays `layer_us` on the compute lane
    before its first run (grouping tokens, planning), and a layer whose plan has loads
    `handoff_us` more (planning the loads and evictions, waking the I/O lane's thread and
    handing it the plan; the executor hands plans without loads to no one); a run pays `run_us`
    beyond its expert; a lane blocked on the other resumes `wake_us` after the signal. While
    both lanes are busy they share the CPU: the I/O lane runs at `overlap_io_speed` and the
    compute lane at `overlap_compute_speed` of their own speed (1: no contention, as with a DMA
    engine and a GPU), and a run that overlaps a load pays `overlap_run_wait_us` more, once
    (on the development VM a tiny run beside a load took about 100 us more than alone
    whichever kernel ran it: a wait, not a slower rate; docs/results/fidelity.md). A load
    that starts after the I/O lane has been idle for `idle` us pays `cold_us(idle)` more, read
    off `cold_curve_us`: [(idle_us, extra_us), ...] measured after each pause the probe makes,
    linear between them and from (0, 0), flat past the last. The first load after a pause is
    slower than one right behind another, in its disk requests and in its CPU work on a core
    gone cold, and the loads right after it a little (measured on the development VM, a 62 KB
    load: +74 us after 0.5 ms idle, +266 us after 5 ms; benchmarks/cold_loads.py, 2026-11-23
    08:21 UTC). The first run of an expert
    after its load pays `first_run_us` more (its planes were just written by the I/O lane, on
    another core), and the first run of each layer's plan pays `layer_first_run_us` more (the
    layer's non-expert slice ran in between and cycled the caches that back-to-back runs, as the
    expert table times them, keep warm). A layer's non-expert slice right after a plan with
    loads pays `non_expert_after_load_us` more than with every expert resident (development VM,
    tiny model, 24 rounds of 2026-11-23: median decode row 544-591 us after a plan with loads,
    443-444 in runs without loads). `layer_us` holds the planning of the policy its probe ran
    (PLAN_BASE); `plan_us` is each policy's own planning time a layer ((name, us) pairs,
    timed in-process on a synthetic trace of the spec), and a layer planned by another policy
    pays the difference (`plan_extra_us`): 66-78 us for `hebf-ghost` against 20 for `hebf` on
    the Intel Xeon VM (benchmarks/plan_cost.py). Profiles without a field pay none of it.
    """

    layer_us: float = 0.0
    load_us: float = 0.0
    load_GBps: float = math.inf  # inf: no per-byte cost beyond the read
    check_GBps: float = math.inf  # inf: checksums are in load_GBps (older profiles)
    run_us: float = 0.0
    wake_us: float = 0.0
    overlap_io_speed: float = 1.0
    overlap_compute_speed: float = 1.0
    overlap_run_wait_us: float = 0.0
    first_run_us: float = 0.0
    layer_first_run_us: float = 0.0
    handoff_us: float = 0.0
    non_expert_after_load_us: float = 0.0
    evict_us: float = 0.0
    cold_curve_us: tuple[tuple[float, float], ...] = ()  # (idle_us, extra_us), idle rising
    plan_us: tuple[tuple[str, float], ...] = ()  # (policy, us a layer), by name

    def plan_extra_us(self, policy: str) -> float:
        """What a layer planned by `policy` pays beyond `layer_us` (whose probe planned with
        PLAN_BASE): the difference of their `plan_us`, 0 when either is not measured."""
        times = dict(self.plan_us)
        if policy not in times or PLAN_BASE not in times:
            return 0.0
        return times[policy] - times[PLAN_BASE]

    @property
    def any_cold(self) -> bool:
        """Whether a load after a pause costs anything more."""
        return any(extra > 0.0 for _, extra in self.cold_curve_us)

    def cold_us(self, idle_us: float) -> float:
        """What a load pays beyond a warm one after the I/O lane sat idle for `idle_us`:
        `cold_curve_us` interpolated, from 0 after no idle time, flat past its last point."""
        if idle_us <= 0.0 or not self.cold_curve_us:
            return 0.0
        lo_idle, lo_us = 0.0, 0.0
        for idle, us in self.cold_curve_us:
            if idle_us <= idle:
                return lo_us + (us - lo_us) * (idle_us - lo_idle) / (idle - lo_idle)
            lo_idle, lo_us = idle, us
        return lo_us

    def load_extra_us(self, nbytes: int) -> float:
        """What a load of `nbytes` costs the I/O lane beyond its reads (and its checks,
        with `check_GBps`)."""
        return 0.0 if nbytes <= 0 else self.load_us + nbytes / (self.load_GBps * 1e3)


class _Memo:
    """Mutable caches behind a frozen Profile (keys use id(); `keep` holds those objects alive)."""

    def __init__(self) -> None:
        self.load: dict[tuple[int, str, int], float] = {}
        self.run: dict[tuple[int, int, int, int], float] = {}
        self.non_expert: dict[tuple[int, int], float] = {}
        self.head: dict[tuple[int, int], float] = {}
        self.tables: dict[tuple[str, int], Any] = {}
        self.keep: dict[int, Any] = {}
        self.extrapolations: list[tuple[str, str, int, int]] = []


def expert_shape_key(spec: ModelSpec) -> str:
    """The table key of a spec's expert: its w1 shape 'FFNxHIDDEN' (w3 equal, w2 transposed)."""
    return f"{spec.ffn}x{spec.hidden}"


@dataclass(frozen=True, kw_only=True)
class Profile:
    """A device's storage path, memory and compute costs. Costs in microseconds."""

    name: str
    source: Source
    disk: Link
    link: Link | None  # host -> device interconnect; None on unified memory
    unified_memory: bool
    device_memory_bytes: int
    host_memory_bytes: int = 0  # 0: no host RAM tier for experts
    io_lanes: int = 1
    shared_bandwidth: bool = True  # concurrent io lanes split the path's bandwidth
    expert: ExpertRoofline | ExpertTable
    non_expert: NonExpertRoofline | NonExpertTable
    executor: ExecutorCosts | None = None  # None: the simulator adds no executor lane costs
    _memo: _Memo = field(default_factory=_Memo, init=False, compare=False, repr=False)

    @property
    def tiers(self) -> tuple[str, ...]:
        """Storage tiers an expert can be loaded from."""
        return ("disk", "host") if self.host_memory_bytes > 0 else ("disk",)

    @property
    def extrapolations(self) -> tuple[tuple[str, str, int, int], ...]:
        """Distinct table queries outside the measured range: (kind, model, bits, tokens)."""
        return tuple(self._memo.extrapolations)

    def load_us(self, nbytes: int, tier: str = "disk", requests: int = 1) -> float:
        """Time to move `nbytes` from `tier` into device memory in `requests` requests
        (each pays every hop's fixed latency; the bytes stream at the slowest bandwidth)."""
        key = (nbytes, tier, requests)
        cached = self._memo.load.get(key)
        if cached is None:
            hops = self._hops(tier)
            if requests > 1 and nbytes > 0:
                hops = [(bw, lat * requests) for bw, lat in hops]
            if tier == "disk" and self.disk.reads and nbytes > 0:
                # the disk stage from its measured requests, the hops after it streaming
                # behind: the slower of the two, plus the later hops' latencies
                disk_us = requests * self.disk.request_us(nbytes / requests)
                later = hops[1:]
                stream = nbytes / (min(bw for bw, _ in later) * BYTES_PER_US_PER_GBPS) \
                    if later else 0.0
                cached = max(disk_us, stream) + sum(lat for _, lat in later)
            else:
                cached = transfer_us(nbytes, hops)
            self._memo.load[key] = cached
        return cached

    def _hops(self, tier: str) -> list[tuple[float, float]]:
        if tier not in self.tiers:
            raise UserError(f"no storage tier {tier!r} (this profile has {', '.join(self.tiers)})",
                            path=self.name, field="tier", fix="load from disk, or add "
                            "host_memory_bytes to a discrete-GPU profile")
        link = [(self.link.read_GBps, self.link.latency_us)] if self.link is not None else []
        if tier == "host":
            return link
        return [(self.disk.read_GBps, self.disk.latency_us), *link]

    def run_us(self, spec: ModelSpec, bits: int, tokens: int,
               layout: QuantLayout = _DEFAULT_LAYOUT) -> float:
        """Time to run one expert of `spec` at `bits` over `tokens` tokens."""
        key = (id(spec), id(layout), bits, tokens)
        cached = self._memo.run.get(key)
        if cached is None:
            self._memo.keep[id(spec)], self._memo.keep[id(layout)] = spec, layout
            cached = self._memo.run[key] = self._run_us(spec, bits, tokens, layout)
        return cached

    def _run_us(self, spec: ModelSpec, bits: int, tokens: int, layout: QuantLayout) -> float:
        if tokens <= 0:
            return 0.0
        if not 1 <= bits <= DENSE_BITS:
            raise UserError(f"cannot run an expert at {bits} bits", path=self.name, field="bits",
                            fix=f"ask for 1..{DENSE_BITS} bits")
        cost = self.expert
        if isinstance(cost, ExpertRoofline):
            weights = spec.expert_params
            dq = 0.0 if bits >= DENSE_BITS else dequant_us(weights, bits,
                                                           cost.dequant_ns_per_Mweight_bit)
            return cost.launch_us + dq + roofline_us(expert_bytes(spec, bits, layout),
                                                     spec.expert_flops(tokens), cost.mem_GBps,
                                                     cost.peak_TFLOPs)
        table = self._table("expert", spec)
        value, extrapolated = table(bits, tokens)
        if extrapolated:
            self._memo.extrapolations.append(("expert", spec.name, bits, tokens))
        return value

    def non_expert_us(self, spec: ModelSpec, tokens: int) -> float:
        """Time of one MoE layer's non-expert part (attention, norms, router) over `tokens`."""
        key = (id(spec), tokens)
        cached = self._memo.non_expert.get(key)
        if cached is None:
            self._memo.keep[id(spec)] = spec
            cached = self._memo.non_expert[key] = self._non_expert_us(spec, tokens)
        return cached

    def _non_expert_us(self, spec: ModelSpec, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        cost = self.non_expert
        if isinstance(cost, NonExpertRoofline):
            # attention KV-cache traffic and sequence-length terms are left out (documented)
            return cost.layer_overhead_us + roofline_us(
                spec.layer_params * spec.dtype_bytes, spec.layer_flops(tokens), cost.mem_GBps,
                cost.peak_TFLOPs)
        value, extrapolated = self._table("non_expert", spec)(tokens)
        if extrapolated:
            self._memo.extrapolations.append(("non_expert", spec.name, 0, tokens))
        return value

    def head_us(self, spec: ModelSpec, tokens: int) -> float:
        """What a step of `tokens` tokens adds to layer 0's non-expert part beyond the other
        layers' (the step's head: the last step's LM head and sampling, the embedding); 0
        when the profile has none apart (roofline, or a table that spread it over layers)."""
        key = (id(spec), tokens)
        cached = self._memo.head.get(key)
        if cached is None:
            cached = 0.0
            if tokens > 0 and isinstance(self.non_expert, NonExpertTable) and any(
                    r.head_us for r in self.non_expert.rows):
                cached = max(0.0, self._table("head", spec)(tokens)[0])
            self._memo.keep[id(spec)] = spec
            self._memo.head[key] = cached
        return cached

    def _table(self, kind: str, spec: ModelSpec) -> Any:
        key = (kind, id(spec))
        table = self._memo.tables.get(key)
        if table is not None:
            return table
        if kind == "expert":
            assert isinstance(self.expert, ExpertTable)
            names = (spec.name, expert_shape_key(spec))
            rows = [r for r in self.expert.rows if r.shape in names]
            table = Table2D([(r.bits, r.tokens, r.latency_us) for r in rows]) if rows else None
            wanted = f"shape {names[0]!r} or {names[1]!r}"
        else:
            assert isinstance(self.non_expert, NonExpertTable)
            rows = [r for r in self.non_expert.rows if r.model == spec.name]
            table = Table1D([(r.tokens, r.head_us if kind == "head" else r.latency_us)
                             for r in rows]) if rows else None
            wanted = f"model {spec.name!r}"
            kind = "non_expert"  # the head is a column of the non-expert table
        if table is None:
            raise UserError(f"the measured {kind} table has no rows for {wanted}",
                            path=self.name, field=f"{kind}.table",
                            fix=f"measure this model on the device, or use a roofline {kind} cost")
        self._memo.keep[id(spec)] = spec
        self._memo.tables[key] = table
        return table

    def to_dict(self) -> dict[str, Any]:
        """The YAML mapping `load_profile` reads back to an equal Profile."""
        src: dict[str, Any] = {"kind": self.source.kind}
        if self.source.kind == "measured":
            src.update(device=self.source.device, date=self.source.date,
                       command=self.source.command)
        else:
            src["basis"] = dict(self.source.basis)
        out: dict[str, Any] = {
            "name": self.name, "source": src,
            "disk": {"read_GBps": self.disk.read_GBps, "latency_us": self.disk.latency_us}
            | ({"reads": [[n, us] for n, us in self.disk.reads]} if self.disk.reads else {}),
            "link": None if self.link is None else {"read_GBps": self.link.read_GBps,
                                                    "latency_us": self.link.latency_us},
            "unified_memory": self.unified_memory,
            "device_memory_bytes": self.device_memory_bytes,
        }
        if self.host_memory_bytes:
            out["host_memory_bytes"] = self.host_memory_bytes
        out.update(io_lanes=self.io_lanes, shared_bandwidth=self.shared_bandwidth)
        e, n = self.expert, self.non_expert
        out["expert"] = ({"roofline": _fields(e)} if isinstance(e, ExpertRoofline)
                         else {"table": [_fields(r) for r in e.rows]})
        out["non_expert"] = ({"roofline": _fields(n)} if isinstance(n, NonExpertRoofline)
                             else {"table": [{k: v for k, v in _fields(r).items()
                                              if k != "head_us" or v} for r in n.rows]})
        if self.executor is not None:
            ex = _fields(self.executor)
            curve, plans = ex.pop("cold_curve_us"), ex.pop("plan_us")
            out["executor"] = {k: v for k, v in ex.items() if math.isfinite(v)} | (
                {"cold_curve_us": [[idle, us] for idle, us in curve]} if curve else {}) | (
                {"plan_us": dict(plans)} if plans else {})
        return out


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}
