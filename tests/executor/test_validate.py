"""`d2moe validate` end to end on the tiny model: every (policy, budget) row, the files, the
trace that the simulator replays; and clear errors. Timings are not asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2moe.cli import main
from d2moe.core.errors import UserError
from d2moe.core.events import load_timeline
from d2moe.executor.validate import ValidateConfig, validate
from d2moe.traces import load_trace


@pytest.fixture(scope="module")
def store_path(tiny_store_path):
    return tiny_store_path


def test_validate_writes_every_row_and_the_side_by_side_figures(store_path, tmp_path):
    out = tmp_path / "v"
    cfg = ValidateConfig(store=str(store_path), profile="cpu-2core", policies="fifo,hebf",
                         budgets="25%,100%", max_new_tokens=3, out=str(out))
    result = validate(cfg)
    pairs = [(r.policy, r.budget) for r in result["rows"]]
    assert pairs == [("fifo", "25%"), ("hebf", "25%"), ("fifo", "100%"), ("hebf", "100%")]
    table = (out / "table.txt").read_text().splitlines()
    assert sum(1 for line in table if line.startswith(("fifo ", "hebf "))) == 4
    # the summary, the cost ratios, and (when every cost moved one way) the drift line, and
    # (on another machine than the shipped profile's) the line that says so
    at = next(i for i, line in enumerate(table) if line.startswith("tokens/s error"))
    assert table[at + 1].startswith("real / simulated time in decode steps")
    assert "loads" in table[at + 1]
    tail = table[at + 2:]
    assert len(tail) <= 2 and all("the profile's time" in line or line.startswith(
        "the profile was measured on") for line in tail)
    rows = json.loads((out / "fidelity.json").read_text())["rows"]
    assert all(set(r["real / sim time"]) <= {"loads", "expert runs", "non-expert",
                                             "loads alone", "loads beside runs"}
               and r["real / sim time"]["expert runs"] > 0 for r in rows)
    # the loads apart only where both sides made decode loads (every row at 25% does here)
    assert all({"loads alone", "loads beside runs"} & set(r["real / sim time"])
               for r in rows if r["budget"] == "25%")
    data = json.loads((out / "fidelity.json").read_text())
    assert len(data["rows"]) == 4 and set(data["summary"]["same_ranking"]) == {"25%", "100%"}
    for name in ("timeline-25pct.png", "timeline-100pct.png", "trace.npz"):
        assert (out / name).stat().st_size > 0
    real = load_timeline(out / "events-real-fifo-25pct.npz")
    sim = load_timeline(out / "events-sim-fifo-25pct.npz")
    assert real.meta["backend"] == "real" and sim.meta["backend"] == "sim"
    assert real.meta["budget_bytes"] == sim.meta["budget_bytes"]
    # the simulation replays the real run's routing: the same runs, step by step
    runs = lambda tl: sorted((e.step, e.layer, e.expert, e.tokens)  # noqa: E731
                             for e in tl.events if e.kind == "run")
    assert runs(real) == runs(sim)
    trace = load_trace(out / "trace.npz")
    assert trace.num_steps == 3 and trace.meta["source"] == "record"
    # the printed report: the key columns within a terminal's width, the rest in table.txt
    short = result["short_report"].splitlines()
    assert max(len(line) for line in short) <= 100
    assert sum(1 for line in short if line.startswith(("fifo ", "hebf "))) == 4
    assert "table.txt" in " ".join(short[-3:])


def test_the_files_written_are_summarized_by_pattern():
    from d2moe.analysis.tables import files_summary

    files = [f"o/events-{k}-{p}-{b}pct.npz" for b in (25, 100) for p in ("fifo", "hebf")
             for k in ("real", "sim")] + ["o/trace.npz", "o/table.txt", "o/timeline-25pct.png",
                                          "o/timeline-100pct.png", "elsewhere/x.json"]
    assert files_summary(files, "o") == ("events-real-*.npz, events-sim-*.npz, trace.npz, "
                                         "table.txt, timeline-*.png, elsewhere/x.json")


def test_validate_errors(store_path, tmp_path):
    base = dict(store=str(store_path), out=str(tmp_path / "v"), max_new_tokens=2)
    with pytest.raises(UserError, match=r"field 'policies': unknown policy 'nope'"):
        validate(ValidateConfig(policies="fifo,nope", **base))  # before the model loads
    with pytest.raises(UserError, match="smaller than one expert"):
        validate(ValidateConfig(budgets="1KiB", **base))
    for steps in (0, -1):  # as simulate's --plot-steps, range-checked before any work
        with pytest.raises(UserError, match=r"field 'plot-steps': must be >= 1"):
            ValidateConfig(plot_steps=steps, **base)
    assert main(["validate", "--profile", "no-such-profile", "--out", str(tmp_path)]) == 2
    assert not Path(tmp_path / "v" / "table.txt").exists()


def test_validate_can_measure_its_profile_first(tmp_path, store_path, monkeypatch):
    # a measured profile with few points (the real probes, kept small), written to OUT
    from d2moe.executor import validate as v
    from d2moe.profiles import load_profile

    real_measure = v.measure_here

    def small(spec, store, cfg, command="", **overrides):
        return real_measure(spec, store, cfg, command, tokens="1", bits="4", repeats=1,
                            disk_sizes="4KiB,64KiB", probe_experts=2)

    monkeypatch.setattr(v, "measure_here", small)
    out = tmp_path / "m"
    result = validate(ValidateConfig(store=str(store_path), profile="measure",
                                     policies="fifo", budgets="100%", max_new_tokens=3,
                                     out=str(out)))
    profile = load_profile(str(out / "profile.yaml"))
    assert profile.source.kind == "measured"
    assert profile.source.command == "d2moe validate --profile measure"
    assert [(r.policy, r.budget) for r in result["rows"]] == [("fifo", "100%")]
    assert json.loads((out / "fidelity.json").read_text())["profile"] == profile.name


def test_validate_measures_a_profile_before_each_pass(tmp_path, store_path, monkeypatch):
    """--profile measure with --repeats 3: a profile before each pass over the rows (after
    the warm-up run), the simulator on their median, written to OUT/profile.yaml."""
    from dataclasses import replace

    from d2moe.executor import validate as v
    from d2moe.profiles import load_profile

    base, log = load_profile("cpu-2core"), []
    real_record = v.record_run

    def fake_measure(spec, store, cfg, command="", **overrides):
        log.append("profile")
        gbps = [2.0, 9.0, 3.0][log.count("profile") - 1]
        return replace(base, disk=replace(base.disk, read_GBps=gbps))

    def record(*args, **kwargs):
        log.append("run")
        return real_record(*args, **kwargs)

    monkeypatch.setattr(v, "measure_here", fake_measure)
    monkeypatch.setattr(v, "record_run", record)
    out = tmp_path / "i"
    result = validate(ValidateConfig(store=str(store_path), profile="measure",
                                     policies="fifo", budgets="100%", max_new_tokens=2,
                                     repeats=3, out=str(out)))
    assert log == ["run"] + ["profile", "run"] * 3
    assert load_profile(str(out / "profile.yaml")).disk.read_GBps == 3.0  # the median
    assert "the median of 3 profiles measured between the runs" in result["report"]


def test_validate_runs_every_other_pass_backwards(tmp_path, store_path, monkeypatch):
    """Each pass runs every row once; odd passes in reverse order, so on a drifting machine
    no row always runs last (furthest from the pass's profile)."""
    from d2moe.executor import validate as v

    log = []
    real_record = v.record_run

    def record(model, spec, store, name, nbytes, *args, **kwargs):
        log.append((name, nbytes))
        return real_record(model, spec, store, name, nbytes, *args, **kwargs)

    monkeypatch.setattr(v, "record_run", record)
    validate(ValidateConfig(store=str(store_path), profile="cpu-2core", policies="fifo,hebf",
                            budgets="50%,100%", max_new_tokens=2, repeats=3,
                            out=str(tmp_path / "o")))
    warm, rows = log[0], log[1:]
    forward = rows[:4]
    assert [name for name, _ in forward] == ["fifo", "hebf", "fifo", "hebf"]
    assert forward[0][1] < forward[2][1] == warm[1]  # 50% first, then 100% (the warm-up's)
    assert rows == forward + forward[::-1] + forward


def test_validate_rounds_write_each_round_and_pool_them(store_path, tmp_path):
    out = tmp_path / "r"
    result = validate(ValidateConfig(store=str(store_path), profile="cpu-2core",
                                     policies="fifo,hebf", budgets="50%", max_new_tokens=2,
                                     rounds=2, out=str(out)))
    for k in (1, 2):
        assert json.loads((out / f"round-{k}" / "fidelity.json").read_text())["rows"]
    pooled = json.loads((out / "rounds.json").read_text())
    assert pooled["rounds"] == 2 and len(pooled["round_mean_abs_error_pct"]) == 2
    assert [(b["policy"], b["budget"], b["rounds"]) for b in pooled["bias"]] == [
        ("fifo", "50%", 2), ("hebf", "50%", 2)]
    assert result["pooled"]["rounds"] == 2 and "2 rounds pooled" in result["report"]
    with pytest.raises(UserError, match="rounds"):
        validate(ValidateConfig(store=str(store_path), rounds=0, out=str(tmp_path / "z")))
