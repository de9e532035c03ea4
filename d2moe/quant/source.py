"""Which checkpoint a nested store was quantized from, and the check that a model given
beside a store is that checkpoint.

A store's index records `source`: the checkpoint's path (for messages) and `expert_sha256`,
a SHA-256 over every expert tensor's (layer, expert, tensor, dtype, shape) and SAMPLES
samples of its bytes, SAMPLE_BYTES each, spread from its first bytes to its last, read
straight from the safetensors headers: 4 KiB per tensor whatever the checkpoint's size, no
torch. It is content-based: a copy or a re-sharded copy of a checkpoint matches; a
fine-tune of the same architecture (same names and shapes, values changed throughout) does
not. An edit confined to bytes between the samples is not seen.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from d2moe.core.errors import UserError
from d2moe.model.hf_names import expert_key

SAMPLES, SAMPLE_BYTES = 4, 1024  # per tensor: its first and last KiB, two between
_HEADER_MAX_BYTES = 100 << 20  # safetensors' own limit on the JSON header


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets), where its data
    starts, and its size; a file that is not one is a UserError naming it."""
    bad = UserError("not a safetensors file (bad header)", path=str(path),
                    fix="re-download or re-save the checkpoint")
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise bad
            (n,) = struct.unpack("<Q", raw)
            text = f.read(n) if n <= _HEADER_MAX_BYTES else b""
            if len(text) != n:
                raise bad
            header = json.loads(text)
            size = os.fstat(f.fileno()).st_size
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested or numbers too deep
        raise bad from None
    except OSError as exc:
        raise UserError(f"cannot read it: {exc.strerror}", path=str(path),
                        fix="check the checkpoint directory") from None
    if not isinstance(header, dict):
        raise bad
    return header, 8 + n, size


def expert_sha256(model_dir: str | Path) -> str:
    """The fingerprint of a checkpoint directory's expert weights (module docstring)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError("not a checkpoint directory", path=str(model_dir),
                        fix="pass an HF checkpoint directory (config.json + *.safetensors)")
    items: list[tuple[tuple[int, int, str], str, Path, int, int]] = []
    for path in sorted(model_dir.glob("*.safetensors")):
        header, data, size = _header(path)
        for name, meta in header.items():
            key = expert_key(name)
            if key is None:
                continue
            try:
                start, end = meta["data_offsets"]
                desc = f"{meta['dtype']} {list(meta['shape'])}"
                ok = all(type(v) is int for v in (start, end)) and 0 <= start <= end \
                    and data + end <= size
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise UserError(f"tensor {name} has a malformed header entry", path=str(path),
                                fix="re-download or re-save the checkpoint")
            items.append((key, desc, path, data + start, end - start))
    if not items:
        raise UserError("no expert weights found", path=str(model_dir),
                        fix="point at an MoE checkpoint (Mixtral or OLMoE tensor names)")
    h = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        files: dict[Path, Any] = {}
        for key, desc, path, offset, nbytes in sorted(items):
            f = files.get(path) or files.setdefault(path, stack.enter_context(open(path, "rb")))
            n = min(SAMPLE_BYTES, nbytes)
            h.update(f"{key} {desc} {nbytes}\n".encode())
            for k in range(SAMPLES):  # k = 0: the first bytes; k = SAMPLES - 1: the last
                f.seek(offset + (nbytes - n) * k // (SAMPLES - 1))
                h.update(f.read(n))
    return h.hexdigest()


def source_record(model_dir: str | Path) -> dict[str, str]:
    """What a store records of the checkpoint it is quantized from."""
    return {"path": str(Path(model_dir).resolve()), "expert_sha256": expert_sha256(model_dir)}


def parse_source(raw: Any, where: str) -> dict[str, str] | None:
    """An index's `source` (None for stores written before it was recorded), checked."""
    if raw is None:
        return None
    if not (isinstance(raw, dict) and isinstance(raw.get("path"), str)
            and isinstance(raw.get("expert_sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", raw["expert_sha256"])):
        raise UserError("expected {path: str, expert_sha256: 64 lowercase hex digits}",
                        path=where, field="source", fix="re-run d2moe quantize")
    return {"path": raw["path"], "expert_sha256": raw["expert_sha256"]}


def check_source(model_dir: str | Path, source: dict[str, str] | None, store: str | Path,
                 model: str) -> None:
    """UserError unless the checkpoint at `model_dir` (the model `model` names) is the one
    the store at `store` was quantized from; a store without a `source` passes."""
    if source is not None and expert_sha256(model_dir) != source["expert_sha256"]:
        raise UserError(f"the store was quantized from other expert weights ({source['path']}) "
                        f"than the model's ({model})", path=str(store), field="source",
                        fix=f"quantize this model: d2moe quantize --model {model} --out STORE, "
                            "or pass the store quantized from it")


def check_made_from(recorded: Any, source: dict[str, str] | None, *, path: str, field: str,
                    what: str, fix: str) -> None:
    """UserError when a file made from one checkpoint's expert weights (its `recorded`
    fingerprint, the `field` it is kept in) meets a store quantized from other ones; `what`
    begins the message ("the router was trained on"). Where either side is unknown (a file
    or a store from before fingerprints) it passes."""
    if source is None or recorded is None:
        return
    if not (isinstance(recorded, str) and re.fullmatch(r"[0-9a-f]{64}", recorded)):
        raise UserError("expected the 64 lowercase hex digits of an expert_sha256", path=path,
                        field=field, fix=fix)
    if recorded != source["expert_sha256"]:
        raise UserError(f"{what} other expert weights than the store's ({source['path']})",
                        path=path, field=field, fix=fix)
