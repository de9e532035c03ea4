"""Profile YAML at the edge: strict parsing into `Profile` (errors name the file and the
dotted field), the shipped profiles, and atomic saving."""

from __future__ import annotations

import datetime
import math
from importlib import resources
from pathlib import Path
from typing import Any

from d2moe.core.errors import UserError
from d2moe.core.fileio import atomic_write, check_keys, read_yaml
from d2moe.core.sizes import DENSE_BITS, parse_bytes
from d2moe.profiles.schema import (
    ExecutorCosts,
    ExpertRoofline,
    ExpertRow,
    ExpertTable,
    Link,
    NonExpertRoofline,
    NonExpertRow,
    NonExpertTable,
    Profile,
    Source,
)

PROFILE_KEYS = ("name", "source", "disk", "link", "unified_memory", "host_memory_bytes",
                "device_memory_bytes", "io_lanes", "shared_bandwidth", "expert", "non_expert",
                "executor")
EXECUTOR_KEYS = ("layer_us", "load_us", "load_GBps", "check_GBps", "run_us", "wake_us",
                 "overlap_io_speed", "overlap_compute_speed", "overlap_run_wait_us",
                 "first_run_us", "layer_first_run_us", "handoff_us", "non_expert_after_load_us",
                 "evict_us", "cold_curve_us", "plan_us")
# the cold cost as profiles before 2026-11-24 21:00 UTC wrote it: floor_us * min(1, idle /
# 250 us) + load_us * min(1, idle / ramp_us) (cold_read_us: load_us's name before 2026-11-23)
OLD_COLD_KEYS = ("cold_floor_us", "cold_load_us", "cold_ramp_us", "cold_read_us")
OLD_COLD_FLOOR_RAMP_US = 250.0
_REQUIRED = ("name", "source", "disk", "link", "unified_memory", "device_memory_bytes",
             "expert", "non_expert")


