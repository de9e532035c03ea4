"""The workload trace: per step and MoE layer, each token's top-k experts, router weights, bits.

File: one `.npz` with the arrays below plus `header`, a JSON string
`{"format": "d2moe.trace", "version": 1, "spec": {name, layers, experts, top_k}, "meta": {...}}`.

  phase        int8    [S]        0 prefill, 1 decode
  step_offsets int64   [S+1]      tokens of step s are rows step_offsets[s]:step_offsets[s+1]
  experts      int16   [N, L, k]  expert ids, distinct within a token's top-k
  weights      float32 [N, L, k]  router weights (finite, >= 0)
  bits         int8    [N, L, k]  chosen bit-width, 0 = unknown (the replayer's default applies)
  prefs        float32 [N, L, k, K]  optional: the bit-width router's gate probabilities per
                                  (token, slot) over its K widths, with meta `router_config`
                                  (bits, capacities, granularity, window); lets the simulator
                                  re-place widths under moved capacities (d2moe/sim/adaptive.py)

Everything is validated on construction and on load; errors name the file, field and fix.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from d2moe.core.errors import UserError
from d2moe.core.fileio import atomic_write
from d2moe.core.jobs import Demand, ExpertKey
from d2moe.core.spec import ModelSpec

TRACE_FORMAT = "d2moe.trace"
TRACE_VERSION = 1
PHASES = ("prefill", "decode")  # index = phase code
PREFILL, DECODE = 0, 1
MAX_BITS = 16
ARRAYS = ("phase", "step_offsets", "experts", "weights", "bits")
OPTIONAL_ARRAYS = ("prefs",)
GRANULARITIES = ("slot", "token")  # the bit-width router's (d2moe/router/gate.py), torch-free
_FIX_RECREATE = "re-create the trace with `d2moe trace synth` or the executor's recorder"
_FIX_DAMAGED = "the trace is damaged: record or synthesize it again"
_ZIP_MAGIC = b"PK\x03\x04"  # every .npz is a zip archive and starts with this


class Trace:
    """A validated workload trace; arrays are read-only, demands are computed once per bits."""

    def __init__(self, spec_name: str, num_experts: int, phase: Any, step_offsets: Any,
                 experts: Any, weights: Any, bits: Any = None, meta: dict[str, Any] | None = None,
                 *, path: str | None = None, prefs: Any = None) -> None:
        experts_a = np.asarray(experts)
        if bits is None:
            bits = np.zeros(experts_a.shape, dtype=np.int8)
        arrays = _validate(
            {"phase": np.asarray(phase), "step_offsets": np.asarray(step_offsets),
             "experts": experts_a, "weights": np.asarray(weights), "bits": np.asarray(bits)},
            num_experts=num_experts, path=path)
        if prefs is not None:
            arrays["prefs"] = _validate_prefs(np.asarray(prefs), arrays["bits"], meta or {}, path)
        for a in arrays.values():
            a.flags.writeable = False
        self.spec_name = str(spec_name)
        self.num_experts = int(num_experts)
        self.path = path  # the file it came from, for error messages
        self.meta: dict[str, Any] = dict(meta or {})
        self.phase_codes: np.ndarray = arrays["phase"]
        self.step_offsets: np.ndarray = arrays["step_offsets"]
        self.experts: np.ndarray = arrays["experts"]
        self.weights: np.ndarray = arrays["weights"]
        self.bits: np.ndarray = arrays["bits"]
        self.prefs: np.ndarray | None = arrays.get("prefs")  # [N, L, k, K] or None
        self._demands: dict[int, list[list[list[Demand]]]] = {}

    @classmethod
    def from_steps(cls, spec_name: str, num_experts: int,
                   steps: Sequence[tuple[int, Any, Any, Any]],
                   meta: dict[str, Any] | None = None, *, prefs: Any = None) -> Trace:
        """Build from per-step (phase code, experts [n,L,k], weights [n,L,k], bits or None);
        `prefs` [N, L, k, K] over all steps' tokens, or None."""
        if not steps:
            raise UserError("a trace needs at least one step", field="steps",
                            fix="record at least one forward step")
        counts = [len(np.asarray(e)) for _, e, _, _ in steps]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        experts = np.concatenate([np.asarray(e) for _, e, _, _ in steps])
        weights = np.concatenate([np.asarray(w) for _, _, w, _ in steps])
        bits = np.concatenate([np.zeros(np.shape(e), np.int8) if b is None else np.asarray(b)
                               for _, e, _, b in steps])
        return cls(spec_name, num_experts, [p for p, _, _, _ in steps], offsets, experts,
                   weights, bits, meta, prefs=prefs)

    # -- shape ---------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """Forward steps in the trace."""
        return len(self.phase_codes)

    @property
    def num_tokens(self) -> int:
        """Tokens over all steps."""
        return int(self.step_offsets[-1])

    @property
    def layers(self) -> int:
        """MoE layers per token."""
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        """Experts per token and layer."""
        return int(self.experts.shape[2])

    def phase(self, step: int) -> str:
        """'prefill' or 'decode' (the Event kind of the step row)."""
        return PHASES[int(self.phase_codes[step])]

    def tokens(self, step: int) -> int:
        """Tokens processed together in `step`."""
        return int(self.step_offsets[step + 1] - self.step_offsets[step])

    def token_range(self, step: int) -> tuple[int, int]:
        """Rows [start, stop) of the per-token arrays that belong to `step`."""
        return int(self.step_offsets[step]), int(self.step_offsets[step + 1])

    def check_spec(self, spec: ModelSpec) -> None:
        """Raise UserError unless layers, experts and top_k agree with `spec`."""
        for name, mine, theirs in (("layers", self.layers, spec.layers),
                                   ("experts", self.num_experts, spec.experts),
                                   ("top_k", self.top_k, spec.top_k)):
            if mine != theirs:
                raise UserError(f"trace of {self.spec_name!r} has {name}={mine} but model spec "
                                f"{spec.name!r} has {name}={theirs}", path=self.path,
                                field=f"spec.{name}",
                                fix="use a trace recorded or synthesized for this model spec")

    def slice(self, steps: int | slice) -> Trace:
        """The first `steps` steps (an int) or a contiguous range of steps (a slice)."""
        rng = range(self.num_steps)[slice(steps) if isinstance(steps, int) else steps]
        if rng.step != 1 or len(rng) == 0:
            raise UserError(f"cannot take steps {steps!r} of a {self.num_steps}-step trace",
                            field="steps", fix="ask for a non-empty contiguous range")
        lo, hi = int(self.step_offsets[rng.start]), int(self.step_offsets[rng.stop])
        meta = dict(self.meta, sliced_from_steps=[rng.start, rng.stop])
        return Trace(self.spec_name, self.num_experts, self.phase_codes[rng.start:rng.stop],
                     self.step_offsets[rng.start:rng.stop + 1] - lo, self.experts[lo:hi],
                     self.weights[lo:hi], self.bits[lo:hi], meta,
                     prefs=None if self.prefs is None else self.prefs[lo:hi])

    # -- replay ----------------------------------------------------------------------------
    def demands(self, default_bits: int) -> list[list[list[Demand]]]:
        """Demands indexed [step][layer], sorted by (expert, bits); cached per default_bits.

        Tokens are grouped by (expert, bits) with bits = the trace's bits, or `default_bits`
        where 0; `tokens` counts them and `importance` is their largest router weight.
        The returned lists are shared by every caller: do not mutate them.
        """
        cached = self._demands.get(default_bits)
        if cached is None:
            cached = self._demands[default_bits] = _group_demands(self, default_bits)
        return cached

    def to_header(self) -> dict[str, Any]:
        """The JSON header written beside the arrays."""
        return {"format": TRACE_FORMAT, "version": TRACE_VERSION,
                "spec": {"name": self.spec_name, "layers": self.layers,
                         "experts": self.num_experts, "top_k": self.top_k},
                "meta": self.meta}

    def __repr__(self) -> str:
        return (f"Trace({self.spec_name!r}, steps={self.num_steps}, tokens={self.num_tokens}, "
                f"layers={self.layers}, experts={self.num_experts}, top_k={self.top_k})")


