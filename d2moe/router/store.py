"""A trained router on disk, beside the nested store: `gate.safetensors` + `router.json`.

`router.json`: {"format": "d2moe.bit-router", "version": 1, "bits", "capacities", "alpha",
"window", "layers", "hidden", "gate_width", "granularity" ("slot" | "token"; absent: token),
"slots" (the model's top-k for a per-slot gate, else 0), "model", "layout" (the store's kind,
b1, bK, group),
"sha256" (of gate.safetensors), "train" (the run's record)}. Both files are written
atomically; loading checks the format, the checksum, the tensor shapes and, against a model
and a store, the layer and hidden sizes and that the store serves every width.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from d2moe.core.errors import UserError
from d2moe.core.fileio import atomic_write

ROUTER_FORMAT = "d2moe.bit-router"
ROUTER_VERSION = 1
GATE_FILE, META_FILE = "gate.safetensors", "router.json"
DEFAULT_DIR = "router"  # <store>/router: where `train` writes and `auto` looks


def save_router(path: str | Path, gate: Any, meta: dict[str, Any]) -> Path:
    """Write the gate's weights and its JSON record into directory `path`; returns it."""
    from safetensors.torch import save as st_save

    path = Path(path)
    data = st_save({k: v.detach().cpu().contiguous() for k, v in gate.state_dict().items()})
    with atomic_write(path / GATE_FILE, "wb") as f:
        f.write(data)
    record = {"format": ROUTER_FORMAT, "version": ROUTER_VERSION, **meta,
              "sha256": hashlib.sha256(data).hexdigest()}
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
                store: str | Path | None = None, device: str = "cpu") -> Any:
    """A `BitRouter` from `ref` (directory, router.json or `auto`), checked against the model
    `spec` (layers, hidden) and the store's width range (b1, bits stored)."""
    from safetensors.torch import load as st_load

    from d2moe.router.gate import BitGate, BitRouter

    path = resolve(str(ref), store)
    meta_path, gate_path = path / META_FILE, path / GATE_FILE
    if not meta_path.is_file() or not gate_path.is_file():
        raise UserError(f"no trained router here (need {META_FILE} and {GATE_FILE})",
                        path=str(path), field="router",
                        fix="train one: d2moe router train --out DIR, then pass --router DIR")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"malformed JSON: {exc.msg}", path=str(meta_path),
                        fix="re-run d2moe router train") from None
    where = str(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != ROUTER_FORMAT:
        raise UserError("not a router record", path=where, field="format",
                        fix="point --router at a directory written by d2moe router train")
    if meta.get("version") != ROUTER_VERSION:
        raise UserError(f"router version {meta.get('version')} is not {ROUTER_VERSION}",
                        path=where, field="version", fix="re-run d2moe router train")
    data = gate_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise UserError("checksum mismatch: gate.safetensors does not match router.json",
                        path=str(gate_path), field="sha256", fix="re-run d2moe router train")
    try:
        bits = tuple(int(b) for b in meta["bits"])
        layers, hidden = int(meta["layers"]), int(meta["hidden"])
        caps = tuple(float(c) for c in meta["capacities"])
        window = int(meta.get("window", 64))
        width = int(meta.get("gate_width", 0))
        slots = int(meta.get("slots", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"malformed router record ({exc})", path=where,
                        fix="re-run d2moe router train") from None
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
