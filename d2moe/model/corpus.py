"""The tiny model's corpus: Python standard library sources, a fixed deterministic selection.

Files: every `*.py` under `sysconfig.get_paths()["stdlib"]`, excluding `site-packages` and
test directories, ordered by the SHA-256 of their relative path (a fixed pseudo-random order,
independent of the filesystem). A file goes to the held-out split when that hash is 0 mod
`HELDOUT_EVERY`, so the split is by file. Each split takes files in order up to its byte cap.
The selection depends on the Python version (recorded in the checkpoint's provenance).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from d2moe.core.errors import UserError

HELDOUT_EVERY = 10  # one file in ten is held out
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


def _key(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")


def stdlib_files(root: str | Path | None = None) -> list[tuple[str, Path]]:
    """(relative path, path) of the candidate source files, in the fixed hash order."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise UserError("the standard library directory does not exist", path=str(root),
                        fix="run with a CPython whose sources are installed")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]  # prune, do not descend
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found, key=lambda rp: (_key(rp[0]), rp[0]))


@dataclass(frozen=True)
class Corpus:
    """Concatenated bytes of each split and the files they came from."""

    train: bytes
    heldout: bytes
    train_files: tuple[str, ...]
    heldout_files: tuple[str, ...]


def load_corpus(train_bytes: int, heldout_bytes: int, root: str | Path | None = None) -> Corpus:
    """Up to `train_bytes` / `heldout_bytes` of whole files per split (the last file is cut)."""
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    names: dict[bool, list[str]] = {False: [], True: []}
    size = {False: 0, True: 0}
    cap = {False: train_bytes, True: heldout_bytes}
    for rel, path in stdlib_files(root):
        held = _key(rel) % HELDOUT_EVERY == 0
        if size[held] >= cap[held]:
            if size[not held] >= cap[not held]:
                break
            continue
        data = path.read_bytes()[: cap[held] - size[held]]
        parts[held].append(data)
        names[held].append(rel)
        size[held] += len(data)
    if size[False] == 0 or size[True] == 0:
        raise UserError("found no source files for one of the splits",
                        path=str(root or sysconfig.get_paths()["stdlib"]),
                        fix="check the standard library location")
    return Corpus(train=b"".join(parts[False]), heldout=b"".join(parts[True]),
                  train_files=tuple(names[False]), heldout_files=tuple(names[True]))
