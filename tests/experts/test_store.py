"""expert_stats.json: round trip, checksum, shape checks against a model spec."""

from __future__ import annotations

import json

import numpy as np
import pytest

from d2moe.core.errors import UserError
from d2moe.core.spec import load_spec
from d2moe.experts import STATS_FILE, load_stats, save_stats
from d2moe.experts.store import resolve
from d2moe.policies.stats import ExpertStats


def _stats(layers=4, experts=8, seed=0) -> ExpertStats:
    rng = np.random.default_rng(seed)
    imp = rng.uniform(size=(layers, experts))
    imp /= imp.max(axis=1, keepdims=True)
    sim = rng.uniform(-1, 1, size=(layers, experts, experts))
    sim = (sim + sim.transpose(0, 2, 1)) / 2
    for s in sim:
        np.fill_diagonal(s, 1.0)
    return ExpertStats.from_lists(imp, sim, source="test", meta={"seed": seed})


def test_round_trip_into_a_directory_and_auto(tmp_path):
    stats = _stats()
    path = save_stats(tmp_path, stats)
    assert path == tmp_path / STATS_FILE
    back = load_stats(path, spec=load_spec("tiny"))
    assert back == stats and back.meta == {"seed": 0} and back.source == "test"
    assert load_stats("auto", store=tmp_path) == stats
    assert load_stats(tmp_path) == stats
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_flipped_byte_is_caught_naming_the_file(tmp_path):
    path = save_stats(tmp_path / "s.json", _stats())
    raw = bytearray(path.read_bytes())
    text = raw.decode()
    at = text.index('"similarity"') + 40  # inside the numbers
    while not chr(raw[at]).isdigit():
        at += 1
    raw[at] = ord("7") if raw[at] != ord("7") else ord("3")
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"s\.json.*field 'sha256'.*checksum mismatch"):
        load_stats(path)


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"\xff\xfe" + b])
def test_truncated_or_garbled_file_is_a_user_error(tmp_path, damage):
    path = save_stats(tmp_path / "s.json", _stats())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=r"s\.json.*damaged"):
        load_stats(path)


def test_a_nan_written_into_the_file_is_a_checksum_mismatch(tmp_path):
    path = save_stats(tmp_path / "s.json", _stats())
    record = json.loads(path.read_text())
    record["importance"][0][0] = float("nan")
    path.write_text(json.dumps(record))  # json writes NaN, which save_stats never does
    with pytest.raises(UserError, match=r"s\.json.*field 'sha256'.*checksum mismatch"):
        load_stats(path)


def test_shape_mismatch_with_the_model_spec(tmp_path):
    path = save_stats(tmp_path / "s.json", _stats(layers=4, experts=6))
    with pytest.raises(UserError, match=r"s\.json: field 'experts'.*experts=6.*has 8"):
        load_stats(path, spec=load_spec("tiny"))


def test_edited_arrays_with_a_recomputed_checksum_are_still_checked(tmp_path):
    from d2moe.experts.store import _digest

    path = save_stats(tmp_path / "s.json", _stats())
    record = json.loads(path.read_text())
    record["similarity"][0][1][1] = 0.5  # diagonal must be 1
    payload = {k: record[k] for k in ("source", "layers", "experts", "importance",
                                      "similarity", "meta")}
    record["sha256"] = _digest(payload)
    path.write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"field 'similarity'.*layer 0"):
        load_stats(path)


def test_missing_file_and_auto_without_store(tmp_path):
    with pytest.raises(UserError, match="no expert statistics here"):
        load_stats(tmp_path / "none.json")
    with pytest.raises(UserError, match="needs a store"):
        resolve("auto")


def test_a_file_of_another_kind_is_named_as_such_not_as_damaged(tmp_path):
    import numpy as np

    npz = tmp_path / "t.npz"
    np.savez(npz, a=np.arange(3))
    with pytest.raises(UserError, match=r"t\.npz: not an expert statistics file") as err:
        load_stats(npz)
    assert "damaged" not in str(err.value) and "UTF-8" not in str(err.value)
