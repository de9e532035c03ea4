"""`d2moe profile`: measure this machine as the simulator needs it and build a Profile.

What is measured (each point the mean of at least `repeats` timings and 0.1 s, through the
executor's code; a mean, not a median, because on a CPU shared with other work the
preemptions that some timings catch are part of what a long run pays):
- disk: cold reads of growing size through the store reader (O_DIRECT where the file system
  allows, else the page cache is dropped before each read), up to the spec's largest stored
  level; kept as measured (`disk.reads`, interpolated by the simulator) and fitted as
  latency_us + bytes / read_GBps;
- link (cuda only): pinned host -> device copies of growing size; same fit;
- expert runs per (bits, tokens) for the spec's expert shapes: the compute lane's run body
  (gather the resident planes, `kernels.dispatch.expert_swiglu`, weighted add);
- non-expert time per layer per token count: the non-expert rows of the real backend running
  a random-weight copy of the model (whole where it is small, else cut to 2 layers) with
  every expert resident; what layer 0's row takes beyond the others (the step's head:
  the last step's LM head and sampling, the embedding) is kept apart (`head_us`); from the
  same rows, how much longer a decode layer's first run takes than
  its later runs (`executor.layer_first_run_us`: the non-expert slice ran in between); in
  turn, the same model under a quarter of the experts: how much longer a decode layer's
  non-expert row takes right after a plan with loads (`executor.non_expert_after_load_us`);
- the store's checksum speed (`executor.check_GBps`: zlib.crc32 over a buffer of the probe's
  largest level);
- the executor lanes' fixed costs: a full load (read, checksum, conversion, placement) minus
  its reads and checks (the disk fit and `check_GBps`, as the reader pipelines them) gives
  `load_us` + bytes / `load_GBps`; the decode steps of the non-expert probe (every
  expert resident, and under a quarter of the experts) give the per-layer dispatch
  (`layer_us`, layers without loads), what a layer with loads pays beyond it (`handoff_us`:
  planning them, handing them to the I/O lane's thread), the per-run bookkeeping (`run_us`)
  and the wake-up of a lane blocked on the other (`wake_us`), read from their timeline rows
  (`backend_probes.lane_costs_from_rows`); an expert's first run
  after an I/O thread loaded it against the run right after (`first_run_us`); bursts of
  whole loads on an I/O thread after it sat idle for 0.25 .. 20 ms against a steady stream:
  the loads after a pause cost more, summed on the first (`executor.cold_curve_us`: the mean
  per pause, where clear of the noise, made non-decreasing);
- how the lanes slow each other (`overlap_io_speed`: the I/O lane's speed beside runs;
  `overlap_run_wait_us`: what a run beside a load takes more, once): read last, from the
  rows of the decode under a quarter of the experts, every job's nominal time from the
  figures above, scaled per lane by the same rows' jobs alone (`overlap_speeds`).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2moe.core.cliargs import (
    check_at_least,
    check_dtype,
    check_threads,
    dtype_field,
    once_each,
    split_list,
    sync_rows_field,
)
from d2moe.core.errors import UserError
from d2moe.core.fileio import ensure_dir, path_error
from d2moe.core.sizes import QuantLayout, expert_bytes, layout_from_options, parse_bytes
from d2moe.core.spec import ModelSpec, load_spec
from d2moe.profiles.backend_probes import (
    lane_costs_from_rows,
    measure_non_expert,
    overlap_speeds_from_rows,
)
from d2moe.profiles.cost import store_reads_us
from d2moe.profiles.load_probes import (
    measure_check_GBps,
    measure_cold_loads,
    measure_evict_us,
    measure_loads,
)
from d2moe.profiles.run_probes import measure_first_runs, measure_runs
from d2moe.profiles.schema import (
    ExecutorCosts,
    ExpertRow,
    ExpertTable,
    Link,
    NonExpertRow,
    NonExpertTable,
    Profile,
    Source,
    expert_shape_key,
)
from d2moe.profiles.timing import Bar, fit_cold_curve, fit_latency_bandwidth, interleaved_means
from d2moe.quant.store import PIPELINE_MIN_BYTES

PROBE_FILE = "probe.bin"


@dataclass(frozen=True)
class ProfileConfig:
    """Options of `d2moe profile` (the CLI is built from these fields)."""

    device: str = field(default="cpu", metadata={"help": "cpu or cuda (cuda:N)"})
    threads: int = field(default=1, metadata={
        "help": "torch intra-op threads while measuring (0: torch's default); use the count "
                "the executor runs with (d2moe validate --threads)"})
    sync_rows: bool = sync_rows_field("the executor's rows the non-expert and lane costs are "
                                      "read from; use the setting the runs will have")
    dtype: str = dtype_field()
    model_spec: str = field(default="tiny", metadata={
        "help": "spec whose expert shapes and non-expert layers are measured (shipped name, "
                "spec YAML or HF config.json)", "metavar": "SPEC"})
    out: str = field(default="out/profile.yaml", metadata={"help": "profile YAML to write"})
    name: str = field(default="", metadata={
        "help": "profile name (default: the file name without .yaml)"})
    tokens: str = field(default="1,2,4,8,16", metadata={
        "help": "token counts of the expert-run and non-expert tables"})
    bits: str = field(default="", metadata={
        "help": "bit-widths of the expert table (default: every stored one, --store-bits)"})
    disk_sizes: str = field(default="4KiB,16KiB,64KiB,256KiB,1MiB,4MiB", metadata={
        "help": "read (and copy) sizes of the disk and link probes; the disk's also go on "
                "in powers of 4 up to the spec's largest stored level"})
    repeats: int = field(default=15, metadata={
        "help": "timings per point at least (their mean is kept; short ones repeat for "
                "0.1 s)"})
    rounds: int = field(default=1, metadata={
        "help": "measure the whole profile this many times and keep every figure's median "
                "(a machine whose speed drifts: one profile can catch a slow stretch)"})
    probe_experts: int = field(default=4, metadata={
        "help": "experts in the random probe store (the load probes)"})
    layout: str = field(default="bitplane", metadata={"help": "store layout: bitplane or mwq"})
    # --store-bits B1:BK sets both (d2moe.core.cliargs); --b1 and --bK are its older spelling
    b1: int = field(default=QuantLayout.b1, metadata={"help": "lowest stored bit-width"})
    bK: int = field(default=QuantLayout.bK, metadata={"help": "highest stored bit-width"})
    group: int = field(default=QuantLayout.group, metadata={"help": "quantization group size"})
    dir: str = field(default="", metadata={
        "help": "directory on the disk to measure: the probe files go in a temporary "
                "directory made in it and removed at the end (default: under the d2moe cache "
                "directory)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar on a terminal"})

    @property
    def quant_layout(self) -> QuantLayout:
        return layout_from_options(self.layout, self.b1, self.bK, self.group)


def _ints(text: str, where: str) -> list[int]:
    """A comma list of positive integers, sorted (each given once)."""
    texts = split_list(text, where, example=f"--{where} 1,2,4,8")
    try:
        out = sorted(once_each([int(t) for t in texts], texts, where,
                               example=f"--{where} 1,2,4,8"))
    except ValueError:
        raise UserError(f"not a list of integers: {text!r}", field=where,
                        fix="e.g. 1,2,4,8") from None
    if not out or out[0] < 1:
        raise UserError(f"needs positive integers, got {text!r}", field=where, fix="e.g. 1,2,4")
    return out


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` torch intra-op threads (0: leave torch's setting), restored afterwards.

    On a small CPU shared with the I/O lane (and other processes), one compute thread keeps
    the two lanes on separate cores; two threads make every kernel wait for a preempted
    partner thread, and timings jump by 10-100x under load."""
    import torch

    check_threads(n)
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _scratch(cfg: ProfileConfig) -> Iterator[Path]:
    """A temporary directory `profile-XXXX` in --dir (made if missing) or else under the
    cache directory, removed with all the probe files in it when the measurement ends, on
    an error, Ctrl-C or SIGTERM (the CLI raises it) alike; a directory that cannot be
    made is a UserError naming it."""
    if cfg.dir:
        root = ensure_dir(cfg.dir, field="dir")
    else:
        from d2moe.core.fileio import cache_dir

        root = ensure_dir(cache_dir())
    try:
        tmp = tempfile.TemporaryDirectory(prefix="profile-", dir=root)
    except OSError as exc:
        raise path_error(exc, root, "cannot make a scratch directory in it",
                         field="dir" if cfg.dir else None) from None
    with tmp as path:
        yield Path(path)