def _group_demands(trace: Trace, default_bits: int) -> list[list[list[Demand]]]:
    """The whole trace's demands [step][layer] (`group_demands` over every step)."""
    return group_demands(trace.experts, trace.weights, trace.bits, trace.step_offsets,
                         trace.num_experts, default_bits)


def group_demands(experts: np.ndarray, weights: np.ndarray, bits: np.ndarray,
                  step_offsets: np.ndarray, num_experts: int, default_bits: int
                  ) -> list[list[list[Demand]]]:
    """Demands [step][layer] of the tokens' experts, weights and bits [N, L, k] (bits 0:
    `default_bits`): per (layer, expert, bits) one Demand, tokens = count, importance = the
    largest router weight, sorted by (expert, bits). Bulk numpy: one sort over (step, layer,
    expert, bits) keys. The simulator's adaptive capacity calls it per step with the
    widths it re-placed (d2moe/sim/adaptive.py)."""
    if not 1 <= default_bits <= MAX_BITS:
        raise UserError(f"default bits must be in 1..{MAX_BITS}, got {default_bits}",
                        field="default_bits", fix="pass e.g. 4")
    n, L, k = experts.shape
    S, E, B = len(step_offsets) - 1, num_experts, MAX_BITS + 1
    step_of_token = np.repeat(np.arange(S, dtype=np.int64), np.diff(step_offsets))
    step = np.broadcast_to(step_of_token[:, None, None], (n, L, k)).ravel()
    layer = np.broadcast_to(np.arange(L, dtype=np.int64)[None, :, None], (n, L, k)).ravel()
    expert = experts.ravel().astype(np.int64)
    bits = bits.ravel().astype(np.int64)
    bits = np.where(bits == 0, default_bits, bits)
    weight = weights.ravel()
    # key order = (step, layer, expert, bits): the demand order the API promises
    key = ((step * L + layer) * E + expert) * B + bits
    order = np.argsort(key, kind="stable")
    key_s = key[order]
    starts = np.flatnonzero(np.r_[True, key_s[1:] != key_s[:-1]])
    counts = np.diff(np.r_[starts, len(key_s)])
    importance = np.maximum.reduceat(weight[order], starts) if len(starts) else weight[:0]
    gk = key_s[starts]
    g_bits, rest = gk % B, gk // B
    g_expert, rest = rest % E, rest // E
    g_layer, g_step = rest % L, rest // L
    keys = [ExpertKey(l_, e) for l_ in range(L) for e in range(E)]  # shared key objects
    flat = list(map(Demand, [keys[i] for i in (g_layer * E + g_expert).tolist()],
                    g_bits.tolist(), counts.tolist(), importance.tolist()))
    # groups are sorted by cell = step * L + layer: cut the flat list at each cell's start
    bounds = np.searchsorted(g_step * L + g_layer, np.arange(S * L + 1)).tolist()
    out = [[flat[bounds[c]:bounds[c + 1]] for c in range(s * L, (s + 1) * L)] for s in range(S)]
    return out