class _Reader:
    """Typed getters that raise UserError naming the file and the dotted field."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, where: str, message: str, fix: str) -> UserError:
        return UserError(message, path=self.path, field=where, fix=fix)

    def number(self, d: dict[str, Any], key: str, where: str, *, positive: bool) -> float:
        v, at = d.get(key), _at(where, key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self.fail(at, f"must be a number, got {v!r}", "write a plain number")
        if (v <= 0) if positive else (v < 0):
            raise self.fail(at, f"must be {'> 0' if positive else '>= 0'}, got {v!r}",
                            "write a positive value" if positive else "write 0 or more")
        return float(v)

    def integer(self, d: dict[str, Any], key: str, where: str, *, low: int) -> int:
        v, at = d.get(key), _at(where, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise self.fail(at, f"must be an integer >= {low}, got {v!r}", "write a whole number")
        return v

    def size(self, d: dict[str, Any], key: str, where: str, *, low: int) -> int:
        """Bytes as an integer or text ('6GiB'); unreadable text ('-1GiB', '1e999') fails
        like a small number, naming this file."""
        v, at = d.get(key), _at(where, key)
        n = v if isinstance(v, int) and not isinstance(v, bool) else None
        if isinstance(v, str):
            try:
                n = parse_bytes(v, field=at)
            except UserError:
                n = None
        if n is None or n < low:
            raise self.fail(at, f"must be a byte count >= {low}, got {v!r}",
                            "write bytes, e.g. 6442450944 or 6GiB")
        return n

    def flag(self, d: dict[str, Any], key: str, where: str) -> bool:
        v = d.get(key)
        if not isinstance(v, bool):
            raise self.fail(_at(where, key), f"must be true or false, got {v!r}",
                            "write true or false")
        return v

    def text(self, d: dict[str, Any], key: str, where: str) -> str:
        v = d.get(key)
        if isinstance(v, datetime.date):
            return v.isoformat()
        if not isinstance(v, str) or not v.strip():
            raise self.fail(_at(where, key), f"must be non-empty text, got {v!r}", "write text")
        return v

    def keys(self, d: Any, allowed: tuple[str, ...], where: str,
             required: tuple[str, ...] | None = None) -> dict[str, Any]:
        return check_keys(d, set(allowed), path=self.path, where=where,
                          required=allowed if required is None else required)


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def profile_from_dict(data: Any, *, path: str) -> Profile:
    """Validate a parsed profile mapping strictly and build the Profile."""
    r = _Reader(path)
    d = r.keys(data, PROFILE_KEYS, "", _REQUIRED)
    src = r.keys(d["source"], ("kind", "device", "date", "command", "basis"), "source", ("kind",))
    if src["kind"] == "measured":
        r.keys(src, ("kind", "device", "date", "command"), "source")
        source = Source("measured", r.text(src, "device", "source"),
                        r.text(src, "date", "source"), r.text(src, "command", "source"))
    elif src["kind"] == "estimated":
        r.keys(src, ("kind", "basis"), "source")
        basis = src["basis"]
        if not isinstance(basis, dict) or not basis:
            raise r.fail("source.basis", "must be a non-empty mapping of figure: spec-sheet text",
                         "list each figure with the spec-sheet value it comes from")
        source = Source("estimated", basis=tuple(
            (str(k), r.text(basis, k, "source.basis")) for k in basis))
    else:
        raise r.fail("source.kind", f"must be measured or estimated, got {src['kind']!r}",
                     "write kind: measured (with device, date, command) or kind: estimated "
                     "(with basis)")
    disk = _link(r, d["disk"], "disk", reads=True)
    unified = r.flag(d, "unified_memory", "")
    link = None if d["link"] is None else _link(r, d["link"], "link")
    if unified != (link is None):
        raise r.fail("link", "must be null exactly when unified_memory is true",
                     "a discrete GPU needs link: {read_GBps, latency_us}; unified memory has "
                     "link: null")
    host = 0 if d.get("host_memory_bytes") is None else r.size(d, "host_memory_bytes", "", low=1)
    if unified and host:
        raise r.fail("host_memory_bytes", "a unified-memory device has no separate host tier",
                     "remove host_memory_bytes; count the shared memory in device_memory_bytes")
    lanes = r.integer(d, "io_lanes", "", low=1) if "io_lanes" in d else 1
    shared = r.flag(d, "shared_bandwidth", "") if "shared_bandwidth" in d else True
    return Profile(name=r.text(d, "name", ""), source=source, disk=disk, link=link,
                   unified_memory=unified,
                   device_memory_bytes=r.size(d, "device_memory_bytes", "", low=1),
                   host_memory_bytes=host, io_lanes=lanes, shared_bandwidth=shared,
                   expert=_expert(r, d["expert"]), non_expert=_non_expert(r, d["non_expert"]),
                   executor=None if d.get("executor") is None else _executor(r, d["executor"]))


def _executor(r: _Reader, data: Any) -> ExecutorCosts:
    d = r.keys(data, EXECUTOR_KEYS + OLD_COLD_KEYS, "executor", ())
    old = {k: r.number(d, k, "executor", positive=False) for k in OLD_COLD_KEYS if k in d}
    if old and "cold_curve_us" in d:
        raise r.fail("executor.cold_curve_us", "is given with the older cold keys "
                     f"{', '.join(old)}", "keep cold_curve_us and remove the others")
    costs: dict[str, Any] = {
        k: r.number(d, k, "executor", positive=k.endswith("GBps") or "speed" in k)
        for k in d if k not in OLD_COLD_KEYS and k not in ("cold_curve_us", "plan_us")}
    for k in ("overlap_io_speed", "overlap_compute_speed"):
        if costs.get(k, 1.0) > 1.0:
            raise r.fail(f"executor.{k}", f"must be in (0, 1], got {costs[k]}",
                         "write the fraction of its own speed the lane keeps (1: no contention)")
    if "cold_curve_us" in d:
        costs["cold_curve_us"] = _pairs(r, d["cold_curve_us"], "executor.cold_curve_us", 0,
                                        ("idle_us", "extra_us"),
                                        "write [[idle_us, extra_us], ...], idle rising")
    elif old:
        costs["cold_curve_us"] = _old_cold_curve(old)
    if "plan_us" in d:
        plans = d["plan_us"]
        if not isinstance(plans, dict) or not all(isinstance(k, str) for k in plans):
            raise r.fail("executor.plan_us", f"must map policy names to microseconds, got "
                         f"{plans!r}", "write {fifo: 17.5, hebf: 20.5, ...} (d2moe profile)")
        costs["plan_us"] = tuple(sorted(
            (k, r.number(plans, k, "executor.plan_us", positive=False)) for k in plans))
    return ExecutorCosts(**costs)


def _old_cold_curve(old: dict[str, float]) -> tuple[tuple[float, float], ...]:
    """An older profile's floor and ramp as the curve through their corners (the same
    function: both are linear between them and flat past the last)."""
    floor = old.get("cold_floor_us", 0.0)
    full = old.get("cold_load_us", old.get("cold_read_us", 0.0))
    ramp = old.get("cold_ramp_us", 0.0) or 1.0  # 0: the whole amount after any idle time

    def at(idle: float) -> float:
        return floor * min(1.0, idle / OLD_COLD_FLOOR_RAMP_US) + full * min(1.0, idle / ramp)

    if floor <= 0 and full <= 0:
        return ()
    corners = sorted({OLD_COLD_FLOOR_RAMP_US, ramp})
    return tuple((idle, at(idle)) for idle in corners)


def _link(r: _Reader, data: Any, where: str, reads: bool = False) -> Link:
    keys = ("read_GBps", "latency_us")
    d = r.keys(data, (*keys, "reads") if reads else keys, where, keys)
    return Link(r.number(d, "read_GBps", where, positive=True),
                r.number(d, "latency_us", where, positive=False),
                _reads(r, d["reads"], f"{where}.reads") if "reads" in d else ())


def _reads(r: _Reader, data: Any, where: str) -> tuple[tuple[int, float], ...]:
    """[[bytes, us], ...]: at least two requests, bytes increasing, times >= 0."""
    pairs = _pairs(r, data, where, 2, ("bytes", "us"), "write [[bytes, us], ...] with at "
                   "least two sizes, bytes increasing (d2moe profile)", whole=True)
    return tuple((int(n), us) for n, us in pairs)


def _pairs(r: _Reader, data: Any, where: str, least: int, names: tuple[str, str], fix: str,
           whole: bool = False) -> tuple[tuple[float, float], ...]:
    """[[x, y], ...] (`names`: what x and y are): at least `least` pairs, x > 0 and rising
    (whole numbers if `whole`), y >= 0."""
    x_name, y_name = names
    if not isinstance(data, list) or len(data) < least:
        raise r.fail(where, f"must be a list of at least {least} [{x_name}, {y_name}], "
                     f"got {data!r}", fix)
    out: list[tuple[float, float]] = []
    for i, pair in enumerate(data):
        ok = isinstance(pair, list | tuple) and len(pair) == 2
        x, y = pair if ok else (None, None)
        if not ok or not _finite(x) or (whole and not isinstance(x, int)) or x <= 0 \
                or not _finite(y) or y < 0 or (out and x <= out[-1][0]):
            raise r.fail(f"{where}[{i}]", f"must be [{x_name} > 0, {y_name} >= 0] with "
                         f"{x_name} past the previous one's, got {pair!r}", fix)
        out.append((x if whole else float(x), float(y)))
    return tuple(out)


def _finite(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)


def _one_of(r: _Reader, data: Any, where: str) -> tuple[str, Any]:
    d = r.keys(data, ("roofline", "table"), where, ())
    if len(d) != 1:
        raise r.fail(where, "needs exactly one of roofline or table",
                     "keep either the roofline figures or the measured table")
    (kind, body), = d.items()
    return kind, body


def _rows(r: _Reader, body: Any, where: str) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(body, list) or not body:
        raise r.fail(where, "must be a non-empty list of rows", "add measured rows")
    return [(f"{where}[{i}]", row) for i, row in enumerate(body)]


def _expert(r: _Reader, data: Any) -> ExpertRoofline | ExpertTable:
    kind, body = _one_of(r, data, "expert")
    if kind == "roofline":
        w = "expert.roofline"
        d = r.keys(body, ("mem_GBps", "peak_TFLOPs", "dequant_ns_per_Mweight_bit", "launch_us"), w)
        return ExpertRoofline(r.number(d, "mem_GBps", w, positive=True),
                              r.number(d, "peak_TFLOPs", w, positive=True),
                              r.number(d, "dequant_ns_per_Mweight_bit", w, positive=False),
                              r.number(d, "launch_us", w, positive=False))
    rows, seen = [], set()
    for w, raw in _rows(r, body, "expert.table"):
        d = r.keys(raw, ("shape", "bits", "tokens", "latency_us"), w)
        row = ExpertRow(r.text(d, "shape", w), r.integer(d, "bits", w, low=1),
                        r.integer(d, "tokens", w, low=1),
                        r.number(d, "latency_us", w, positive=False))
        if row.bits > DENSE_BITS:
            raise r.fail(f"{w}.bits", f"must be <= {DENSE_BITS}, got {row.bits}",
                         "write the bit-width the run used")
        if (row.shape, row.bits, row.tokens) in seen:
            raise r.fail(w, "repeats an earlier row's shape, bits and tokens",
                         "keep one measurement per point (e.g. the median)")
        seen.add((row.shape, row.bits, row.tokens))
        rows.append(row)
    return ExpertTable(tuple(rows))


def _non_expert(r: _Reader, data: Any) -> NonExpertRoofline | NonExpertTable:
    kind, body = _one_of(r, data, "non_expert")
    if kind == "roofline":
        w = "non_expert.roofline"
        d = r.keys(body, ("mem_GBps", "peak_TFLOPs", "layer_overhead_us"), w)
        return NonExpertRoofline(r.number(d, "mem_GBps", w, positive=True),
                                 r.number(d, "peak_TFLOPs", w, positive=True),
                                 r.number(d, "layer_overhead_us", w, positive=False))
    rows, seen = [], set()
    for w, raw in _rows(r, body, "non_expert.table"):
        d = r.keys(raw, ("model", "tokens", "latency_us", "head_us"), w,
                   ("model", "tokens", "latency_us"))
        row = NonExpertRow(r.text(d, "model", w), r.integer(d, "tokens", w, low=1),
                           r.number(d, "latency_us", w, positive=False),
                           r.number(d, "head_us", w, positive=False) if "head_us" in d else 0.0)
        if (row.model, row.tokens) in seen:
            raise r.fail(w, "repeats an earlier row's model and tokens",
                         "keep one measurement per point")
        seen.add((row.model, row.tokens))
        rows.append(row)
    return NonExpertTable(tuple(rows))


# -- files -------------------------------------------------------------------------------------

def shipped_profiles() -> tuple[str, ...]:
    """Names `load_profile` accepts besides a path."""
    root = resources.files("d2moe.profiles")
    return tuple(sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml")))


def shipped_profile_of(device: str, *, cuda: bool = False) -> str | None:
    """The shipped measured profile of a machine that described itself as `device` does
    (`measure.device_name`: a CPU's model with family and model numbers, cores, torch
    threads and kernel; with `cuda`, a GPU's name, its host left out), else the one of the
    same CPU model and cores with other threads or kernel, else None."""
    def key(line: str, part: int) -> str:
        """The line whole (0), without a GPU's host (cuda), or up to the cores (1)."""
        if cuda:
            return line.rsplit(", ", 1)[0]
        return line if part == 0 else line.split(", torch ")[0]

    measured = [(n, load_profile(n).source) for n in shipped_profiles()]
    measured = [(n, src.device) for n, src in measured if src.kind == "measured"]
    for part in (0,) if cuda else (0, 1):
        for name, line in measured:
            if key(line, part) == key(device, part):
                return name
    return None


def load_profile(ref: str | Path) -> Profile:
    """A shipped profile name (`shipped_profiles()`) or a profile YAML path."""
    ref_s = str(ref)
    if ref_s in shipped_profiles():
        import yaml

        text = resources.files("d2moe.profiles").joinpath(f"{ref_s}.yaml").read_text()
        return profile_from_dict(yaml.safe_load(text), path=f"<shipped profile {ref_s}>")
    if not Path(ref_s).is_file():
        raise UserError(f"not a shipped profile ({', '.join(shipped_profiles())}) nor an "
                        f"existing file", path=ref_s,
                        fix="name a shipped profile or a profile YAML")
    return profile_from_dict(read_yaml(ref_s), path=ref_s)


def save_profile(path: str | Path, profile: Profile) -> None:
    """Write `profile` as YAML, atomically."""
    import yaml

    with atomic_write(Path(path), "w") as f:
        f.write(f"# d2moe hardware profile ({profile.source.kind}); units in the key names\n")
        yaml.safe_dump(profile.to_dict(), f, sort_keys=False, default_flow_style=False)