def measure_profile(cfg: ProfileConfig, command: str = "",
                    spec: ModelSpec | None = None) -> Profile:
    """Run every measurement of `cfg` on this machine; returns the measured Profile.
    `spec` replaces `cfg.model_spec` (e.g. a model cut to fewer layers)."""
    if cfg.rounds < 1:
        raise UserError(f"must be >= 1, got {cfg.rounds}", field="rounds", fix="pass 1 or more")
    spec = spec or load_spec(cfg.model_spec)
    with torch_threads(cfg.threads):
        profiles = [_measure_profile(cfg, command, spec) for _ in range(cfg.rounds)]
    return median_profile(profiles) if len(profiles) > 1 else profiles[0]


def median_profile(profiles: Sequence[Profile]) -> Profile:
    """Every figure the median of the same figure over `profiles` (measured with one
    configuration: the same table rows), the first one's name and source, its date the
    last one's. Each figure separately: a fit's latency and bandwidth may come from two
    different rounds; the cold curve at the pauses of the longest one (the pointwise median
    of rising curves rises)."""
    first = profiles[0]

    def med(get: Callable[[Profile], float]) -> float:
        return statistics.median(get(p) for p in profiles)

    def fields(obj: Any, get: Callable[[Profile], Any]) -> Any:
        """`obj` (a dataclass of `first`, None on CPU for the link) with its float fields'
        medians."""
        if obj is None:
            return None
        return dataclasses.replace(obj, **{
            f.name: med(lambda p, n=f.name: getattr(get(p), n))
            for f in dataclasses.fields(obj) if isinstance(getattr(obj, f.name), float)})

    def rows(get: Callable[[Profile], Any]) -> Any:
        table = get(first)
        if not hasattr(table, "rows"):
            return fields(table, get)
        return dataclasses.replace(table, rows=tuple(
            fields(r, lambda p, i=i: get(p).rows[i]) for i, r in enumerate(table.rows)))

    disk = fields(first.disk, lambda p: p.disk)
    if all(len(p.disk.reads) == len(first.disk.reads) for p in profiles):
        disk = dataclasses.replace(disk, reads=tuple(
            (n, med(lambda p, i=i: p.disk.reads[i][1])) for i, (n, _) in
            enumerate(first.disk.reads)))
    executor = fields(first.executor, lambda p: p.executor)
    if executor is not None:  # the cold curve: each one's cost at the longest one's pauses
        idles = max((p.executor.cold_curve_us for p in profiles if p.executor), key=len)
        curve = tuple((idle, round(med(lambda p, t=idle: p.executor.cold_us(t)), 2))
                      for idle, _ in idles)
        executor = dataclasses.replace(executor, cold_curve_us=curve if any(
            us > 0 for _, us in curve) else ())
        plans = [dict(p.executor.plan_us) if p.executor else {} for p in profiles]
        executor = dataclasses.replace(executor, plan_us=tuple(  # each policy's own median
            (name, round(statistics.median(t[name] for t in plans), 2))
            for name, _ in first.executor.plan_us if all(name in t for t in plans)))
    last = profiles[-1].source
    return dataclasses.replace(
        first, source=dataclasses.replace(first.source, date=last.date), disk=disk,
        link=fields(first.link, lambda p: p.link),
        expert=rows(lambda p: p.expert), non_expert=rows(lambda p: p.non_expert),
        executor=executor)