def _fail(path: str | None, field: str, message: str, fix: str = _FIX_RECREATE) -> UserError:
    return UserError(message, path=path, field=field, fix=fix)


def _as_int(a: np.ndarray, name: str, path: str | None, dtype: type) -> np.ndarray:
    if a.dtype.kind not in "iu":
        raise _fail(path, name, f"must hold integers, got dtype {a.dtype}")
    info = np.iinfo(dtype)
    if a.size and (a.min() < info.min or a.max() > info.max):
        raise _fail(path, name, f"values outside {np.dtype(dtype).name} range")
    return a.astype(dtype, copy=True)


def _validate(arrays: dict[str, np.ndarray], *, num_experts: int,
              path: str | None) -> dict[str, np.ndarray]:
    """Check every invariant of the format; return canonical-dtype copies."""
    if not isinstance(num_experts, int | np.integer) or not 1 <= num_experts <= 32767:
        raise _fail(path, "spec.experts", f"must be an integer in 1..32767, got {num_experts!r}")
    experts, weights, bits = arrays["experts"], arrays["weights"], arrays["bits"]
    phase, offsets = arrays["phase"], arrays["step_offsets"]
    if experts.ndim != 3 or experts.shape[1] < 1 or experts.shape[2] < 1:
        raise _fail(path, "experts", f"must have shape [tokens, layers, top_k], got "
                                     f"{list(experts.shape)}")
    for name, a in (("weights", weights), ("bits", bits)):
        if a.shape != experts.shape:
            raise _fail(path, name, f"shape {list(a.shape)} differs from experts' "
                                    f"{list(experts.shape)}")
    if phase.ndim != 1 or len(phase) == 0:
        raise _fail(path, "phase", f"must be a non-empty 1-D array, got shape {list(phase.shape)}")
    if offsets.shape != (len(phase) + 1,):
        raise _fail(path, "step_offsets", f"shape {list(offsets.shape)} must be "
                                          f"[steps + 1] = [{len(phase) + 1}]")
    experts = _as_int(experts, "experts", path, np.int16)
    bits = _as_int(bits, "bits", path, np.int8)
    phase = _as_int(phase, "phase", path, np.int8)
    offsets = _as_int(offsets, "step_offsets", path, np.int64)
    if weights.dtype.kind != "f":
        raise _fail(path, "weights", f"must hold floats, got dtype {weights.dtype}")
    weights = weights.astype(np.float32, copy=True)
    bad = np.flatnonzero((phase != PREFILL) & (phase != DECODE))
    if bad.size:
        raise _fail(path, "phase", f"step {bad[0]} has phase {phase[bad[0]]}; "
                                   f"valid: 0 (prefill), 1 (decode)")
    if offsets[0] != 0 or offsets[-1] != len(experts):
        raise _fail(path, "step_offsets", f"must start at 0 and end at the token count "
                                          f"{len(experts)}, got {offsets[0]}..{offsets[-1]}")
    bad = np.flatnonzero(np.diff(offsets) <= 0)
    if bad.size:
        s = int(bad[0])
        raise _fail(path, "step_offsets", f"must increase strictly (every step has a token); "
                                          f"step {s} has {offsets[s + 1] - offsets[s]}")
    if experts.size and (experts.min() < 0 or experts.max() >= num_experts):
        t = int(np.flatnonzero(((experts < 0) | (experts >= num_experts)).any(axis=(1, 2)))[0])
        raise _fail(path, "experts", f"token {t} has expert ids outside [0, {num_experts}): "
                                     f"{experts[t].tolist()}")
    if experts.shape[2] > 1:
        srt = np.sort(experts, axis=2)
        dup = np.flatnonzero((srt[:, :, 1:] == srt[:, :, :-1]).any(axis=(1, 2)))
        if dup.size:
            raise _fail(path, "experts", f"token {dup[0]} repeats an expert within its top-k: "
                                         f"{experts[dup[0]].tolist()}")
    if not np.isfinite(weights).all() or (weights < 0).any():
        t = int(np.flatnonzero((~np.isfinite(weights) | (weights < 0)).any(axis=(1, 2)))[0])
        raise _fail(path, "weights", f"token {t} has a negative or non-finite router weight")
    if bits.size and (bits.min() < 0 or bits.max() > MAX_BITS):
        raise _fail(path, "bits", f"values must be 0 (unknown) or 1..{MAX_BITS}, got "
                                  f"{bits.min()}..{bits.max()}")
    return {"phase": phase, "step_offsets": offsets, "experts": experts, "weights": weights,
            "bits": bits}


