"""Atomic writes leave either the old file or the new one, never a torn or stray file."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import time

import pytest

from d2moe.core.errors import UserError
from d2moe.core.fileio import (
    atomic_write,
    check_keys,
    check_writable,
    ensure_dir,
    malformed_json,
    path_error,
    read_yaml,
    remove_stale_temps,
    temp_prefix,
)


def dead_pid() -> int:
    """The pid of a child process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_atomic_write_replaces_and_keeps_the_usual_mode(tmp_path):
    target = tmp_path / "a" / "f.txt"
    with atomic_write(target) as f:
        f.write("one")
    with atomic_write(target) as f:
        f.write("two")
    assert target.read_text() == "two"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_yaml_errors_name_file_and_field(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("a: [1\n")
    with pytest.raises(UserError, match=r"x.yaml.*malformed YAML at line"):
        read_yaml(p)
    with pytest.raises(UserError, match="no such file"):
        read_yaml(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match=r"field 'sec.b'.*unknown key"):
        check_keys({"b": 1}, {"a"}, path="x.yaml", where="sec")
    with pytest.raises(UserError, match=r"field 'a'.*missing"):
        check_keys({}, {"a"}, path="x.yaml", required=("a",))


def test_atomic_write_under_a_file_names_the_path(tmp_path):
    (tmp_path / "f.yaml").write_text("x")
    target = tmp_path / "f.yaml" / "sub" / "out.json"
    with pytest.raises(UserError) as err, atomic_write(target) as f:
        f.write("never")
    assert str(tmp_path / "f.yaml" / "sub") in str(err.value)
    assert "not a directory" in str(err.value) and err.value.fix


def test_atomic_write_onto_a_directory_leaves_no_temp_file(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(UserError, match="is a directory") as err, \
            atomic_write(tmp_path / "adir") as f:
        f.write("data")
    assert err.value.path == str(tmp_path / "adir")
    assert "name a file" in err.value.fix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]


def test_ensure_dir_makes_parents_or_names_the_field(tmp_path):
    made = ensure_dir(tmp_path / "a" / "b")
    assert made.is_dir() and made == tmp_path / "a" / "b"
    assert ensure_dir(made) == made  # an existing directory is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"field 'dir'.*not a directory"):
        ensure_dir(tmp_path / "file" / "s", field="dir")


@pytest.mark.parametrize("code,words", [(errno.EACCES, "permission denied"),
                                        (errno.EROFS, "Read-only file system"),
                                        (errno.ENOENT, "No such file")])
def test_path_error_follows_the_errno(code, words):
    exc = OSError(code, os.strerror(code), "/some/where/.x.tmp")
    err = path_error(exc, "/some/where/x", "cannot write it")
    assert str(err).startswith("/some/where/x: cannot write it: ") and words in str(err)
    assert ".tmp" not in str(err) and err.fix


def test_a_binary_yaml_file_is_not_text(tmp_path):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"\x00\x85\xff")
    with pytest.raises(UserError, match=r"bin.yaml: not a text file \(UTF-8\)") as err:
        read_yaml(p)
    assert err.value.fix


def test_check_writable_fails_before_the_work_and_leaves_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"file: field 'out': cannot create the "
                                        r"directory: part of the path is a file"):
        check_writable(tmp_path / "file" / "out.yaml", field="out")
    with pytest.raises(UserError, match=r"field 'out': cannot write it: it is a directory"):
        check_writable(tmp_path, field="out")
    check_writable(tmp_path / "new" / "out.yaml")  # makes the directory, leaves no file
    assert list((tmp_path / "new").iterdir()) == []


@pytest.mark.parametrize("text,where", [('{"a": "cut', "line 1, column 7"),
                                        ('{\n "a": 1,\n', "line 3, column 1"),
                                        ("", "line 1, column 1")])
