"""A trained router on disk, beside the nested store: `gate.safetensors` + `router.json`.

`router.json`: {"format": "d2moe.bit-router", "version": 1, "bits", "capacities", "alpha",
"window", "layers", "hidden", "gate_width", "granularity" ("slot" | "token"; absent: token),
"slots" (the model's top-k for a per-slot gate, else 0), "model", "layout" (the store's kind,
b1, bK, group), "expert_sha256" (the fingerprint of the checkpoint its store was quantized
from, `quant.source`; absent when that store recorded none),
"sha256" (of gate.safetensors), "train" (the run's record), "record_sha256"}. The last is the
SHA-256 of every other field as canonical JSON (sorted keys, no spaces: the pattern of
d2moe/experts/store.py), so an edited capacity or window is caught like a damaged gate. A
version-1 record saved before it existed has none and is accepted unverified; one that has it
is verified. Both files are written atomically, the gate first and router.json last: a save
interrupted between the two leaves a record whose `sha256` does not match the gate, which
loading refuses as a damaged pair. Loading checks the format, the checksums, the record's
fields, the tensor shapes and, against a model and a store, the layer and hidden sizes and
that the store serves every width; each failure names the file and the field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from d2moe.core.errors import UserError
from d2moe.core.fileio import atomic_write, json_sha256, malformed_json
from d2moe.quant.source import check_made_from

ROUTER_FORMAT = "d2moe.bit-router"
ROUTER_VERSION = 1
GATE_FILE, META_FILE = "gate.safetensors", "router.json"
DEFAULT_DIR = "router"  # <store>/router: where `train` writes and `auto` looks
_FIX = "re-run d2moe router train"


def record_digest(record: dict[str, Any]) -> str:
    """SHA-256 of a record's fields other than `record_sha256`, as canonical JSON (sorted
    keys, no spaces) of the record as read back from router.json."""
    return json_sha256(record, without="record_sha256")


def save_router(path: str | Path, gate: Any, meta: dict[str, Any]) -> Path:
    """Write the gate's weights and its JSON record into directory `path`; returns it."""
    from safetensors.torch import save as st_save

    path = Path(path)
    data = st_save({k: v.detach().cpu().contiguous() for k, v in gate.state_dict().items()})
    with atomic_write(path / GATE_FILE, "wb") as f:
        f.write(data)
    record = {"format": ROUTER_FORMAT, "version": ROUTER_VERSION, **meta,
              "sha256": hashlib.sha256(data).hexdigest()}
    try:  # digest what a reader will see: the record after a JSON round trip
        record = json.loads(json.dumps(record))
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot write this router record ({exc})", path=str(path / META_FILE),
                        field="meta", fix="keep the record to plain JSON values") from None
    record["record_sha256"] = record_digest(record)
    with atomic_write(path / META_FILE) as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    return path


def resolve(ref: str, store: str | Path | None) -> Path:
    """`auto` -> <store>/router; else the directory (or its router.json) given."""
    if ref == "auto":
        if not store:
            raise UserError("--router auto needs a store to look beside", field="router",
                            fix="pass --store DIR or --router PATH")
        return Path(store) / DEFAULT_DIR
    p = Path(ref)
    return p.parent if p.name == META_FILE else p


