"""`d2moe trace synth` / `d2moe trace info` through their argparse registration."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from d2moe.traces import cmd
from d2moe.traces.schema import Trace, load_trace


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="d2moe")
    cmd.register(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_synth_then_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.npz"
    assert _run(["trace", "synth", "--model-spec", "tiny", "--seed", "4", "--batch", "3",
                 "--prefill-tokens", "5", "--decode-steps", "6", "--zipf", "1.5",
                 "--bits", "5,6,7,8", "--capacities", "0.25,0.25,0.25,0.25",
                 "--out", str(out)]) == 0
    t = load_trace(out)
    assert (t.num_steps, t.num_tokens) == (7, 33)
    assert t.meta["generator"]["zipf"] == 1.5 and t.meta["seed"] == 4
    assert set(np.unique(t.bits).tolist()) <= {5, 6, 7, 8}
    capsys.readouterr()
    assert _run(["trace", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "steps: 7 (1 prefill, 6 decode)" in text
    assert "tokens: 33 (15 prefill, 18 decode" in text
    assert "reuse rate" in text and "5 bits:" in text and "L3" in text


def test_synth_refuses_to_write_into_a_store_before_the_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from d2moe.cli import main
    from tests.core.test_fileio import fake_store

    store = fake_store(tmp_path / "store")
    before = (store / "layer_000.bin").read_bytes()
    assert main(["trace", "synth", "--model-spec", "tiny", "--decode-steps", "2",
                 "--out", str(store / "layer_000.bin")]) == 2  # replaced the layer before
    err = capsys.readouterr().err
    assert "field 'out'" in err and "inside the nested store" in err
    assert (store / "layer_000.bin").read_bytes() == before


def test_synth_shows_a_bar_unless_told_not_to(tmp_path: Path, monkeypatch) -> None:
    from tests.conftest import CountingBar

    calls, bar = [], CountingBar()

    def counting_bar(total: int, enabled: bool, desc: str, unit: str, **kw: float) -> CountingBar:
        calls.append((total, enabled))
        return bar if enabled else None

    monkeypatch.setattr(cmd, "progress_bar", counting_bar)
    args = ["trace", "synth", "--model-spec", "tiny", "--decode-steps", "3",
            "--out", str(tmp_path / "t.npz")]
    assert _run(args) == 0
    assert calls == [(4 + 3, True)] and bar.n == 4 + 3 and bar.closed  # layers, 2, writing
    assert _run(args + ["--no-progress"]) == 0 and calls[-1] == (7, False)


def test_reuse_rate_by_hand() -> None:
    # 1 layer, top-1 of 4: steps use {0}, {0}, {1, 2} -> hits 1 of 1, then 0 of 2 -> 1/3
    t = Trace("hand", 4, [1, 1, 1], [0, 1, 2, 4], np.array([[[0]], [[0]], [[1]], [[2]]]),
              np.ones((4, 1, 1), np.float32))
    assert cmd.reuse_rate(t) == pytest.approx(1 / 3)
    assert cmd.layer_counts(t).tolist() == [[2, 1, 1, 0]]


@pytest.mark.parametrize("option,value,field", [("--decode-steps", "-1", "decode-steps"),
                                                ("--prefill-tokens", "0", "prefill-tokens"),
                                                ("--bits", "-1", "bits"), ("--bits", "17", "bits")])
def test_record_rejects_bad_counts_before_loading_the_model(
        option: str, value: str, field: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from d2moe.cli import main

    monkeypatch.setattr("d2moe.model.load.load_model",
                        lambda *a, **k: pytest.fail("model loaded"))
    assert main(["trace", "record", option, value, "--out", str(tmp_path / "t.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"field '{field}'" in err and "max_len" not in err
    assert "re-create the trace" not in err  # the option is wrong, not a trace file


def test_record_text_that_is_a_directory_says_so(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    from d2moe.cli import main

    monkeypatch.setattr("d2moe.model.load.load_model",
                        lambda *a, **k: pytest.fail("model loaded"))
    assert main(["trace", "record", "--text", str(tmp_path), "--out",
                 str(tmp_path / "t.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{tmp_path}: field 'text': is a directory" in err and "no such file" not in err
