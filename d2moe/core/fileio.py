"""Atomic writes and strict YAML reading: stored data is never left half-written."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from d2moe.core.errors import UserError


def cache_dir() -> Path:
    """Where built-in artefacts are built once: $D2MOE_CACHE or ~/.cache/d2moe."""
    return Path(os.environ.get("D2MOE_CACHE") or Path.home() / ".cache" / "d2moe")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write to a temp file beside `path`, fsync, then rename over it.

    A crash or an exception leaves the old file (or none) in place, never a torn one; the
    temp file a killed write left (`.NAME.PID-HOST.XXXXXXXX.tmp`) is removed by the next
    write of `path` once that process is gone (`remove_stale_temps`). A
    path that cannot be written (under a file, a directory itself, no permission) is a
    UserError naming it, raised before or instead of the rename.
    """
    path = Path(path)
    check_outside_store(path)
    ensure_dir(path.parent)
    remove_stale_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
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
    root on /proc), and a path inside a nested store is refused (`check_outside_store`). A
    UserError names `path` and `field`."""
    path = Path(path)
    if path.is_dir():
        raise UserError("cannot write it: it is a directory", path=str(path), field=field,
                        fix="name a file, not a directory")
    check_outside_store(path, field=field)
    ensure_dir(path.parent, field=field)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    except OSError as exc:
        raise path_error(exc, path, "cannot write it", field=field) from None
    os.close(fd)
    os.unlink(tmp)


# A nested store directory (d2moe/quant/store.py, docs/formats-store.md) is one whose
# index.json has this format (or, damaged, one beside layer_NNN.bin files). Besides its own
# files it keeps only these (d2moe/experts/store.py STATS_FILE, d2moe/router/store.py
# DEFAULT_DIR with GATE_FILE and META_FILE), which are also the only paths written into it.
STORE_FORMAT = "d2moe.nested-store"
STORE_INDEX = "index.json"
STORE_EXTRAS = ("expert_stats.json", "router/gate.safetensors", "router/router.json")


def store_dir_of(path: str | Path) -> Path | None:
    """The nested store directory `path` lies in (the nearest of its parents, links in them
    followed), or None."""
    path = Path(os.path.abspath(path))
    target = Path(os.path.realpath(path.parent)) / path.name
    for parent in target.parents:
        if _is_store_dir(parent):
            return parent
    return None


def _is_store_dir(path: Path) -> bool:
    index = path / STORE_INDEX
    if not index.is_file():
        return False
    try:
        with open(index, encoding="utf-8") as f:
            if json.load(f).get("format") == STORE_FORMAT:
                return True
    except (OSError, ValueError, AttributeError):
        pass
    return any(path.glob("layer_[0-9][0-9][0-9].bin"))


def check_outside_store(path: str | Path, *, field: str | None = None) -> None:
    """Refuse to write `path` inside a nested store directory unless it is a file the store
    keeps beside its own (`STORE_EXTRAS`: its expert statistics and router): an output
    named `STORE/index.json` or `STORE/layer_000.bin` would destroy the store, and any
    other file there would travel with it. Called by every writer of a user's path
    (`atomic_write`, `check_writable`, the store writer, the sweep)."""
    store = store_dir_of(path)
    if store is None:
        return
    target = Path(os.path.realpath(Path(os.path.abspath(path)).parent)) / Path(path).name
    if target.relative_to(store).as_posix() in STORE_EXTRAS:
        return
    raise UserError(f"is inside the nested store {str(store)!r}, which holds only its own "
                    f"files, {STORE_EXTRAS[0]} and router/", path=str(path), field=field,
                    fix="write it outside the store directory")


# A temp sibling of a target NAME: `.NAME.PID-HOST.RANDOM.tmp` (`temp_prefix`), or from
# before the writer's pid was in the name `.NAME.RANDOM.tmp`; RANDOM is mkstemp's 8
# characters or 8 hex digits. `.old` is a store renamed aside by `quant.store_files`.
_TEMP_TAIL = re.compile(r"(?:(?P<pid>\d+)-(?P<host>[0-9a-f]{8})\.)?[a-z0-9_]{8}\.(?P<kind>tmp|old)")
STALE_AGE_S = 7 * 24 * 3600  # a temp sibling untouched this long is stale whoever wrote it


@functools.cache
def _host_tag() -> str:
    """8 hex digits naming this host in temp names (a pid means nothing on another)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_prefix(path: str | Path) -> str:
    """The start of the name of a temp sibling for writing `path`: `.NAME.PID-HOST.`, so a
    later writer can tell one whose process died (`remove_stale_temps`)."""
    return f".{Path(path).name}.{os.getpid()}-{_host_tag()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # someone else's, or not a pid
        return True
    return True


