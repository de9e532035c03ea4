"""Timeline files: both formats round-trip; a foreign or newer file is refused clearly."""

from __future__ import annotations

import json

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