def lane_load_costs(loads: Sequence[tuple[Sequence[int], float]], profile: Profile,
                    check_GBps: float) -> tuple[float, float]:
    """(load_us, load_GBps): the I/O lane's work per load beyond its reads and checks (layout
    conversion, placement and, on CUDA, the copy to the device), fitted over measured loads
    of (level bytes in file order, us); the reads priced as the simulator prices them
    (`profiles.cost.store_reads_us` of `profile.load_us` from disk: with a link, its
    latency too, which the simulator charges per read on top of this work)."""
    def read_us(n: int) -> float:
        return float(profile.load_us(n, "disk"))

    return fit_latency_bandwidth([
        (sum(levels), us - store_reads_us(levels, read_us, check_GBps, PIPELINE_MIN_BYTES))
        for levels, us in loads])


def _measure_profile(cfg: ProfileConfig, command: str, spec: ModelSpec) -> Profile:
    import torch

    device = _device(cfg.device)
    dtype = getattr(torch, check_dtype(cfg.dtype))
    layout = cfg.quant_layout
    if not layout.nested:
        raise UserError(f"cannot measure layout {layout.kind!r}", field="layout",
                        fix="use bitplane or mwq")
    tokens = _ints(cfg.tokens, "tokens")
    bits = _ints(cfg.bits, "bits") if cfg.bits else list(range(layout.b1, layout.bK + 1))
    for b in bits:
        layout.check_bits(b)
    texts = split_list(cfg.disk_sizes, "disk-sizes", example="--disk-sizes 4KiB,1MiB")
    sizes = sorted(once_each([parse_bytes(s, field="disk-sizes") for s in texts], texts,
                             "disk-sizes", example="--disk-sizes 4KiB,1MiB"))
    if not sizes or sizes[0] < 1:
        raise UserError("needs at least one read size", field="disk-sizes", fix="e.g. 4KiB,1MiB")
    for name, low in (("repeats", 1), ("probe_experts", 2)):
        check_at_least(getattr(cfg, name), low, name)
    probe = dataclasses.replace(spec, layers=1, experts=min(spec.experts, cfg.probe_experts),
                                top_k=min(spec.top_k, 2, cfg.probe_experts - 1))
    disk_sizes = sizes_up_to(sizes, expert_bytes(spec, layout.b1, layout))  # the base level
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    raises = [(0, b) for b in range(layout.b1, layout.bK + 1)] + \
        [(b, b + 1) for b in range(layout.b1, layout.bK)]
    total = cfg.repeats * (len(disk_sizes) + len(sizes) * cuda + len(raises)
                           + len(bits) * len(tokens) + len(tokens) + 1) + 1  # (+1: cold
    # loads, a step per two of their 2 x repeats rounds; the last +1: the lanes)
    bar = Bar(total, cfg.progress)
    try:
        with _scratch(cfg) as scratch:
            from d2moe.profiles.probe_store import write_random_store
            from d2moe.quant.store import StoreReader

            store_dir = write_random_store(scratch / "d2moe-probe-store", probe, layout)
            reader = StoreReader(store_dir, direct=True)
            try:
                disk_points = measure_disk(reader, disk_sizes, cfg.repeats, bar)
                disk = dataclasses.replace(_fit_link(disk_points), reads=tuple(
                    (n, round(us, 2)) for n, us in disk_points))
                link = _fit_link(measure_link(device, sizes, cfg.repeats, bar)) if cuda else None
                loads = measure_loads(reader, probe, layout, device, raises, cfg.repeats,
                                      sync, bar)
                check_gbps = measure_check_GBps(max(max(lv) for lv, _ in loads), cfg.repeats)
                evict_us = measure_evict_us(reader, probe, layout, device,
                                            min(layout.b1 + 2, layout.bK), cfg.repeats)
                runs = measure_runs(probe, layout, device, bits, tokens, cfg.repeats, sync, bar,
                                    dtype)
                resident = measure_non_expert(spec, layout, device, tokens, cfg.repeats,
                                              scratch, bar, sync_rows=cfg.sync_rows,
                                              dtype=dtype)
                lanes = lane_costs_from_rows(resident.resident_rows, resident.loaded_rows)
                cold_curve_us = fit_cold_curve(measure_cold_loads(
                    reader, probe, layout, device, min(layout.b1 + 2, layout.bK),
                    2 * cfg.repeats, sync, bar))
                first_run_us = measure_first_runs(reader, probe, layout, device,
                                                  min(layout.b1 + 2, layout.bK),
                                                  4 * cfg.repeats, sync, dtype)
                bar.step("lanes")
            finally:
                reader.close()
    finally:
        bar.close()
    shape = expert_shape_key(spec)
    name = cfg.name or Path(cfg.out).name.removesuffix(".yaml")
    profile = Profile(
        name=name,
        source=Source("measured", device=device_name(device),
                      date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                      command=command or "d2moe profile"),
        disk=disk, link=link, unified_memory=not cuda,
        device_memory_bytes=(torch.cuda.get_device_properties(device).total_memory if cuda
                             else _host_memory_bytes()),
        expert=ExpertTable(tuple(ExpertRow(shape, b, t, round(us, 2)) for b, t, us in runs)),
        non_expert=NonExpertTable(tuple(NonExpertRow(spec.name, t, us, head_us)
                                        for t, us, head_us in resident.non_expert)))
    load_us, load_gbps = lane_load_costs(loads, profile, check_gbps)  # reads priced by it
    executor = ExecutorCosts(layer_us=lanes["layer_us"], load_us=round(load_us, 2),
                             load_GBps=_sig(load_gbps), check_GBps=_sig(check_gbps),
                             run_us=lanes["run_us"], wake_us=lanes["wake_us"],
                             cold_curve_us=cold_curve_us,
                             first_run_us=round(first_run_us, 2),
                             layer_first_run_us=resident.layer_first_run_us,
                             non_expert_after_load_us=resident.non_expert_after_load_us,
                             handoff_us=lanes["handoff_us"], evict_us=round(evict_us, 2))
    profile = dataclasses.replace(profile, executor=executor)
    profile = dataclasses.replace(profile, executor=dataclasses.replace(
        executor, **overlap_speeds(profile, spec, layout, resident.loaded_rows)))
    return dataclasses.replace(profile, executor=dataclasses.replace(
        profile.executor, plan_us=measure_plan_us(profile, spec, layout)))


