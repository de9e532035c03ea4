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
