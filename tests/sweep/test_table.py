"""The results table: whole lines only; a torn last line is ignored and cut before appending."""

from __future__ import annotations

import csv
import json

import pytest

from d2moe.core.errors import UserError
from d2moe.sweep.table import TableWriter, finished_ids, latest, read_rows, write_csv


def test_rows_append_as_whole_lines_and_read_back(tmp_path):
    path = tmp_path / "table.jsonl"
    with TableWriter(path) as t:
        t.append({"cell_id": "a", "status": "ok", "x": 1.5})
        t.append({"cell_id": "b", "status": "error", "message": "bad"})
    rows, size = read_rows(path)
    assert [r["cell_id"] for r in rows] == ["a", "b"]
    assert size == path.stat().st_size
    assert path.read_text().count("\n") == 2


def test_a_torn_last_line_is_ignored_then_cut_before_the_next_append(tmp_path):
    path = tmp_path / "table.jsonl"
    whole = json.dumps({"cell_id": "a", "status": "ok"}) + "\n"
    path.write_text(whole + '{"cell_id": "b", "sta')
    rows, size = read_rows(path)
    assert [r["cell_id"] for r in rows] == ["a"] and size == len(whole)
    with TableWriter(path) as t:
        assert [r["cell_id"] for r in t.rows] == ["a"]
        t.append({"cell_id": "c", "status": "ok"})
    assert [json.loads(line)["cell_id"] for line in path.read_text().splitlines()] == ["a", "c"]


def test_a_garbled_last_line_counts_as_torn_but_one_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "table.jsonl"
    path.write_text('{"cell_id": "a"}\n{"cell_i\n')
    assert [r["cell_id"] for r in read_rows(path)[0]] == ["a"]
    path.write_text('{"cell_id": "a"}\n{"cell_i\n{"cell_id": "b"}\n')
    with pytest.raises(UserError, match="line 2"):
        read_rows(path)



@pytest.mark.parametrize("data", [
    b"\x89PNG\r\n\x1a\n\x00\x00binary", b"cell,status\na,ok\n", b"PK\x03\x04zip without a newline",
    b'{"my": "precious data"}',  # a whole JSON object without its newline is not torn
    b'{"x": 1}\n{"x": 2}', b"{'a': 1}\n", b'{"x": 1}\n',  # JSON lines, but not rows
    b'{"a": 1,}', b'{"config": {"lr": 0.1', b'{"cell_id": 5, "mine": true}',  # cut or not
])
def test_a_file_that_is_not_a_table_is_refused_and_left_alone(tmp_path, data):
    """Someone else's file is an error naming it, never 'no rows', and the writer does not
    cut its 'torn' tail off."""
    path = tmp_path / "table.jsonl"
    path.write_bytes(data)
    with pytest.raises(UserError, match="not a (row of a sweep table|JSON object)") as exc:
        read_rows(path)
    assert str(path) in str(exc.value) and "--out" in str(exc.value)
    with pytest.raises(UserError):
        TableWriter(path)
    assert path.read_bytes() == data


def test_a_whole_row_without_its_newline_counts_as_torn(tmp_path):
    path = tmp_path / "table.jsonl"
    with TableWriter(path) as t:
        t.append({"cell_id": "a", "status": "ok"})
        t.append({"cell_id": "b", "status": "ok"})
    data = path.read_bytes()
    path.write_bytes(data[:-1])  # the crash came between the row and its newline
    rows, size = read_rows(path)
    assert [r["cell_id"] for r in rows] == ["a"] and size == data.index(b"\n") + 1


@pytest.mark.parametrize("cut", [1, 2, 13, 20])  # "{", '{"', the whole '{"cell_id": "', more
def test_any_prefix_of_a_row_counts_as_torn(tmp_path, cut):
    path = tmp_path / "table.jsonl"
    whole = json.dumps({"cell_id": "a", "status": "ok"}) + "\n"
    path.write_text(whole + json.dumps({"cell_id": "b", "status": "ok"})[:cut])
    assert [r["cell_id"] for r in read_rows(path)[0]] == ["a"]


def test_nul_bytes_after_a_power_loss_count_as_torn(tmp_path):
    path = tmp_path / "table.jsonl"
    whole = json.dumps({"cell_id": "a", "status": "ok"}) + "\n"
    path.write_bytes(whole.encode() + b"\0" * 64)
    assert [r["cell_id"] for r in read_rows(path)[0]] == ["a"]

def test_finished_cells_are_ok_or_does_not_fit_by_their_latest_row():
    rows = [{"cell_id": "a", "status": "error"}, {"cell_id": "b", "status": "does-not-fit"},
            {"cell_id": "c", "status": "ok"}, {"cell_id": "a", "status": "ok"},
            {"cell_id": "d", "status": "error"}]
    assert finished_ids(rows) == {"a", "b", "c"}
    assert latest(rows)["a"]["status"] == "ok"


