"""Atomic writes and strict YAML reading: stored data is never left half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from d2moe.core.errors import UserError


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write to a temp file beside `path`, fsync, then rename over it.

    A crash or an exception leaves the old file (or none) in place, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file, turning a missing file or a syntax error into a UserError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError("no such file", path=str(path), fix="check the path")
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"malformed YAML{where}", path=str(path),
                        fix="correct the YAML syntax") from None


def check_keys(data: Any, allowed: set[str] | tuple[str, ...], *, path: str, where: str = "",
               required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Require a mapping whose keys are all in `allowed` and include `required`."""
    label = where or "top level"
    if not isinstance(data, dict):
        raise UserError(f"expected a mapping at {label}", path=path, field=where or None,
                        fix="write key: value pairs")
    for key in data:
        if key not in allowed:
            field = f"{where}.{key}" if where else str(key)
            raise UserError(f"unknown key (allowed: {', '.join(sorted(allowed))})", path=path,
                            field=field, fix="remove or rename it")
    for key in required:
        if key not in data:
            field = f"{where}.{key}" if where else key
            raise UserError("missing required key", path=path, field=field, fix="add it")
    return data