def measure_plan_us(profile: Profile, spec: ModelSpec, layout: QuantLayout,
                    decode_steps: int = 64) -> tuple[tuple[str, float], ...]:
    """Each policy's planning time a layer, (name, us) by name: `Policy.plan`'s mean wall
    time over a simulated run of a synthetic trace of `spec` (its first 8 layers, 4 bits) at
    a budget of 40% of the experts, on `profile`. The registered policies that run on the
    store's own layout without offline statistics; the simulator charges the difference to
    PLAN_BASE's. Planning grows as the budget shrinks (tiny model, Intel Xeon VM:
    `hebf-ghost` 54 us a layer at 25%, 51 at 40%, 30 at 100%; `hebf` 16, 15, 9)."""
    from d2moe.core.sizes import expert_bytes
    from d2moe.policies import POLICIES, make_policy, policy_config
    from d2moe.sim.simulator import SimSetup, simulate
    from d2moe.sim.workload import steps_from_trace
    from d2moe.traces import synth_trace
    from d2moe.traces.synth import SynthConfig

    small = dataclasses.replace(spec, layers=min(spec.layers, 8))
    bits = max(layout.b1, min(4, layout.bK))
    trace = synth_trace(small, SynthConfig(prefill_tokens=8, decode_steps=decode_steps))
    steps = steps_from_trace(trace, bits)
    budget = max(small.layers * small.experts * expert_bytes(small, bits, layout) * 2 // 5,
                 expert_bytes(small, layout.bK, layout))
    setup = SimSetup(small, profile, layout, budget)
    out = []
    for name in POLICIES.names():
        cfg = policy_config(name)
        if cfg.needs_stats or cfg.pin or cfg.layout not in ("", "nested"):
            continue
        policy = make_policy(name)
        plan, spent = policy.plan, [0.0, 0]

        def timed(*args: Any, inner: Any = plan, spent: list = spent) -> Any:
            t0 = time.perf_counter()
            result = inner(*args)
            spent[0] += time.perf_counter() - t0
            spent[1] += 1
            return result

        policy.plan = timed  # type: ignore[method-assign]
        simulate(setup, steps, policy)
        out.append((name, round(spent[0] / max(spent[1], 1) * 1e6, 2)))
    return tuple(out)