_FIX_PREFS = "re-record with `d2moe trace record --router DIR`"


def _validate_prefs(prefs: np.ndarray, bits: np.ndarray, meta: dict[str, Any],
                    path: str | None) -> np.ndarray:
    """The router's gate probabilities [N, L, k, K] and meta `router_config`: a float32 copy."""
    cfg = _router_config(meta, path)
    widths = cfg["bits"]
    want = (*bits.shape, len(widths))
    if prefs.shape != want:
        raise _fail(path, "prefs", f"shape {list(prefs.shape)} must be [tokens, layers, top_k, "
                                   f"widths] = {list(want)} (meta.router_config.bits has "
                                   f"{len(widths)} widths)", fix=_FIX_PREFS)
    if prefs.dtype.kind != "f":
        raise _fail(path, "prefs", f"must hold floats, got dtype {prefs.dtype}", fix=_FIX_PREFS)
    prefs = prefs.astype(np.float32, copy=True)
    if not np.isfinite(prefs).all() or (prefs < 0).any() or (prefs > 1).any():
        raise _fail(path, "prefs", "gate probabilities must be finite and in [0, 1]",
                    fix=_FIX_PREFS)
    worst = float(np.abs(prefs.sum(axis=-1) - 1).max()) if prefs.size else 0.0
    if worst > 1e-3:
        raise _fail(path, "prefs", f"each row must sum to 1 (a softmax), off by up to {worst:.3g}",
                    fix=_FIX_PREFS)
    if cfg["granularity"] == "token" and not (prefs == prefs[:, :, :1]).all():
        raise _fail(path, "prefs", "a per-token router's row must repeat over the token's slots",
                    fix=_FIX_PREFS)
    stray = sorted(set(np.unique(bits).tolist()) - set(widths) - {0})
    if stray:
        raise _fail(path, "bits", f"widths {stray} are not the router's {widths} "
                                  f"(meta.router_config.bits)", fix=_FIX_PREFS)
    return prefs