def test_malformed_json_says_where_and_never_stops_mid_sentence(text, where):
    import json

    with pytest.raises(json.JSONDecodeError) as err:
        json.loads(text)
    message = malformed_json(err.value)
    assert message.startswith("malformed JSON: ") and message.endswith(where)
    assert " at at " not in message and not message.endswith(" at")


def test_a_write_killed_with_sigkill_leaves_a_temp_file_the_next_write_removes(tmp_path):
    target = tmp_path / "atom.npz"
    code = ("import os, signal, sys\nfrom d2moe.core.fileio import atomic_write\n"
            "with atomic_write(sys.argv[1], 'wb') as f:\n"
            "    f.write(b'half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code, str(target)], env=env)
    assert proc.returncode == -9
    (left,) = tmp_path.iterdir()  # the killed writer's temp file, named with its pid
    assert left.name.startswith(".atom.npz.") and left.name.endswith(".tmp")
    with atomic_write(target, "wb") as f:  # the next write of the same file removes it
        f.write(b"whole")
    assert [p.name for p in tmp_path.iterdir()] == ["atom.npz"]


def test_only_provably_stale_temp_siblings_are_removed(tmp_path):
    target = tmp_path / "t.json"
    dead = dead_pid()
    host = temp_prefix(target).split("-")[-1]  # "HOST." of this machine
    old = time.time() - 8 * 24 * 3600
    names = {
        f".t.json.{dead}-{host}abcd1234.tmp": True,  # its writer is gone: stale
        f".t.json.{os.getpid()}-{host}efgh5678.tmp": False,  # a live writer's (this one)
        f".t.json.{dead}-0000ffff.abcd1234.tmp": False,  # another host's, recent
        ".t.json.abcd1234.tmp": False,  # an older writer's name without a pid, recent
        f".t.json.x.{dead}-{host}abcd1234.tmp": False,  # the temp of another file
        ".t.json.bak": False,  # not a temp name
        f".t.json.{dead}-{host}abcd1234.old": False,  # a store set aside: only with old=True
    }
    for name in names:
        (tmp_path / name).write_text("x")
    (tmp_path / ".t.json.wxyz0000.tmp").write_text("x")  # no pid, untouched 8 days: stale
    os.utime(tmp_path / ".t.json.wxyz0000.tmp", (old, old))
    names[".t.json.wxyz0000.tmp"] = True
    stale_dir = tmp_path / f".t.json.{dead}-{host}0123abcd.tmp"  # a store's temp directory
    stale_dir.mkdir()
    (stale_dir / "layer_000.bin").write_bytes(b"\0")
    names[stale_dir.name] = True
    removed = remove_stale_temps(target)
    assert sorted(p.name for p in removed) == sorted(n for n, stale in names.items() if stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        n for n, stale in names.items() if not stale)


def fake_store(path):
    """A directory that reads as a nested store: its index.json and a layer file."""
    path.mkdir(parents=True)
    (path / "index.json").write_text('{"format": "d2moe.nested-store"}')
    (path / "layer_000.bin").write_bytes(b"\0" * 8)
    return path


@pytest.mark.parametrize("name", ["index.json", "layer_000.bin", "notes.txt", "sub/x.npz",
                                  "router/other.json"])
def test_nothing_but_a_stores_extras_is_written_inside_it(tmp_path, name):
    store = fake_store(tmp_path / "store")
    before = {p.name: p.read_bytes() for p in store.iterdir()}
    (tmp_path / "link").symlink_to(store)
    for target in (store / name, tmp_path / "link" / name):
        with pytest.raises(UserError) as err, atomic_write(target) as f:
            f.write("not the store's")
        assert "inside the nested store" in str(err.value) and str(store) in str(err.value)
        with pytest.raises(UserError) as err:
            check_writable(target, field="out")
        assert err.value.field == "out"
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before  # nothing new, either


def test_a_stores_statistics_and_router_are_written_inside_it(tmp_path):
    from d2moe.core.fileio import STORE_EXTRAS, STORE_FORMAT
    from d2moe.experts.store import STATS_FILE
    from d2moe.quant import store as quant_store
    from d2moe.router.store import DEFAULT_DIR, GATE_FILE, META_FILE

    extras = (STATS_FILE, f"{DEFAULT_DIR}/{GATE_FILE}", f"{DEFAULT_DIR}/{META_FILE}")
    assert extras == STORE_EXTRAS
    assert quant_store.STORE_FORMAT == STORE_FORMAT
    store = fake_store(tmp_path / "store")
    for name in STORE_EXTRAS:
        check_writable(store / name)
        with atomic_write(store / name) as f:
            f.write("{}")
    with atomic_write(tmp_path / "beside.json") as f:  # next to a store: fine
        f.write("{}")
    (tmp_path / "plain").mkdir()  # an index.json of something else is no store
    (tmp_path / "plain" / "index.json").write_text('{"format": "other"}')
    with atomic_write(tmp_path / "plain" / "index.json") as f:
        f.write("{}")


def test_require_file_tells_a_directory_from_a_missing_path(tmp_path):
    from d2moe.core.fileio import require_file

    (tmp_path / "f").write_text("x")
    assert require_file(tmp_path / "f") == tmp_path / "f"
    with pytest.raises(UserError, match=r"field 'text': is a directory, not a text file"):
        require_file(tmp_path, field="text", what="a text file")
    with pytest.raises(UserError, match="no such file"):
        require_file(tmp_path / "nope")
    with pytest.raises(UserError, match="is a directory") as err:
        read_yaml(tmp_path)  # a grid, a spec or a profile given as a directory
    assert err.value.path == str(tmp_path)


@pytest.mark.parametrize("text,key,lines", [
    ("policies: [fifo]\nbits: 4\npolicies: [hebf]\n", "policies", (1, 3)),
    ("grid:\n  a: 1\n  b: 2\n  a: 3\nother: 1\n", "a", (2, 4)),  # nested mappings too
])
def test_a_yaml_key_given_twice_is_refused_naming_both_lines(tmp_path, text, key, lines):
    """PyYAML keeps the last of two equal keys without a word (a grid's second `policies:`
    replaced the first); the strict loader names the key and both lines."""
    p = tmp_path / "g.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=f"key '{key}' is given twice \\(at lines "
                                        f"{lines[0]} and {lines[1]}\\)") as err:
        read_yaml(p)
    assert (err.value.path, err.value.field) == (str(p), key)
    p.write_text("a: 1\nb: {a: 2}\nc: [{a: 1}, {a: 2}]\n")  # equal keys in other mappings
    assert read_yaml(p) == {"a": 1, "b": {"a": 2}, "c": [{"a": 1}, {"a": 2}]}


@pytest.mark.parametrize("text,want", [
    ("base: &b {a: 1, c: 2}\nx: {<<: *b, a: 3}\n", {"a": 3, "c": 2}),  # a merge overridden
    ("p: &p {a: 1}\nq: &q {b: 2}\nx: {<<: [*p, *q], c: 3}\n", {"a": 1, "b": 2, "c": 3}),
])
def test_merge_keys_still_work_under_the_strict_loader(tmp_path, text, want):
    p = tmp_path / "m.yaml"
    p.write_text(text)
    assert read_yaml(p)["x"] == want


@pytest.mark.parametrize("text,match", [
    ("{a: 1, a: 2}\n", r"key 'a' is given twice \(on line 1\)"),
    ("1: a\n1: b\n", r"key '1' is given twice"),
    ("yes: a\ntrue: b\n", r"key 'True' is given twice"),  # one key in YAML 1.1
    ("? [a, b]\n: 1\n", "malformed YAML at line 1"),  # unhashable: no traceback
])
def test_other_duplicate_and_odd_keys_are_user_errors(tmp_path, text, match):
    p = tmp_path / "d.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=match):
        read_yaml(p)
