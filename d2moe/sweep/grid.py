"""The sweep grid: policies x budgets x profiles x traces plus shared simulate options.

A grid is a YAML file read strictly (unknown keys are errors). Every error names the grid
file and the field, e.g. `traces[1].decode_steps`. An optional `capacity` mapping (the
`d2moe simulate` capacity options: capacity_mode, capacity_window, stall_high, ...) applies
to every trace recorded with a bit-width router (`d2moe trace record --router`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d2moe.core.cliargs import once_each, split_list
from d2moe.core.errors import UserError, bare
from d2moe.core.fileio import check_keys, read_yaml
from d2moe.sim.cmd import SimulateConfig

LISTS = ("policies", "budgets", "profiles", "traces")
# Shared simulate options a grid may set; defaults are SimulateConfig's.
SHARED = ("bits", "layout", "b1", "bK", "group", "host_cache", "steps", "engine")
INT_OPTIONS = {"bits": 1, "b1": 1, "bK": 1, "group": 1, "steps": 0}  # name -> least value
SYNTH_PREFIX = "synth:"

_DEFAULTS = SimulateConfig()


@dataclass(frozen=True)
class TraceEntry:
    """One trace of the grid: a .npz file, or a synthetic trace of a model spec."""

    text: str  # canonical form: `synth:SPEC[:k=v,...]` (keys sorted) or the resolved path
    spec: str  # model spec name or YAML path
    path: str = ""  # the .npz file; empty for synthetic traces
    synth: tuple[tuple[str, Any], ...] = ()  # SynthConfig overrides, sorted by key
    model_spec: str = ""  # the grid's model_spec, set on a .npz trace (empty: its header's)

    @property
    def is_synth(self) -> bool:
        """Whether the trace is generated rather than read from a file."""
        return not self.path

    def synth_config(self) -> Any:
        """The SynthConfig of a synthetic entry."""
        from d2moe.traces.synth import SynthConfig

        return SynthConfig(**dict(self.synth))


@dataclass(frozen=True)
class Grid:
    """A parsed, validated sweep grid (`d2moe sweep GRID.yaml`)."""

    path: str
    policies: tuple[str, ...]
    budgets: tuple[str, ...]
    profiles: tuple[str, ...]
    traces: tuple[TraceEntry, ...]
    bits: int = _DEFAULTS.bits
    layout: str = _DEFAULTS.layout
    b1: int = _DEFAULTS.b1
    bK: int = _DEFAULTS.bK
    group: int = _DEFAULTS.group
    host_cache: str = _DEFAULTS.host_cache
    steps: int = _DEFAULTS.steps
    engine: str = _DEFAULTS.engine
    model_spec: str = ""  # spec for .npz traces; empty: the name in the trace's header
    capacity: Any = None  # d2moe.router.adaptive.CapacityConfig for router traces, or None

    @property
    def size(self) -> int:
        """Number of cells: traces x profiles x budgets x policies."""
        return len(self.traces) * len(self.profiles) * len(self.budgets) * len(self.policies)

    def shared(self) -> dict[str, Any]:
        """The shared simulate options as SimulateConfig keyword arguments."""
        return {name: getattr(self, name) for name in SHARED}


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid YAML; raises UserError naming the file and the field."""
    path_s = str(path)
    data = read_yaml(path)
    allowed = (*LISTS, *SHARED, "model_spec", "capacity")
    check_keys(data, allowed, path=path_s, required=("policies", "budgets", "traces"))
    base = Path(path).resolve().parent
    lists = {name: _string_list(data, name, path_s) for name in LISTS if name in data}
    lists.setdefault("profiles", (_DEFAULTS.profile,))
    options = {name: _option(data, name, path_s) for name in (*SHARED, "model_spec")
               if name in data}
    if options.get("model_spec"):  # a path in it is the grid file's, as the traces' are
        options["model_spec"] = _spec_ref(str(options["model_spec"]), base)
    model_spec = str(options.get("model_spec", ""))
    traces = tuple(_trace_entry(t, i, base, path_s, model_spec)
                   for i, t in enumerate(lists["traces"]))
    profiles = tuple(_profile_ref(p, base) for p in lists["profiles"])
    capacity = _capacity(data["capacity"], path_s) if "capacity" in data else None
    grid = Grid(path=path_s, policies=lists["policies"], budgets=lists["budgets"],
                profiles=profiles, traces=traces, capacity=capacity, **options)
    _check(grid)
    return grid