def _router_config(meta: dict[str, Any], path: str | None) -> dict[str, Any]:
    """meta `router_config` (required beside `prefs`), checked field by field."""
    cfg = meta.get("router_config")
    field = "meta.router_config"
    if not isinstance(cfg, dict):
        raise _fail(path, field, "missing or not a mapping: `prefs` needs the router's bits, "
                                 "capacities, granularity and window", fix=_FIX_PREFS)
    widths, caps = cfg.get("bits"), cfg.get("capacities")
    if (not isinstance(widths, list) or len(widths) < 2
            or not all(isinstance(b, int) and 1 <= b <= MAX_BITS for b in widths)
            or any(b >= c for b, c in zip(widths, widths[1:], strict=False))):
        raise _fail(path, f"{field}.bits", f"must be at least two increasing bit-widths in "
                                           f"1..{MAX_BITS}, got {widths!r}", fix=_FIX_PREFS)
    if (not isinstance(caps, list) or len(caps) != len(widths)
            or not all(isinstance(c, int | float) and 0 <= c <= 1 for c in caps)
            or sum(caps) < 1 - 1e-9):
        raise _fail(path, f"{field}.capacities", f"must be one share in [0, 1] per width, "
                                                 f"summing to >= 1, got {caps!r}",
                    fix=_FIX_PREFS)
    if cfg.get("granularity") not in GRANULARITIES:
        raise _fail(path, f"{field}.granularity", f"must be one of {', '.join(GRANULARITIES)}, "
                                                  f"got {cfg.get('granularity')!r}",
                    fix=_FIX_PREFS)
    window = cfg.get("window")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise _fail(path, f"{field}.window", f"must be a positive token count, got {window!r}",
                    fix=_FIX_PREFS)
    return cfg


def save_trace(path: str | Path, trace: Trace) -> None:
    """Write `trace` as a compressed .npz with its JSON header, atomically."""
    arrays = {name: getattr(trace, "phase_codes" if name == "phase" else name) for name in ARRAYS}
    if trace.prefs is not None:
        arrays["prefs"] = trace.prefs
    with atomic_write(Path(path), "wb") as f:
        np.savez_compressed(f, header=np.array(json.dumps(trace.to_header())), **arrays)


