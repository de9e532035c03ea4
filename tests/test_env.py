"""`d2moe env`: the report names what a bug report or a measurement needs, wherever the
cache directory is (or is not yet)."""

from __future__ import annotations

import pytest

from d2moe.cli import main
from d2moe.env import direct_io_ok, env_report


def test_env_reports_versions_kernel_cache_and_direct_io(capsys, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv("D2MOE_CACHE", str(tmp_path / "not-yet" / "d2moe"))  # not made yet
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())  # (lines wrap at 100 columns)
    for part in ("d2moe ", "packages: torch ", "CPU kernel: ", "cache: ",
                 "O_DIRECT reads on the cache's disk: ", "threads: "):
        assert part in flat, (part, out)
    assert max(len(line) for line in out.splitlines()) <= 100 or "/" in out  # (long paths)
    # what reporting made: the CPU kernel, compiled on first use into the cache, if a C
    # compiler is here (the report names the kernel that runs)
    made = {p.name for p in (tmp_path / "not-yet" / "d2moe").glob("*")}
    assert made <= {"kernels"} and ("built: kernels" in flat) == bool(made)
    assert env_report().count("\n") == out.rstrip("\n").count("\n")


def test_direct_io_probe_leaves_nothing_behind(tmp_path):
    assert direct_io_ok(tmp_path) in (True, False)
    assert list(tmp_path.iterdir()) == []