def _capacity(data: Any, path: str) -> Any:
    """The `capacity` mapping as a CapacityConfig (its fields, its checks), errors named
    `capacity.FIELD`."""
    from d2moe.router.adaptive import CapacityConfig

    kinds = {f.name: type(f.default) for f in dataclasses.fields(CapacityConfig)}
    check_keys(data, tuple(kinds), path=path, where="capacity")
    values = {}
    for key, value in data.items():
        want = kinds[key]
        ok = (isinstance(value, str) if want is str else
              isinstance(value, int) and not isinstance(value, bool) if want is int else
              isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok:
            raise UserError(f"expected a {want.__name__}, got {value!r}", path=path,
                            field=f"capacity.{key}", fix=f"write a {want.__name__}")
        values[key] = want(value)
    try:
        return CapacityConfig(**values)
    except UserError as exc:
        field = (exc.field or "capacity").replace("-", "_")
        raise UserError(bare(exc), path=path, field=f"capacity.{field}", fix=exc.fix) from None


def _string_list(data: dict, name: str, path: str) -> tuple[str, ...]:
    value = data[name]
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise UserError("expected a non-empty list", path=path, field=name,
                        fix=f"e.g. {name}: [a, b]")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (str, int, float)) or not str(item):
            raise UserError(f"expected a string, got {item!r}", path=path, field=f"{name}[{i}]",
                            fix="write a plain name or value")
        out.append(str(item).strip())
    dup = next((x for i, x in enumerate(out) if x in out[:i]), None)
    if dup is not None:
        raise UserError(f"{dup!r} is listed twice", path=path, field=name,
                        fix="list each entry once")
    return tuple(out)


def _option(data: dict, name: str, path: str) -> Any:
    value = data[name]
    if name in INT_OPTIONS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"expected an integer, got {value!r}", path=path, field=name,
                            fix="write a whole number")
        if value < INT_OPTIONS[name]:
            raise UserError(f"must be >= {INT_OPTIONS[name]}, got {value}", path=path,
                            field=name, fix=f"write a whole number >= {INT_OPTIONS[name]}")
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"expected a string, got {value!r}", path=path, field=name,
                        fix="write a plain value")
    return str(value)


def _trace_entry(text: str, i: int, base: Path, path: str, model_spec: str) -> TraceEntry:
    where = f"traces[{i}]"
    if text.startswith(SYNTH_PREFIX):
        entry = parse_synth(text, path=path, where=where)
        ref = _spec_ref(entry.spec, base)  # a spec file: from the grid's directory, as the
        if ref == entry.spec:  # trace files, profiles and model_spec are
            return entry
        return dataclasses.replace(entry, spec=ref, text=SYNTH_PREFIX + ref + entry.text[
            len(SYNTH_PREFIX + entry.spec):])
    file = Path(text) if Path(text).is_absolute() else base / text
    if not file.is_file():
        raise UserError(f"no such trace file {str(file)!r}", path=path, field=where,
                        fix="give a trace .npz (paths are relative to the grid file) or "
                            "synth:SPEC")
    from d2moe.traces import load_trace

    try:
        spec = model_spec or load_trace(file).spec_name
    except UserError as exc:  # its text names the trace file and the fix already
        raise UserError(f"cannot read the trace: {exc}", path=path, field=where) from None
    return TraceEntry(text=str(file), spec=spec, path=str(file), model_spec=model_spec)


def parse_synth(text: str, *, path: str = "", where: str = "trace") -> TraceEntry:
    """`synth:SPEC` or `synth:SPEC:seed=1,decode_steps=16` (SynthConfig fields)."""
    from d2moe.traces.synth import SynthConfig

    rest = text[len(SYNTH_PREFIX):]
    spec, _, opts = rest.partition(":")
    if not spec.strip():
        raise UserError(f"no model spec in {text!r}", path=path, field=where,
                        fix="write synth:SPEC, e.g. synth:tiny")
    kinds = {f.name: type(f.default) for f in dataclasses.fields(SynthConfig)}
    overrides: dict[str, Any] = {}
    key = ""
    for part in split_list(opts, where, path=path, example="synth:tiny:seed=1,bits=2,3",
                           unique=False, allow_none=True):
        if "=" not in part and kinds.get(key) is str:  # bits=2,3,4: the list goes on
            overrides[key] += "," + part
            continue
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in kinds:
            raise UserError(f"cannot read {part!r} (keys: {', '.join(kinds)})", path=path,
                            field=where, fix="write key=value, e.g. synth:tiny:seed=1")
        if key in overrides:
            raise UserError(f"{key!r} is given twice in {text!r}", path=path, field=where,
                            fix=f"give {key} once")
        try:
            overrides[key] = value.strip() if kinds[key] is str else kinds[key](value)
        except ValueError:
            raise UserError(f"{key}={value!r} is not a {kinds[key].__name__}", path=path,
                            field=f"{where}.{key}", fix="write a number") from None
    try:
        SynthConfig(**overrides)
    except UserError as exc:
        raise UserError(bare(exc), path=path, field=f"{where}.{exc.field or 'synth'}",
                        fix=exc.fix) from None
    items = tuple(sorted(overrides.items()))
    canon = SYNTH_PREFIX + spec.strip()
    if items:
        canon += ":" + ",".join(f"{k}={v}" for k, v in items)
    return TraceEntry(text=canon, spec=spec.strip(), synth=items)