def overlap_speeds(profile: Profile, spec: ModelSpec, layout: QuantLayout,
                   rows: Sequence[Any]) -> dict[str, float]:
    """The lanes' overlap costs from a real run's rows (`overlap_speeds_from_rows`), each
    job's nominal time from `profile`'s other figures, as the simulator would charge it."""
    from d2moe.policies.view import Sizes
    from d2moe.sim.costs import ProfileCosts

    ex = profile.executor
    assert ex is not None
    costs = ProfileCosts(profile, spec, Sizes.of(spec, layout), layout)

    def load_us(row: Any, idle_us: float) -> float:
        return costs.raise_us(row.bits_from, row.bits_to) + ex.cold_us(idle_us)

    def run_us(row: Any, first_after_load: bool, first_of_plan: bool) -> float:
        return (profile.run_us(spec, row.bits_to, row.tokens, layout) + ex.run_us
                + (ex.first_run_us if first_after_load else 0.0)
                + (ex.layer_first_run_us if first_of_plan else 0.0))

    return overlap_speeds_from_rows(rows, load_us, run_us)


def _device(text: str) -> Any:
    import torch

    if text != "cpu" and not text.startswith("cuda"):
        raise UserError(f"unknown device {text!r}", field="device", fix="use cpu or cuda")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("CUDA was asked for but torch sees no CUDA device", field="device",
                        fix="use --device cpu")
    return torch.device(text)


