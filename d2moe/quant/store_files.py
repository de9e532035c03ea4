"""A nested store directory's own files, what else it holds, and replacing one store
directory by another (the last step of `StoreWriter.close`)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from d2moe.core.fileio import STORE_INDEX, path_error, temp_prefix


def is_store_file(name: str) -> bool:
    """Whether `name` is one of a store's own files (index.json, layer_NNN.bin)."""
    return name == STORE_INDEX or (name.startswith("layer_") and name.endswith(".bin"))


def beside_store(path: Path) -> tuple[Any, list[str]] | None:
    """(the `source` the store at `path` recorded, None if none; the names of the files it
    holds besides its own), or None where no store's index can be read."""
    try:
        index = json.loads((path / STORE_INDEX).read_text(encoding="utf-8"))
        others = sorted(p.name for p in path.iterdir() if not is_store_file(p.name))
    except (OSError, ValueError):
        return None
    return (index.get("source") if isinstance(index, dict) else None), others


def fsync_dir(path: Path) -> None:
    """Make the renames inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(new: Path, target: Path) -> None:
    """Rename directory `new` (a sibling of `target`) to `target`. An existing `target`'s
    files that are not the store's own (a router, expert statistics) are first copied into
    `new` (the old store stays whole until the swap); the old store is renamed aside, put
    back if the second rename fails, and removed after it. A crash between the two renames
    leaves both stores, as hidden siblings (the next writer removes the old one only once
    `target` exists again: `core.fileio.remove_stale_temps`)."""
    old = target.with_name(f"{temp_prefix(target)}{secrets.token_hex(4)}.old") \
        if os.path.lexists(target) else None
    try:
        if old is not None:
            for item in target.iterdir():
                if not is_store_file(item.name):
                    if item.is_dir():
                        shutil.copytree(item, new / item.name, symlinks=True)
                    else:
                        shutil.copy2(item, new / item.name)
            fsync_dir(new)
            os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)
            raise
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old)
    except OSError as exc:
        raise path_error(exc, target, "cannot replace the store directory") from None
