"""Sweeps end to end: every cell once, failures as rows, resume after a kill or a torn line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from d2moe.cli import main
from d2moe.core.errors import UserError
from d2moe.sweep.cells import expand, oracle_available
from d2moe.sweep.grid import load_grid
from d2moe.sweep.runner import SweepConfig, run_sweep
from d2moe.sweep.table import exclusive, read_rows

GRID = """
policies: [fifo, hebf]
budgets: ["30%", "60%"]
profiles: [cpu-2core]
traces: ["synth:tiny:decode_steps=6,prefill_tokens=8"]
"""


def grid_file(tmp_path: Path, text: str = GRID) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def rows_of(out: Path) -> list[dict]:
    return read_rows(out / "table.jsonl")[0]


def test_a_small_sweep_in_two_processes_has_every_cell_once(tmp_path):
    grid = grid_file(tmp_path)
    out = tmp_path / "out"
    result = run_sweep(grid, SweepConfig(out=str(out), jobs=2, progress=False))
    rows = rows_of(out)
    ids = {c.cell_id for c in expand(load_grid(grid), out)}
    assert sorted(r["cell_id"] for r in rows) == sorted(ids)
    assert result.ran == {"ok": 4} and result.skipped == 0
    for r in rows:
        assert r["status"] == "ok" and r["model"] == "tiny"
        assert r["profile_source"] == "measured" and r["run_kind"] == "simulated"
        assert r["decode_tokens_per_s"] > 0 and r["wall_s"] >= 0 and r["budget_bytes"] > 0
        assert r["finished_at"]
        if oracle_available():  # d2moe.analysis.oracle is optional
            assert 0 <= r["oracle_hit_rate"] <= 1
        else:
            assert r["oracle_hit_rate"] is None
    assert {(r["policy"], r["budget"]) for r in rows} == {
        (p, b) for p in ("fifo", "hebf") for b in ("30%", "60%")}
    csv_lines = (out / "table.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("cell_id,status")
    assert list((out / "traces").glob("synth-tiny*.npz"))
    # a second run finds everything done and changes nothing
    before = (out / "table.jsonl").read_bytes()
    again = run_sweep(grid, SweepConfig(out=str(out), jobs=2, progress=False))
    assert again.ran == {} and again.skipped == 4
    assert (out / "table.jsonl").read_bytes() == before


def test_a_budget_too_small_is_a_does_not_fit_row_not_a_crash(tmp_path):
    grid = grid_file(tmp_path, GRID.replace('["30%", "60%"]', '["1KiB", "60%"]'))
    out = tmp_path / "out"
    result = run_sweep(grid, SweepConfig(out=str(out), jobs=1, progress=False))
    assert result.ran == {"ok": 2, "does-not-fit": 2}
    small = [r for r in rows_of(out) if r["budget"] == "1KiB"]
    assert all(r["status"] == "does-not-fit" and "smaller than one expert" in r["message"]
               for r in small)
    assert all(r["oracle_hit_rate"] is None for r in small)


def test_error_rows_are_rerun_on_resume_and_superseded(tmp_path):
    grid = grid_file(tmp_path, GRID.replace("cpu-2core", "cpu-2core, rtx3060-laptop")
                     .replace("synth:tiny", "synth:olmoe-1b-7b"))
    out = tmp_path / "out"
    first = run_sweep(grid, SweepConfig(out=str(out), jobs=1, progress=False))
    assert first.ran == {"error": 4, "ok": 4}  # cpu-2core has no olmoe non-expert table
    second = run_sweep(grid, SweepConfig(out=str(out), jobs=1, progress=False))
    assert second.ran == {"error": 4} and second.skipped == 4
    csv_rows = (out / "table.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 8  # the latest row per cell only


def test_a_torn_last_line_is_cut_and_its_cell_rerun(tmp_path):
    grid = grid_file(tmp_path)
    out = tmp_path / "out"
    run_sweep(grid, SweepConfig(out=str(out), jobs=1, progress=False))
    table = out / "table.jsonl"
    lines = table.read_text().splitlines(keepends=True)
    table.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # killed mid-write
    result = run_sweep(grid, SweepConfig(out=str(out), jobs=1, progress=False))
    assert result.ran == {"ok": 1} and result.skipped == 3
    after = table.read_text().splitlines(keepends=True)
    assert after[:3] == lines[:3] and len(after) == 4
    assert json.loads(after[3])["cell_id"] == json.loads(lines[3])["cell_id"]


LONG_GRID = GRID.replace('["30%", "60%"]', '["20%", "30%", "40%", "50%", "60%", "70%", '
                         '"80%", "90%"]').replace("decode_steps=6", "decode_steps=48")


def sweep_until_a_row(tmp_path: Path, **popen: object) -> tuple[subprocess.Popen, Path, list]:
    """`d2moe sweep --jobs 2` of LONG_GRID (16 cells) in a child process, returned once its
    table holds a row: (the process, the table, its helper processes)."""
    grid = grid_file(tmp_path, LONG_GRID)
    out = tmp_path / "out"
    table = out / "table.jsonl"
    cmd = [sys.executable, "-m", "d2moe.cli", "sweep", str(grid), "--out", str(out),
           "--jobs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)
    try:
        deadline = time.monotonic() + 60
        while not (table.exists() and table.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no row within 60 s"
            time.sleep(0.005)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, table, descendants(proc.pid)  # worker processes, forkserver, tracker


def wait_gone(pids: list[int]) -> None:
    """Wait (20 s at most) until none of `pids` runs: the workers notice and exit."""
    deadline = time.monotonic() + 20
    while any(running(pid) for pid in pids):
        assert time.monotonic() < deadline, f"left running: {pids}"
        time.sleep(0.05)


def test_a_sweep_killed_mid_run_resumes_without_repeating_finished_cells(tmp_path):
    grid = tmp_path / "grid.yaml"
    proc, table, helpers = sweep_until_a_row(tmp_path)
    proc.kill()  # SIGKILL
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    wait_gone(helpers)
    out = table.parent
    killed_rows, size = read_rows(table)
    killed_lines = table.read_bytes()[:size].splitlines(keepends=True)
    assert 1 <= len(killed_rows) < 16, "the kill should land mid-run"
    assert main(["sweep", str(grid), "--out", str(out), "--jobs", "1"]) == 0
    final = table.read_bytes().splitlines(keepends=True)
    rows = [json.loads(line) for line in final]
    ids = [r["cell_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 16  # every cell exactly once
    assert final[:len(killed_lines)] == killed_lines  # finished rows untouched (timestamps too)
    before = {r["cell_id"]: r["finished_at"] for r in killed_rows}
    assert {r["cell_id"]: r["finished_at"] for r in rows if r["cell_id"] in before} == before


def test_sigterm_to_the_whole_group_ends_the_sweep_at_once_and_keeps_its_rows(tmp_path):
    """A scheduler or `timeout` signals the sweep and its workers alike: the sweep dies at
    once as SIGTERM's default (not unwound: a process pool unwound from a signal could hang
    in CPython 3.11), with no traceback, nothing left running, the rows kept."""
    proc, table, helpers = sweep_until_a_row(tmp_path, start_new_session=True)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        err = proc.communicate(timeout=60)[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGTERM and "Traceback" not in err, err
    wait_gone(helpers)
    rows = read_rows(table)[0]
    assert 1 <= len(rows) < 16 and all(r["status"] == "ok" for r in rows)


PROC = Path("/proc")


def descendants(pid: int) -> list[int]:
    """The process ids below `pid` (Linux /proc; empty elsewhere)."""
    if not PROC.exists():
        return []
    parents: dict[int, list[int]] = {}
    for stat in PROC.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def running(pid: int) -> bool:
    """Whether `pid` is alive and not a zombie."""
    try:
        state = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_second_sweep_on_the_same_directory_is_refused(tmp_path):
    out = tmp_path / "out"
    with exclusive(out), pytest.raises(UserError, match="another sweep"):
        run_sweep(grid_file(tmp_path), SweepConfig(out=str(out), jobs=1, progress=False))


def test_an_output_directory_holding_someone_elses_table_is_left_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "table.jsonl").write_bytes(b'{"my": "precious data"}')
    with pytest.raises(UserError, match="not a row of a sweep table"):
        run_sweep(grid_file(tmp_path), SweepConfig(out=str(out), jobs=1, progress=False))
    assert [p.name for p in out.iterdir()] == ["table.jsonl"]  # no lock file either
    assert (out / "table.jsonl").read_bytes() == b'{"my": "precious data"}'


def test_a_sweep_does_not_write_into_a_store(tmp_path):
    from tests.core.test_fileio import fake_store

    store = fake_store(tmp_path / "store")
    with pytest.raises(UserError, match="inside the nested store") as err:
        run_sweep(grid_file(tmp_path), SweepConfig(out=str(store), jobs=1, progress=False))
    assert err.value.field == "out"
    assert sorted(p.name for p in store.iterdir()) == ["index.json", "layer_000.bin"]


def test_ray_missing_is_a_user_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UserError, match=r"pip install 'd2moe\[ray\]'"):
        run_sweep(grid_file(tmp_path), SweepConfig(out=str(tmp_path / "o"), ray="auto"))


def test_ray_runs_each_cell_as_a_task(tmp_path, monkeypatch):
    calls: dict[str, object] = {}

    class Ref:
        def __init__(self, value: object) -> None:
            self.value = value

    def remote(fn):
        return types.SimpleNamespace(remote=lambda item: Ref(fn(item)))

    fake = types.SimpleNamespace(
        is_initialized=lambda: "address" in calls,
        init=lambda address: calls.setdefault("address", address),
        remote=remote, get=lambda ref: ref.value, cancel=lambda ref: None,
        wait=lambda refs, num_returns: (refs[:num_returns], refs[num_returns:]))
    monkeypatch.setitem(sys.modules, "ray", fake)
    out = tmp_path / "o"
    result = run_sweep(grid_file(tmp_path), SweepConfig(out=str(out), ray="ray://head:10001",
                                                        progress=False))
    assert calls["address"] == "ray://head:10001"
    assert result.ran == {"ok": 4} and len(rows_of(out)) == 4


def test_the_cli_reports_a_bad_grid_in_one_line(tmp_path, capsys):
    grid = grid_file(tmp_path, GRID.replace("fifo, hebf", "fifo, nope"))
    assert main(["sweep", str(grid), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "policies[1]" in err and str(grid) in err and "Traceback" not in err


def test_a_bad_model_spec_is_refused_on_a_rerun_not_skipped(tmp_path, capsys):
    grid = grid_file(tmp_path)
    out = tmp_path / "o"
    assert main(["sweep", str(grid), "--out", str(out), "--jobs", "1", "--no-progress"]) == 0
    before = (out / "table.jsonl").read_bytes()
    grid_file(tmp_path, GRID + "model_spec: nope\n")  # was "0 ran, 4 already in the table"
    assert main(["sweep", str(grid), "--out", str(out), "--jobs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "field 'model_spec'" in err and "nope" in err and len(err.splitlines()) == 1
    assert (out / "table.jsonl").read_bytes() == before


def test_a_sweep_whose_every_cell_failed_exits_2_with_the_first_message(tmp_path, capsys):
    olmoe = GRID.replace("synth:tiny", "synth:olmoe-1b-7b")  # cpu-2core has no olmoe table
    grid = grid_file(tmp_path, olmoe)
    args = ["sweep", str(grid), "--out", str(tmp_path / "o"), "--jobs", "1", "--no-progress"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "4 ran (4 error)" in captured.out
    (line,) = captured.err.splitlines()
    assert "every cell that ran failed (4)" in line and "no rows for model 'olmoe-1b-7b'" in line
    # some cells fail, others run: exit 0, and the first failure is still named
    grid_file(tmp_path, olmoe.replace("cpu-2core", "cpu-2core, rtx3060-laptop"))
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "8 cells: 8 ran (4 error, 4 ok)" in captured.out
    assert "4 of 8 cells that ran failed" in captured.err
    assert "no rows for model 'olmoe-1b-7b'" in captured.err


def test_capacity_options_re_place_a_router_trace(tmp_path):
    from d2moe.traces.schema import save_trace
    from tests.sim.test_adaptive import router_trace

    save_trace(tmp_path / "router.npz", router_trace())
    base = "policies: [hebf]\nbudgets: [\"60%\"]\nprofiles: [cpu-2core]\ntraces: [router.npz]\n"
    # forced up moves (stall never above 1, ceiling at the bounds): more bits than trained
    forced = ("capacity: {capacity_mode: adaptive, capacity_window: 4, stall_low: 1.0, "
              "stall_high: 1.0, share_step: 0.25, share_ceiling: bounds}\n")
    bits = {}
    for name, text in (("fixed", base), ("adaptive", base + forced)):
        out = tmp_path / name
        run_sweep(grid_file(tmp_path, text), SweepConfig(out=str(out), jobs=1, progress=False))
        (row,) = rows_of(out)
        assert row["status"] == "ok", row["message"]
        assert row["capacity_mode"] == (None if name == "fixed" else "adaptive")
        bits[name] = row["mean_run_bits"]
    assert bits["adaptive"] > bits["fixed"]
    # adaptive capacities on a trace without a router: an error row naming the option
    out = tmp_path / "plain"
    run_sweep(grid_file(tmp_path, GRID + forced), SweepConfig(out=str(out), jobs=1,
                                                            progress=False))
    assert {r["status"] for r in rows_of(out)} == {"error"}
    assert all("capacity" in r["message"] for r in rows_of(out))


def test_a_grid_that_is_a_directory_says_so(tmp_path, capsys):
    assert main(["sweep", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}: is a directory" in err and "no such file" not in err
