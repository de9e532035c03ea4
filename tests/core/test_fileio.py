"""Atomic writes leave either the old file or the new one, never a torn or stray file."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from d2moe.core.errors import UserError
from d2moe.core.fileio import (
    atomic_write,
    check_keys,
    check_writable,
    ensure_dir,
    path_error,
    read_yaml,
)


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
