"""Atomic writes leave either the old file or the new one, never a torn or stray file."""

from __future__ import annotations

import os
import stat

import pytest

from d2moe.core.errors import UserError
from d2moe.core.fileio import atomic_write, check_keys, read_yaml


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
