"""Expert statistics on disk: `expert_stats.json`, beside the nested store by default.

{"format": "d2moe.expert-stats", "version": 1, "source", "layers", "experts",
"importance" [L][E], "similarity" [L][E][E], "meta", "sha256"}: the digest is the SHA-256 of
the other fields' canonical JSON (sorted keys, no spaces), so a damaged number is caught on
read. Statistics measured on a checkpoint keep its fingerprint in `meta.expert_sha256`
(`quant.source`): a store quantized from other expert weights refuses them. Written
atomically (`core.fileio.atomic_write`); loading checks the format, the checksum, the
shapes and ranges, and against a model spec its layers and experts, and names the file in
every error (the pattern of `router/store.py`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from d2moe.core.errors import UserError
from d2moe.core.fileio import atomic_write, json_sha256, malformed_json
from d2moe.policies.stats import ExpertStats
from d2moe.quant.source import check_made_from

STATS_FORMAT = "d2moe.expert-stats"
STATS_VERSION = 1
STATS_FILE = "expert_stats.json"
_FIX = "recompute it: d2moe experts stats --model ... (or --trace FILE) --out FILE"


def _payload(stats: ExpertStats) -> dict[str, Any]:
    return {"source": stats.source, "layers": stats.layers, "experts": stats.experts,
            "importance": [list(row) for row in stats.importance],
            "similarity": [[list(row) for row in layer] for layer in stats.similarity],
            "meta": stats.meta}


def _digest(payload: dict[str, Any]) -> str:
    return json_sha256(payload, allow_nan=False)  # NaN is never written: ValueError


def resolve(ref: str | Path, store: str | Path | None = None) -> Path:
    """`auto` -> <store>/expert_stats.json; a directory -> its expert_stats.json; else `ref`."""
    if str(ref) == "auto":
        if not store:
            raise UserError("--stats auto needs a store to look beside", field="stats",
                            fix="pass --store DIR or --stats FILE")
        return Path(store) / STATS_FILE
    p = Path(ref)
    return p / STATS_FILE if p.is_dir() else p


def save_stats(path: str | Path, stats: ExpertStats) -> Path:
    """Write `stats` to `path` (a directory gets expert_stats.json inside); returns the file."""
    target = resolve(path)
    payload = _payload(stats)
    try:
        digest = _digest(payload)
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot write these statistics ({exc})", path=str(target),
                        field="meta", fix="keep meta to plain JSON values and finite "
                                          "numbers") from None
    record = {"format": STATS_FORMAT, "version": STATS_VERSION, **payload, "sha256": digest}
    with atomic_write(target) as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    return target


def load_stats(ref: str | Path, *, spec: Any = None, store: str | Path | None = None,
               store_source: dict[str, str] | None = None) -> ExpertStats:
    """Read statistics from `ref` (file, directory or `auto` beside `store`), verified; with
    `spec` (a ModelSpec) also require its layers and experts, with `store_source` (a store's
    `source`) the expert weights they were measured on."""
    path = resolve(ref, store)
    where = str(path)
    if not path.is_file():
        raise UserError("no expert statistics here", path=where, field="stats",
                        fix="compute them: d2moe experts stats --model ... --out " + where)
    raw = path.read_bytes()
    if STATS_FORMAT.encode() not in raw:  # an .npz, a trace: another file, not a damaged one
        raise UserError("not an expert statistics file (expert_stats.json)", path=where,
                        fix="point at a file written by d2moe experts stats")
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text: the file is damaged", path=where, fix=_FIX) from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{malformed_json(exc)}: the file is damaged",
                        path=where, fix=_FIX) from None
    if not isinstance(record, dict) or record.get("format") != STATS_FORMAT:
        raise UserError("not an expert statistics file", path=where, field="format",
                        fix="point at a file written by d2moe experts stats")
    if record.get("version") != STATS_VERSION:
        raise UserError(f"version {record.get('version')!r} is not {STATS_VERSION}",
                        path=where, field="version", fix=_FIX)
    payload = {k: record.get(k) for k in ("source", "layers", "experts", "importance",
                                          "similarity", "meta")}
    try:
        digest = _digest(payload)
    except ValueError:  # NaN or infinity: never written by save_stats (allow_nan=False)
        digest = None
    if digest is None or digest != record.get("sha256"):
        raise UserError("checksum mismatch: the file is damaged or was edited", path=where,
                        field="sha256", fix=_FIX)
    stats = _parse(payload, where)
    if spec is not None:
        for name, mine in (("layers", stats.layers), ("experts", stats.experts)):
            if getattr(spec, name) != mine:
                raise UserError(f"the statistics have {name}={mine}, the model "
                                f"{spec.name!r} has {getattr(spec, name)}", path=where,
                                field=name, fix="compute them for this model: d2moe experts "
                                                "stats --model ...")
    check_made_from(stats.meta.get("expert_sha256"), store_source, path=where,
                    field="meta.expert_sha256", what="the statistics were measured on",
                    fix="compute them for this store: d2moe experts stats --model ... --store "
                        "STORE")
    return stats


def _parse(payload: dict[str, Any], where: str) -> ExpertStats:
    """Shapes and ranges of a checksummed payload -> ExpertStats (UserError naming `where`)."""
    try:
        L, E = int(payload["layers"]), int(payload["experts"])
        stats = ExpertStats.from_lists(payload["importance"], payload["similarity"],
                                       source=str(payload["source"] or ""),
                                       meta=payload["meta"] or {})
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"malformed statistics ({exc})", path=where, fix=_FIX) from None
    if (stats.layers, stats.experts) != (L, E) or any(len(r) != E for r in stats.importance):
        raise UserError(f"arrays are not [{L}][{E}] and [{L}][{E}][{E}]", path=where,
                        field="importance", fix=_FIX)
    for layer, (imp, sim) in enumerate(zip(stats.importance, stats.similarity, strict=True)):
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in imp):
            raise UserError(f"layer {layer}: importance outside [0, 1]", path=where,
                            field="importance", fix=_FIX)
        if not all(math.isfinite(v) and -1.0 <= v <= 1.0 for row in sim for v in row) \
                or any(sim[e][e] != 1.0 for e in range(E)):
            raise UserError(f"layer {layer}: similarity outside [-1, 1] or diagonal not 1",
                            path=where, field="similarity", fix=_FIX)
    return stats


def find_or_build_stats(option: str, *, model: str, store: str | Path,
                        progress: bool = False) -> ExpertStats | None:
    """The statistics a serving run uses: `option` is a file (loaded and checked against the
    store's model), `auto` (<store>/expert_stats.json, computed there once from `model` on
    calibration text when missing) or empty (none)."""
    if not option:
        return None
    from d2moe.quant.store import StoreReader

    with StoreReader(store) as reader:
        spec, source = reader.spec, reader.source
    path = resolve(option, store)
    if str(option) == "auto" and not path.is_file():
        import sys

        from d2moe.experts.cmd import StatsConfig, compute_stats

        print(f"computing expert statistics once into {path} (d2moe experts stats)",
              file=sys.stderr)
        compute_stats(StatsConfig(model=model, store=str(store), out=str(path),
                                  progress=progress))
    return load_stats(path, spec=spec, store_source=source)
