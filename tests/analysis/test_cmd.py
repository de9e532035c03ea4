"""`d2moe timeline info|plot|chrome` on saved timelines: the metrics of the rows, the steps
shown, one label per file, and bad input as one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from d2moe.analysis import compute_metrics
from d2moe.analysis.cmd import TimelinePlotConfig, plot_timelines
from d2moe.cli import main
from d2moe.core.errors import UserError
from d2moe.core.events import save_timeline
from tests.analysis.synth import random_steps, schedule
from tests.analysis.test_outputs import png_size


@pytest.fixture()
def files(tmp_path) -> list[str]:
    """FIFO (.npz) and HEBF (.jsonl) of the same 5 steps (a prefill, 4 decode)."""
    steps = random_steps(np.random.default_rng(1), steps=5, layers=4)
    out = []
    for policy, suffix in (("fifo", "npz"), ("hebf", "jsonl")):
        tl = schedule(steps, policy=policy, budget_bytes=2000,
                      meta={"backend": "sim", "policy": policy, "model": "m"})
        path = tmp_path / f"{policy}.{suffix}"
        save_timeline(path, tl)
        out.append(str(path))
    return out


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_prints_each_files_metadata_and_its_metrics(files, capsys):
    from d2moe.core.events import load_timeline

    code, out, _ = _run(capsys, "timeline", "info", *files)
    assert code == 0
    head, table = out.split("\n\n", 1)
    assert head.splitlines()[0].startswith(f"{files[0]}: ")
    assert "5 steps; backend sim, policy fifo, model m" in head
    rows = table.strip().splitlines()[2:]  # below the header and its rule
    assert [r.split()[:4] for r in rows] == [["1:", "sim", "/", "fifo"],
                                             ["2:", "sim", "/", "hebf"]]
    for row, path in zip(rows, files, strict=True):
        m = compute_metrics(load_timeline(path))
        assert float(row.split()[4].replace(",", "")) == pytest.approx(
            m.decode_tokens_per_s, rel=0.01)


def test_plot_shows_the_asked_steps_of_each_file_from_zero(files, tmp_path, capsys,
                                                           monkeypatch):
    out = tmp_path / "t.png"
    code, text, _ = _run(capsys, "timeline", "plot", *files, "--labels", "a,b",
                         "--out", str(out))
    assert code == 0 and text.strip() == f"wrote {out}"
    w, h = png_size(out)
    assert w > 1000 and h > 300
    seen = []

    def spy(timelines, path, **kw):  # what would be drawn
        seen.append(([sorted({e.step for e in t.events}) for t in timelines],
                     [min(e.start_us for e in t.events if e.lane == "step")
                      for t in timelines], kw["labels"]))
        return path

    import d2moe.analysis.timeline_plot as tp

    monkeypatch.setattr(tp, "plot_bubbles", spy)
    plot_timelines(files, TimelinePlotConfig(first_step=2, steps=2, labels="a,b", out=str(out)))
    plot_timelines(files, TimelinePlotConfig(steps=0, out=str(out)))
    assert seen[0] == ([[2, 3], [2, 3]], [0.0, 0.0], ["a", "b"])
    assert seen[1][0] == [[0, 1, 2, 3, 4]] * 2 and seen[1][2] is None  # whole, own labels


def test_chrome_has_one_process_per_file(files, tmp_path, capsys):
    out = tmp_path / "c.json"
    assert _run(capsys, "timeline", "chrome", *files, "--out", str(out))[0] == 0
    doc = json.loads(out.read_text())
    assert {e["pid"] for e in doc["traceEvents"]} == {1, 2}
    assert list(doc["otherData"]) == ["1: sim / fifo", "2: sim / hebf"]


@pytest.mark.parametrize("argv,named", [
    (("plot", "{0}", "--first-step", "9"), "field 'first-step': no step 9 here"),
    (("plot", "{0}", "{1}", "--labels", "only-one"), "field 'labels': 1 labels for 2 files"),
    (("plot", "{0}", "--steps", "-1"), "field 'steps': must be >= 0"),
    (("info", "{missing}"), "no such file"),
    (("chrome", "{bad}"), "not a d2moe timeline"),
])
def test_bad_input_is_one_line(files, tmp_path, capsys, argv, named):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "other"}\n')
    argv = [a.format(*files, missing=tmp_path / "none.npz", bad=bad) for a in argv]
    code, _, err = _run(capsys, "timeline", *argv, *(
        ["--out", str(tmp_path / "o.png")] if argv[0] == "plot" else []))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert named in err, err
    assert not (tmp_path / "o.png").exists()


def test_plot_config_checks_before_reading(tmp_path):
    with pytest.raises(UserError, match="first-step"):
        plot_timelines([str(tmp_path / "none.npz")], TimelinePlotConfig(first_step=-1))


def test_an_empty_timeline_is_named_as_empty(tmp_path, capsys):
    from d2moe.core.events import Timeline

    path = tmp_path / "empty.npz"
    save_timeline(path, Timeline([], {"backend": "sim"}))
    code, _, err = _run(capsys, "timeline", "plot", str(path), "--out", str(tmp_path / "e.png"))
    assert code == 2 and "no steps here: an empty timeline" in err, err
    code, out, _ = _run(capsys, "timeline", "info", str(path))
    assert code == 0 and "0 events, 0 steps" in out


def test_a_serving_runs_timeline_gets_its_request_latencies(tmp_path, capsys, files):
    """Its lanes idle while requests have yet to arrive, which the generic table would
    count as bubbles: `info` gives it d2moe serve's latency table instead."""
    served = tmp_path / "serve"
    assert main(["serve", "--requests", "3", "--out", str(served), "--policy", "fifo"]) == 0
    capsys.readouterr()
    code, out, _ = _run(capsys, "timeline", "info", files[0], str(served / "events-fifo.npz"))
    assert code == 0
    generic, requests = out.split("served requests:")
    assert "1: sim / fifo" in generic and "2: " not in generic
    assert "p99 TTFT ms" in requests and "2: sim / fifo" in requests