def _spec_ref(ref: str, base: Path) -> str:
    """A shipped spec name as it is; a relative path (spec YAML, config.json or checkpoint
    directory) taken from the grid file's directory."""
    from d2moe.core.spec import shipped_specs

    if ref in shipped_specs() or Path(ref).is_absolute():
        return ref
    return str(base / ref)


def _profile_ref(ref: str, base: Path) -> str:
    from d2moe.profiles.files import shipped_profiles

    if ref in shipped_profiles() or Path(ref).is_absolute():
        return ref
    return str(base / ref)


def _check(grid: Grid) -> None:
    """Fail before any work on names, options and files that cannot run at all."""
    from d2moe.core.sizes import QuantLayout, parse_budget
    from d2moe.core.spec import load_spec
    from d2moe.policies import POLICIES
    from d2moe.profiles import load_profile
    from d2moe.sim.simulator import ENGINES

    path = grid.path
    for i, name in enumerate(grid.policies):
        if name not in POLICIES.names():
            raise UserError(f"unknown policy {name!r}", path=path, field=f"policies[{i}]",
                            fix=f"choose from: {', '.join(POLICIES.names())}")
    for i, text in enumerate(grid.budgets):
        try:
            parse_budget(text, 1)
        except UserError as exc:  # unreadable, or a bare 1.5 (bytes, not whole)
            raise UserError(bare(exc), path=path, field=f"budgets[{i}]", fix=exc.fix) from None
    # one budget written twice ('50%', '0.5'): the same bytes whatever the model's total
    once_each([(parse_budget(t, 1 << 40), parse_budget(t, 1 << 41)) for t in grid.budgets],
              list(grid.budgets), "budgets", example="budgets: [25%, 50%]", path=path)
    try:
        parse_budget(grid.host_cache, 1)
    except UserError:
        raise UserError(f"cannot read {grid.host_cache!r} as bytes", path=path,
                        field="host_cache", fix="write 0, 4GiB or 50%") from None
    if grid.engine not in ENGINES:
        raise UserError(f"unknown engine {grid.engine!r}", path=path, field="engine",
                        fix=f"use one of: {', '.join(ENGINES)}")
    try:
        layout = QuantLayout(kind=grid.layout, b1=grid.b1, bK=grid.bK, group=grid.group)
    except UserError as exc:  # QuantLayout names kind, store-bits (b1:bK) or group
        field = {"kind": "layout", "store-bits": "b1"}.get(exc.field or "", exc.field)
        fix = "write b1 and bK with 1 <= b1 <= bK <= 8" if exc.field == "store-bits" else exc.fix
        raise UserError(bare(exc), path=path, field=field, fix=fix) from None
    try:
        layout.check_bits(grid.bits)
    except UserError as exc:
        raise UserError(bare(exc), path=path, field="bits", fix=exc.fix) from None
    for i, ref in enumerate(grid.profiles):
        try:
            load_profile(ref)
        except UserError as exc:  # its text has the profile's own fix
            raise UserError(str(exc), path=path, field=f"profiles[{i}]") from None
    _check_model_spec(grid)
    for i, entry in enumerate(grid.traces):
        try:
            load_spec(entry.spec)
        except UserError as exc:  # its text has the spec's own fix
            raise UserError(str(exc), path=path, field=f"traces[{i}]") from None
    texts = [t.text for t in grid.traces]
    dup = next((t for i, t in enumerate(texts) if t in texts[:i]), None)
    if dup is not None:
        raise UserError(f"{dup!r} is listed twice", path=path, field="traces",
                        fix="list each trace once")


def _check_model_spec(grid: Grid) -> None:
    """`model_spec` must load, and must apply to some trace: it names the spec of the .npz
    traces only (a synth:SPEC trace names its own), so a grid of synthetic traces whose
    spec differs would silently ignore it."""
    from d2moe.core.spec import load_spec

    if not grid.model_spec:
        return
    try:
        spec = load_spec(grid.model_spec)
    except UserError as exc:  # its text has the spec's own fix
        raise UserError(str(exc), path=grid.path, field="model_spec") from None
    if any(not t.is_synth for t in grid.traces):
        return
    for i, entry in enumerate(grid.traces):
        try:
            same = entry.spec == grid.model_spec or load_spec(entry.spec).name == spec.name
        except UserError:  # the trace's own check names it
            continue
        if not same:
            raise UserError(f"applies to .npz traces only, and this grid has none: "
                            f"traces[{i}] {entry.text!r} names its own spec", path=grid.path,
                            field="model_spec",
                            fix="remove model_spec, or name the spec in the trace "
                                f"(synth:{grid.model_spec})")