def load_trace(path: str | Path) -> Trace:
    """Read and validate a trace written by `save_trace`."""
    path = Path(path)
    where = str(path)
    if path.is_dir():
        raise UserError("is a directory, not a trace file", path=where,
                        fix="pass a trace .npz (d2moe trace synth or trace record --out)")
    if not path.is_file():
        raise UserError("no such file", path=where, fix="check the path")
    with open(path, "rb") as f:
        magic = f.read(len(_ZIP_MAGIC))
    if not magic:
        raise UserError("empty file", path=where, fix=_FIX_DAMAGED)
    if magic != _ZIP_MAGIC:  # text, a pickle or some other format: np.load's message misleads
        raise UserError("not a trace .npz (not a zip archive)", path=where,
                        fix="pass a trace written by `d2moe trace synth` or the recorder")
    member = ""  # the archive member being read, named if it is damaged
    try:
        with np.load(path, allow_pickle=False) as z:
            names = set(z.files)
            if "header" not in names:
                raise _fail(where, "header", "missing: not a d2moe trace")
            member = "header"
            header = json.loads(str(z[member]))
            arrays = {}
            for member in sorted(names - {"header"}):
                arrays[member] = z[member]
    # what a damaged archive raises: a bad CRC or directory (BadZipFile), bad compressed
    # data (zlib.error), a cut-off member (EOFError), a bad .npy header or JSON (ValueError),
    # a flipped flag or method byte (zipfile's NotImplementedError or "encrypted"
    # RuntimeError; the block reads the archive only, so RuntimeError is no wider)
    except (OSError, ValueError, EOFError, RuntimeError, zlib.error,
            zipfile.BadZipFile) as exc:
        reason = " ".join(str(exc).split())  # one line
        raise _fail(where, member, f"unreadable .npz ({reason})", fix=_FIX_DAMAGED) from None
    if not isinstance(header, dict) or header.get("format") != TRACE_FORMAT:
        got = header.get("format") if isinstance(header, dict) else header
        raise _fail(where, "format", f"expected {TRACE_FORMAT!r}, got {got!r}",
                    fix="pass a trace written by `d2moe trace synth` or the recorder")
    unknown = set(header) - {"format", "version", "spec", "meta"}
    if unknown:
        raise _fail(where, f"header.{sorted(unknown)[0]}", "unknown header key",
                    fix="remove it; allowed: format, version, spec, meta")
    if header.get("version") != TRACE_VERSION:
        raise _fail(where, "version", f"trace version {header.get('version')!r} is not supported "
                                      f"(this d2moe reads version {TRACE_VERSION})")
    spec = header.get("spec")
    if not isinstance(spec, dict) or set(spec) != {"name", "layers", "experts", "top_k"}:
        raise _fail(where, "spec", "must be a mapping with exactly name, layers, experts, top_k")
    meta = header.get("meta") or {}
    if not isinstance(meta, dict):
        raise _fail(where, "meta", "must be a mapping")
    for name in sorted(set(arrays) - set(ARRAYS) - set(OPTIONAL_ARRAYS)):
        raise _fail(where, name, f"unknown array (allowed: "
                                 f"{', '.join(ARRAYS + OPTIONAL_ARRAYS)})")
    for name in ARRAYS:
        if name not in arrays:
            raise _fail(where, name, "missing array")
    ex = arrays["experts"]
    if ex.ndim == 3 and (ex.shape[1] != spec["layers"] or ex.shape[2] != spec["top_k"]):
        raise _fail(where, "experts", f"shape {list(ex.shape)} disagrees with header spec "
                                      f"layers={spec['layers']}, top_k={spec['top_k']}")
    return Trace(spec["name"], spec["experts"], arrays["phase"], arrays["step_offsets"], ex,
                 arrays["weights"], arrays["bits"], meta, path=where, prefs=arrays.get("prefs"))
