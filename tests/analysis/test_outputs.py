"""PNG plots, the Chrome trace export and the text tables."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from d2moe.analysis import (
    compute_metrics,
    export_chrome,
    format_table,
    metrics_row,
    plot_bubbles,
    plot_resident,
    resident_curve,
)
from d2moe.core.errors import UserError
from d2moe.core.events import Timeline
from tests.analysis.synth import random_steps, schedule
from tests.analysis.test_metrics import golden_decode

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def pair() -> list[Timeline]:
    steps = random_steps(np.random.default_rng(0), steps=4, layers=8)
    return [schedule(steps, policy=p, budget_bytes=3000, prefetch=p == "hebf")
            for p in ("fifo", "hebf")]


def test_import_does_not_load_matplotlib():
    code = "import sys, d2moe.analysis; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_bubble_png_full_and_windowed(tmp_path, pair):
    full = plot_bubbles(pair, tmp_path / "full.png", title="FIFO vs HEBF", dpi=80)
    w, h = png_size(full)
    assert w == 14 * 80 and h > 0 and full.stat().st_size > 10_000
    # zoomed views: a window and the first step; both differ from the full view
    win = plot_bubbles(pair, tmp_path / "win.png", labels=["FIFO", "HEBF"],
                       window=(0.0, 800.0), dpi=80)
    first = plot_bubbles(pair, tmp_path / "first.png", first_steps=1, dpi=80)
    assert png_size(win) == (w, h) and png_size(first) == (w, h)
    assert win.read_bytes() != full.read_bytes() != first.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_bubble_plot_rejects_bad_input(tmp_path, pair):
    with pytest.raises(UserError):
        plot_bubbles(pair, tmp_path / "x.png", window=(5.0, 5.0))
    with pytest.raises(UserError):
        plot_bubbles(pair, tmp_path / "x.png", labels=["only one"])
    with pytest.raises(UserError):
        plot_bubbles([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_resident_png(tmp_path, pair):
    path = plot_resident(pair, tmp_path / "budget.png", dpi=60)
    w, h = png_size(path)
    assert (w, h) == (9 * 60, round(3.2 * 60))


def test_chrome_trace(tmp_path):
    tl = golden_decode()
    path = export_chrome(tl, tmp_path / "trace.json")
    doc = json.loads(path.read_text())
    evs = doc["traceEvents"]
    intervals = [e for e in tl.events if e.kind != "evict"]
    xs = [e for e in evs if e["ph"] == "X"]
    assert len(xs) == len(intervals)
    names = {e["args"]["name"] for e in evs if e["name"] == "thread_name"}
    assert names == {"step", "compute", "io", "memory"}
    tid_of = {e["args"]["name"]: e["tid"] for e in evs if e["name"] == "thread_name"}
    load = next(e for e in xs if e["cat"] == "load" and e["args"]["expert"] == 1)
    assert (load["ts"], load["dur"], load["tid"]) == (10.0, 20.0, tid_of["io"])
    assert load["args"]["bytes"] == 100 and load["args"]["bits_to"] == 4
    instants = [e for e in evs if e["ph"] == "i"]
    assert len(instants) == 1 and instants[0]["ts"] == 50.0
    counters = [e for e in evs if e["ph"] == "C"]
    t, level = resident_curve(tl)
    assert [c["ts"] for c in counters] == t.tolist()
    assert max(c["args"]["MiB"] for c in counters) * 2**20 == pytest.approx(level.max())
    assert {e["pid"] for e in evs} == {1}


def test_chrome_two_timelines_and_overlapping_io(tmp_path, pair):
    from d2moe.core.events import Event

    overlap = Timeline([Event("io", "load", 0, 0, 1, 0, 4, 0, 1, 0.0, 10.0),
                        Event("io", "load", 0, 0, 2, 0, 4, 0, 1, 5.0, 15.0),
                        Event("io", "load", 0, 0, 3, 0, 4, 0, 1, 10.0, 20.0)], {})
    path = export_chrome([pair[0], overlap], tmp_path / "two.json", labels=["a", "b"])
    evs = json.loads(path.read_text())["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in evs if e["name"] == "process_name"}
    assert procs == {1: "a", 2: "b"}
    # three loads where two overlap: two I/O tracks, and no track holds overlapping slices
    io = [e for e in evs if e["pid"] == 2 and e["ph"] == "X"]
    assert len({e["tid"] for e in io}) == 2
    for tid in {e["tid"] for e in io}:
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in io if e["tid"] == tid)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_metrics_table(pair):
    rows = [metrics_row(t.meta["policy"], compute_metrics(t)) for t in pair]
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 4
    for unit in ("tok/s", "bubble io %", "exposed io ms", "hit %", "loaded MiB", "peak MiB",
                 "gap to bound %"):
        assert unit in lines[0]
    assert lines[2].startswith("fifo ") and lines[3].startswith("hebf ")
    # numbers are right-aligned: every line ends at the same column
    assert len({len(line) for line in lines}) == 1


def test_format_table_cells():
    text = format_table([{"name": "a", "x": 1234.5, "n": 3}, {"name": "bb", "x": 2.25}],
                        columns=["name", "x", "n"])
    assert text.splitlines() == [
        "name      x  n",
        "----  -----  -",
        "a     1,234  3",  # one precision per column: >= 1000 -> no decimals (rounds half even)
        "bb        2  -",
    ]