def test_csv_has_the_cell_columns_first_and_every_key(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"policy": "fifo", "cell_id": "a", "z": 1},
                                          {"cell_id": "b", "extra": None}])
    with open(path) as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames[0] == "cell_id"
    assert {"z", "extra", "policy"} <= set(reader.fieldnames)
    assert rows[0]["z"] == "1" and rows[1]["extra"] == ""


def _edit(path, line: int, old: str, new: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    assert old in lines[line]
    lines[line] = lines[line].replace(old, new)
    path.write_text("".join(lines))


def test_each_row_carries_a_digest_checked_on_read(tmp_path):
    import numpy as np

    path = tmp_path / "table.jsonl"
    with TableWriter(path) as t:
        t.append({"cell_id": "a", "status": "ok", "decode_tokens_per_s": np.float32(12.5),
                  "steps": np.int64(7), "oracle_hit_rate": None, "x": float("nan")})
        t.append({"cell_id": "b", "status": "ok", "decode_tokens_per_s": 3.25})
    stored = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(len(r["row_sha256"]) == 16 for r in stored)
    rows, _ = read_rows(path)
    assert [r["decode_tokens_per_s"] for r in rows] == [12.5, 3.25]
    assert all("row_sha256" not in r for r in rows)  # storage framing, not data
    write_csv(tmp_path / "t.csv", rows)
    assert "row_sha256" not in (tmp_path / "t.csv").read_text()


@pytest.mark.parametrize("line", [0, 1])  # the middle and the last line alike
def test_a_hand_edited_row_is_an_error_naming_file_and_line(tmp_path, line):
    path = tmp_path / "table.jsonl"
    with TableWriter(path) as t:
        t.append({"cell_id": "a", "status": "ok", "decode_tokens_per_s": 3.25})
        t.append({"cell_id": "b", "status": "ok", "decode_tokens_per_s": 3.25})
    _edit(path, line, '"decode_tokens_per_s": 3.25', '"decode_tokens_per_s": 99.0')
    with pytest.raises(UserError, match=f"line {line + 1} does not match") as err:
        read_rows(path)
    assert err.value.path == str(path) and "delete the line" in str(err.value)
    with pytest.raises(UserError, match="row_sha256"):
        TableWriter(path)  # a resumed sweep refuses it too


def test_rows_written_before_digests_are_accepted(tmp_path):
    path = tmp_path / "table.jsonl"
    path.write_text(json.dumps({"cell_id": "a", "status": "ok"}) + "\n")
    with TableWriter(path) as t:
        t.append({"cell_id": "b", "status": "ok"})
    assert [r["cell_id"] for r in read_rows(path)[0]] == ["a", "b"]


GRID = """
policies: [fifo]
budgets: ["30%"]
profiles: [PROFILE]
traces: [TRACE]
"""


def _grid(tmp_path, profile="cpu-2core", trace='"synth:tiny:decode_steps=4,prefill_tokens=4"'):
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.replace("PROFILE", profile).replace("TRACE", trace))
    return path


def test_a_wrapped_grid_error_states_its_fix_once(tmp_path, capsys):
    import numpy as np

    from d2moe.cli import main
    from d2moe.core.spec import load_spec
    from d2moe.traces import SynthConfig, save_trace, synth_trace

    v9 = tmp_path / "v9.npz"
    save_trace(v9, synth_trace(load_spec("tiny"), SynthConfig(decode_steps=4)))
    with np.load(v9) as z:
        arrays = {n: z[n] for n in z.files}
    header = json.loads(str(arrays["header"]))
    arrays["header"] = np.array(json.dumps({**header, "version": 9}))
    np.savez(v9, **arrays)
    for grid in (_grid(tmp_path, profile="no-such-profile"),
                 _grid(tmp_path, trace="v9.npz"), _grid(tmp_path, trace="synth:nospec")):
        assert main(["sweep", str(grid), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "grid.yaml" in err
        assert err.count("(fix:") == 1, err


def test_a_damaged_cached_synthetic_trace_is_written_again(tmp_path, capsys):
    from d2moe.sweep.runner import SweepConfig, run_sweep
    from d2moe.traces import load_trace

    grid, out = _grid(tmp_path), tmp_path / "out"
    run_sweep(grid, SweepConfig(out=str(out), jobs=1, progress=False))
    (cached,) = (out / "traces").glob("synth-*.npz")
    good, before = cached.read_bytes(), load_trace(cached)
    cached.write_bytes(good[: len(good) // 2])
    (out / "table.jsonl").unlink()
    result = run_sweep(grid, SweepConfig(out=str(out), jobs=1, progress=False))
    assert result.ran == {"ok": 1}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(cached) in err and "writing it again" in err
    after = load_trace(cached)  # the same trace again (the generator is deterministic)
    assert (after.experts == before.experts).all() and after.num_steps == before.num_steps
