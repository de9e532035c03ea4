"""Atomic writes and strict YAML reading: stored data is never left half-written."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from d2moe.core.errors import UserError


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write to a temp file beside `path`, fsync, then rename over it.

    A crash or an exception leaves the old file (or none) in place, never a torn one. A
    path that cannot be written (under a file, a directory itself, no permission) is a
    UserError naming it, raised before or instead of the rename.
    """
    path = Path(path)
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise path_error(exc, path, "cannot write it") from None
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise path_error(exc, path, "cannot write it") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_writable(path: str | Path, *, field: str | None = None) -> None:
    """Fail now, not after minutes of work, if file `path` cannot be written: its directory
    is made and a temp file created and removed there (a permission check alone passes for
    root on /proc). A UserError names `path` and `field`."""
    path = Path(path)
    if path.is_dir():
        raise UserError("cannot write it: it is a directory", path=str(path), field=field,
                        fix="name a file, not a directory")
    ensure_dir(path.parent, field=field)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise path_error(exc, path, "cannot write it", field=field) from None
    os.close(fd)
    os.unlink(tmp)


def ensure_dir(path: str | Path, *, field: str | None = None) -> Path:
    """Make directory `path` and its parents unless they exist; returns it as a Path.

    For output and scratch directories the user names: one that cannot be made (a file in
    the way, no permission) is a UserError naming it and `field`, not an OSError traceback.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise path_error(exc, path, "cannot create the directory", field=field) from None
    return path


def path_error(exc: OSError, path: str | Path, what: str, *,
               field: str | None = None) -> UserError:
    """The UserError for `exc`, met while doing `what` at the user's `path`: the errno
    decides the message and the fix (the temp file's name never shows)."""
    if exc.errno == errno.EISDIR:
        return UserError(f"{what}: it is a directory", path=str(path), field=field,
                         fix="name a file, not a directory")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return UserError(f"{what}: part of the path is a file, not a directory",
                         path=str(path), field=field, fix="pick a path under a directory")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return UserError(f"{what}: permission denied", path=str(path), field=field,
                         fix="pick a path you may write to")
    return UserError(f"{what}: {exc.strerror or exc}", path=str(path), field=field,
                     fix="pick a writable path")


def json_sha256(payload: Mapping[str, Any], *, without: str = "", allow_nan: bool = True,
                default: Callable[[Any], Any] | None = None) -> str:
    """SHA-256 (hex) of `payload` minus its key `without`, as canonical JSON (sorted keys, no
    spaces): the digest every self-checking file here carries (store index, router record,
    expert statistics, sweep rows), so an edited or damaged field shows on read."""
    body = {k: v for k, v in payload.items() if k != without}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=allow_nan,
                      default=default)
    return hashlib.sha256(text.encode()).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def require_file(path: str | Path, *, field: str | None = None, fix: str = "check the path",
                 what: str = "a file") -> Path:
    """`path` when it is a file to read; else a UserError naming it that tells a directory
    (`what` names the file wanted there, e.g. 'a grid YAML') from a path that is not there."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"is a directory, not {what}", path=str(path), field=field,
                        fix=f"name {what} (in it?), not the directory")
    if not path.is_file():
        raise UserError("no such file", path=str(path), field=field, fix=fix)
    return path


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file, turning a missing file, bytes that are not UTF-8 text or a syntax
    error into a UserError."""
    import yaml

    path = require_file(path, what="a YAML file")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except UnicodeDecodeError:
        raise UserError("not a text file (UTF-8)", path=str(path),
                        fix="point at the YAML file, saved as UTF-8") from None
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