def remove_stale_temps(path: str | Path, *, old: bool = False) -> list[Path]:
    """Remove the temp siblings of `path` (files or directories) that an earlier writer of
    `path` left when it was killed; returns them. Only provably stale ones: named with a
    pid of this host that is no longer running, or untouched for `STALE_AGE_S` (another
    host's, or from before pids were in the names). A live writer's temp is never touched,
    so concurrent writers are safe. With `old`, also a store renamed aside (`.NAME.*.old`)
    whose swap finished (`path` exists). Best effort: what cannot be removed stays."""
    path = Path(path)
    head = f".{path.name}."
    try:
        entries = [e for e in os.scandir(path.parent) if e.name.startswith(head)]
    except OSError:
        return []
    removed = []
    now = time.time()
    for entry in entries:
        m = _TEMP_TAIL.fullmatch(entry.name[len(head):])
        if m is None or (m["kind"] == "old" and not (old and os.path.lexists(path))):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        mine = m["pid"] is not None and m["host"] == _host_tag()
        if not (mine and not _pid_alive(int(m["pid"]))) and age < STALE_AGE_S:
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


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


class _DuplicateKey(Exception):
    def __init__(self, key: str, first: int, line: int) -> None:
        super().__init__(key)
        self.key, self.first, self.line = key, first, line


def _strict_loader() -> Any:
    """yaml.SafeLoader that refuses a mapping key given twice (PyYAML keeps the last one:
    a grid's second `policies:` would replace the first without a word). Explicit keys
    only: a merge key (`<<: *base`) may be overridden, as YAML means it to be."""
    import yaml

    merge = "tag:yaml.org,2002:merge"

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == merge:
                        continue
                    key = self.construct_object(key_node, deep=deep)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in seen:
                            raise _DuplicateKey(str(key), seen[key], line)
                        seen[key] = line
                    except TypeError:  # an unhashable key: SafeLoader's own error below
                        continue
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file, turning a missing file, bytes that are not UTF-8 text or a syntax
    error into a UserError."""
    import yaml

    path = require_file(path, what="a YAML file")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_strict_loader())  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as exc:
        where = (f"at lines {exc.first} and {exc.line}" if exc.first != exc.line else
                 f"on line {exc.line}")
        raise UserError(f"key {exc.key!r} is given twice ({where}); YAML would keep the "
                        "last silently", path=str(path), field=exc.key,
                        fix="keep one of them") from None
    except UnicodeDecodeError:
        raise UserError("not a text file (UTF-8)", path=str(path),
                        fix="point at the YAML file, saved as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"malformed YAML{where}", path=str(path),
                        fix="correct the YAML syntax") from None


def malformed_json(exc: json.JSONDecodeError) -> str:
    """The message of a JSON syntax error, with where it is: json's own `msg` stops short
    ("Unterminated string starting at") and leaves the position to `lineno` and `colno`."""
    sep = " " if exc.msg.endswith(" at") else " at "
    return f"malformed JSON: {exc.msg}{sep}line {exc.lineno}, column {exc.colno}"


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