def device_name(device: Any) -> str:
    """What a profile records of the machine: the GPU's name and host, or the CPU's model
    name with its family and model numbers (a VM's name, "AMD EPYC", spans generations whose
    speed differs 2x), cores, torch threads and the CPU kernel (native or numpy: 2-6x apart
    on one machine)."""
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {platform.node() or 'host'}"
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
            if not key.strip():  # the first processor's block ends at a blank line
                break
    except OSError:
        pass
    model = info.get("model name") or platform.processor() or platform.machine()
    if info.get("cpu family") and info.get("model"):
        model += f" (family {info['cpu family']}, model {info['model']})"
    from d2moe.kernels.cpu_native import kernel_name

    return (f"{model}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads, "
            f"{kernel_name()} kernel")


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * 2**30


def sizes_up_to(sizes: Sequence[int], largest: int) -> list[int]:
    """`sizes`, then x4 from the last until one reaches `largest` (the loads' reads)."""
    out = list(sizes)
    while out[-1] < largest:
        out.append(out[-1] * 4)
    return out


def measure_disk(reader: Any, sizes: Sequence[int], repeats: int,
                 bar: Bar) -> list[tuple[int, float]]:
    """(bytes, us) of cold reads through `reader.read_range` at random aligned offsets."""
    from d2moe.quant.store import ALIGN_BYTES, ByteRange

    span = max(64 * 2**20, 8 * max(sizes))
    span = -(-span // ALIGN_BYTES) * ALIGN_BYTES
    path = reader.path / PROBE_FILE
    rng = np.random.default_rng(1)
    with open(path, "wb") as f:
        chunk = rng.integers(0, 256, 2**20, dtype=np.uint8).tobytes()
        for _ in range(span // len(chunk) + 1):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    fd = reader._fd(PROBE_FILE)  # noqa: SLF001 (the reader's own descriptor, O_DIRECT or not)
    def reader_of(n: int) -> Callable[[int], float]:
        slots = max(1, (span - n) // ALIGN_BYTES)

        def read(i: int) -> float:
            offset = int(rng.integers(0, slots)) * ALIGN_BYTES
            if not reader.direct_io and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            reader.read_range(ByteRange(PROBE_FILE, offset, n, 0))
            return (time.perf_counter() - t0) * 1e6

        return read

    means = interleaved_means([reader_of(n) for n in sizes], repeats, lambda: None, bar,
                                  "disk")
    return list(zip(sizes, means, strict=True))


def measure_link(device: Any, sizes: Sequence[int], repeats: int,
                 bar: Bar) -> list[tuple[int, float]]:
    """(bytes, us) of pinned host -> device copies (cuda)."""
    import torch

    def copier(n: int) -> Callable[[int], None]:
        src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(n, dtype=torch.uint8, device=device)
        def copy(i: int) -> None:
            dst.copy_(src, non_blocking=True)

        return copy

    means = interleaved_means([copier(n) for n in sizes], repeats,
                                  lambda: torch.cuda.synchronize(device), bar, "link")
    return list(zip(sizes, means, strict=True))


def _fit_link(points: list[tuple[int, float]]) -> Link:
    latency, gbps = fit_latency_bandwidth(points)
    return Link(read_GBps=_sig(gbps) if math.isfinite(gbps) else 1e3,
                latency_us=round(latency, 2))


def _sig(x: float, digits: int = 4) -> float:
    """`x` rounded to `digits` significant digits (inf stays inf)."""
    return x if not math.isfinite(x) or x == 0 else round(x, digits - 1 - int(math.floor(
        math.log10(abs(x)))))