def load_router(ref: str | Path, *, spec: Any = None, store_bits: tuple[int, int] | None = None,
                store: str | Path | None = None, store_layout: Any = None,
                store_source: dict[str, str] | None = None, device: str = "cpu") -> Any:
    """A `BitRouter` from `ref` (directory, router.json or `auto`), checked against the model
    `spec` (layers, hidden), the store's width range (b1, bits stored), with `store_layout`
    (a QuantLayout) the quantization it was trained on (a store quantized again in another
    format, b1, bK or group serves other weights at the same widths) and with `store_source`
    (the store's `source`) the expert weights that store was quantized from."""
    from safetensors.torch import load as st_load

    from d2moe.router.gate import BitGate, BitRouter

    path = resolve(str(ref), store)
    meta_path, gate_path = path / META_FILE, path / GATE_FILE
    if not meta_path.is_file() or not gate_path.is_file():
        raise UserError(f"no trained router here (need {META_FILE} and {GATE_FILE})",
                        path=str(path), field="router",
                        fix="train one: d2moe router train --out DIR, then pass --router DIR")
    where = str(meta_path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError("not a UTF-8 JSON file", path=where, fix=_FIX) from None
    except json.JSONDecodeError as exc:
        raise UserError(malformed_json(exc), path=where, fix=_FIX) from None
    if not isinstance(meta, dict) or meta.get("format") != ROUTER_FORMAT:
        raise UserError("not a router record", path=where, field="format",
                        fix="point --router at a directory written by d2moe router train")
    if meta.get("version") != ROUTER_VERSION:
        raise UserError(f"router version {meta.get('version')} is not {ROUTER_VERSION}",
                        path=where, field="version", fix=_FIX)
    if "record_sha256" in meta and meta["record_sha256"] != record_digest(meta):
        raise UserError("checksum mismatch: router.json was damaged or edited", path=where,
                        field="record_sha256", fix=_FIX)
    data = gate_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise UserError("checksum mismatch: gate.safetensors does not match router.json (one "
                        "of them is damaged, or a save was interrupted between the two)",
                        path=str(gate_path), field="sha256", fix=_FIX)
    bits, caps, layers, hidden, window, width, slots = _parse_record(meta, where)
    if spec is not None:
        checks = [("layers", layers), ("hidden", hidden)] + ([("top_k", slots)] if slots else [])
        for name, mine in checks:
            if getattr(spec, name) != mine:
                raise UserError(f"the router has {name}={mine}, the model {spec.name!r} has "
                                f"{getattr(spec, name)}", path=where, field=name,
                                fix="train a router for this model: d2moe router train "
                                    "--model ...")
    if store_bits is not None:
        lo, hi = store_bits
        bad = [b for b in bits if not lo <= b <= hi]
        if bad:
            raise UserError(f"the router chooses {','.join(map(str, bad))} bits, the store "
                            f"serves {lo}..{hi}", path=where, field="bits",
                            fix="use a store quantized over these widths (d2moe quantize "
                                "--bits LOW:HIGH) or train a router for this store's range")
    trained = meta.get("layout")
    if store_layout is not None and isinstance(trained, dict):
        keys = ("kind", "b1", "bK", "group")
        mine = {k: getattr(store_layout, k) for k in keys}
        if {k: trained.get(k) for k in keys} != mine:
            raise UserError(f"the router was trained on a store quantized as "
                            f"{_layout_text(trained)}, this store is {_layout_text(mine)}",
                            path=where, field="layout",
                            fix="train a router for this store: d2moe router train --store ...")
    check_made_from(meta.get("expert_sha256"), store_source, path=where, field="expert_sha256",
                    what="the router was trained on a store quantized from",
                    fix="train a router for this store: d2moe router train --store ...")
    gate = BitGate(layers, hidden, len(bits), width=width, slots=slots)
    state = st_load(data)
    want = {k: tuple(v.shape) for k, v in gate.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        raise UserError("gate tensors do not match the record's layers/hidden/bits",
                        path=str(gate_path), field="tensors", fix="re-run d2moe router train")
    gate.load_state_dict(state)
    meta["path"] = str(path)
    return BitRouter(gate, bits, caps, window=window, meta=meta).to(device)


def _parse_record(meta: dict[str, Any], where: str
                  ) -> tuple[tuple[int, ...], tuple[float, ...], int, int, int, int, int]:
    """(bits, capacities, layers, hidden, window, gate_width, slots) of a record, each
    checked; a bad one is a UserError naming `where` and the field."""
    try:
        bits = tuple(int(b) for b in meta["bits"])
        caps = tuple(float(c) for c in meta["capacities"])
        ints = {name: int(meta[name]) if name in meta else default for name, default in
                (("layers", None), ("hidden", None), ("window", 64), ("gate_width", 0),
                 ("slots", 0))}
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"malformed router record ({exc})", path=where, fix=_FIX) from None
    for name, value in ints.items():
        low = 0 if name in ("gate_width", "slots") else 1
        if value is None or value < low:
            raise UserError(f"must be a whole number >= {low}, got {meta.get(name)!r}",
                            path=where, field=name, fix=_FIX)
    granularity = meta.get("granularity")  # informative: the gate's follows from slots
    if granularity is not None and granularity != ("slot" if ints["slots"] else "token"):
        raise UserError(f"{granularity!r} does not match slots={ints['slots']} (slot: one "
                        f"width per expert slot, slots > 0; token: slots 0)", path=where,
                        field="granularity", fix=_FIX)
    if not bits or any(b < 1 or b > 8 for b in bits) or list(bits) != sorted(set(bits)):
        raise UserError(f"{list(bits)} are not increasing widths in 1..8", path=where,
                        field="bits", fix=_FIX)
    if len(caps) != len(bits) or any(not 0 <= c <= 1 for c in caps) or sum(caps) < 1 - 1e-9:
        raise UserError(f"{list(caps)}: need one share in [0, 1] per width, summing to >= 1",
                        path=where, field="capacities", fix=_FIX)
    return (bits, caps, ints["layers"], ints["hidden"], ints["window"], ints["gate_width"],
            ints["slots"])


def _layout_text(layout: dict[str, Any]) -> str:
    return (f"{layout.get('kind')} {layout.get('b1')}..{layout.get('bK')} bits, groups of "
            f"{layout.get('group')}")
