"""Timeline files: both formats round-trip; a foreign or newer file is refused clearly."""

from __future__ import annotations

import json
import re

import pytest

from d2moe.core.errors import UserError
from d2moe.core.events import Event, Timeline, load_timeline, save_timeline

EVENTS = [Event("io", "load", 0, 1, 3, 0, 4, 0, 1000, 0.5, 2.25),
          Event("compute", "run", 0, 1, 3, 4, 4, 2, 0, 2.25, 3.0),
          Event("memory", "evict", 0, 0, 5, 4, 2, 0, 500, 0.5, 0.5)]


@pytest.mark.parametrize("suffix", [".jsonl", ".npz"])
def test_round_trip(tmp_path, suffix):
    path = tmp_path / f"t{suffix}"
    save_timeline(path, Timeline(EVENTS, {"policy": "hebf", "budget_bytes": 7}))
    back = load_timeline(path)
    assert back.events == EVENTS
    assert back.meta == {"policy": "hebf", "budget_bytes": 7}
    assert [type(x) for x in back.events[0]] == [type(x) for x in EVENTS[0]]


def test_version_and_format_are_checked(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"format": "d2moe.timeline", "version": 9, "meta": {}}) + "\n")
    with pytest.raises(UserError, match=r"t.jsonl: field 'version'"):
        load_timeline(path)
    path.write_text(json.dumps({"format": "other"}) + "\n")
    with pytest.raises(UserError, match="not a d2moe timeline"):
        load_timeline(path)
    with pytest.raises(UserError, match="no such file"):
        load_timeline(tmp_path / "none.jsonl")


def _npz(path, **cols):
    """An .npz of EVENTS' columns and header, with `cols` replacing (None: dropping) some."""
    import numpy as np

    arrays = {n: np.array([getattr(e, n) for e in EVENTS]) for n in Event._fields}
    arrays["header"] = np.array(json.dumps({"format": "d2moe.timeline", "version": 1,
                                            "meta": {}}))
    for name, value in cols.items():
        arrays.pop(name) if value is None else arrays.__setitem__(name, value)
    np.savez(path, **arrays)


@pytest.mark.parametrize("damage,named", [
    ("garbage", "unreadable timeline .npz"),
    ("truncated", "unreadable timeline .npz"),
    ("no header", "field 'header': no header"),
    ("no column", "field 'bytes': no column 'bytes'"),
    ("short column", "columns of different lengths"),
    ("float step", "field 'step': not whole numbers"),
    ("bad kind", "field 'kind': kind 'load' on lane 'compute'"),
    ("nan time", "field 'end_us': not finite numbers"),
    ("pickled", "unreadable timeline .npz"),
])
def test_a_damaged_npz_is_one_user_error_naming_it(tmp_path, damage, named):
    import numpy as np

    path, good = tmp_path / "t.npz", tmp_path / "good.npz"
    save_timeline(good, Timeline(EVENTS, {}))
    if damage == "garbage":
        path.write_bytes(b"not a zip at all")
    elif damage == "truncated":
        path.write_bytes(good.read_bytes()[:200])
    elif damage == "pickled":
        np.savez(path, header=np.array([{"a": 1}], dtype=object), **{
            n: np.zeros(3) for n in Event._fields})
    else:
        _npz(path, **{
            "no header": {"header": None}, "no column": {"bytes": None},
            "short column": {"tokens": np.array([1, 2])},
            "float step": {"step": np.array([0.5, 1.0, 2.0])},
            "bad kind": {"lane": np.array(["compute", "compute", "memory"])},
            "nan time": {"end_us": np.array([1.0, np.nan, 2.0])}}[damage])
    with pytest.raises(UserError, match=named) as err:
        load_timeline(path)
    assert err.value.path == str(path)


@pytest.mark.parametrize("row,named", [
    ('[1, 2]', "row 1 has fields list"),
    ('{"lane": "io"}', "row 1 has fields ['lane']"),
    (json.dumps({**EVENTS[0]._asdict(), "bits_to": "4"}), "field 'bits_to': not whole"),
    (json.dumps({**EVENTS[0]._asdict(), "start_us": "x"}), "field 'start_us': not finite"),
    (json.dumps({**EVENTS[0]._asdict(), "kind": "nap"}), "kind 'nap' on lane 'io'"),
    (json.dumps({**EVENTS[0]._asdict(), "lane": ["io"]}), "field 'lane': not text: ['io']"),
])
def test_a_damaged_jsonl_row_is_one_user_error_naming_it(tmp_path, row, named):
    path = tmp_path / "t.jsonl"
    save_timeline(path, Timeline(EVENTS[:1], {}))
    path.write_text(path.read_text() + row + "\n")
    with pytest.raises(UserError, match=re.escape(named)):
        load_timeline(path)
    lines = path.read_text().splitlines()  # whole-number times are read as floats
    path.write_text("\n".join([lines[0], json.dumps({**EVENTS[0]._asdict(), "end_us": 3})]))
    assert load_timeline(path).events[0].end_us == 3.0
    assert type(load_timeline(path).events[0].end_us) is float


def test_a_binary_file_or_a_header_of_another_shape_is_one_user_error(tmp_path):
    png = tmp_path / "bubbles.png"  # `run` writes it beside events.npz: an easy slip
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 8)
    with pytest.raises(UserError, match="not a timeline: binary"):
        load_timeline(png)
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"format": "d2moe.timeline", "version": 1, "meta": [1]}) + "\n")
    with pytest.raises(UserError, match="field 'meta': expected a mapping, got list"):
        load_timeline(path)
