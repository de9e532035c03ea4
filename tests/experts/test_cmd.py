"""`d2moe experts stats` through the CLI: where it may write."""

from __future__ import annotations

from pathlib import Path

from d2moe.cli import main
from d2moe.core.spec import load_spec
from d2moe.traces import save_trace, synth_trace
from d2moe.traces.synth import SynthConfig
from tests.core.test_fileio import fake_store


def test_stats_never_overwrite_a_stores_own_file_but_go_beside_it(tmp_path: Path,
                                                                   capsys) -> None:
    trace = tmp_path / "t.npz"
    save_trace(trace, synth_trace(load_spec("tiny"), SynthConfig(decode_steps=3)))
    store = fake_store(tmp_path / "store")
    index = (store / "index.json").read_bytes()
    assert main(["experts", "stats", "--trace", str(trace), "--out",
                 str(store / "index.json")]) == 2  # destroyed the store's index before
    err = capsys.readouterr().err
    assert "field 'out'" in err and "inside the nested store" in err
    assert (store / "index.json").read_bytes() == index
    assert main(["experts", "stats", "--trace", str(trace), "--out", str(store)]) == 0
    assert (store / "expert_stats.json").is_file()  # its own statistics: where they belong
