"""`d2moe experts stats` through the CLI: where it may write, and what it prints."""

from __future__ import annotations

from pathlib import Path

from d2moe.cli import main
from d2moe.core.spec import load_spec
from d2moe.experts.cmd import summarize, summary_table
from d2moe.policies.stats import ExpertStats
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


STATS = ExpertStats(  # 2 layers x 3 experts, a negative mean similarity in layer 1
    importance=((0.2, 1.0, 0.5), (1.0, 0.25, 0.75)),
    similarity=(((1.0, 0.4, 0.1), (0.4, 1.0, 0.7), (0.1, 0.7, 1.0)),
                ((1.0, -0.3, -0.2), (-0.3, 1.0, 0.1), (-0.2, 0.1, 1.0))),
    source="test")


def test_the_terminal_summary_is_a_plain_table_with_the_same_cells() -> None:
    title, header, rule, *rows = summary_table(STATS).splitlines()
    assert title == "expert statistics (test): 2 layers x 3 experts"
    assert "|" not in summary_table(STATS)
    assert header.split("  ") == ["layer", "most important", "least important",
                                  "mean similarity (off-diagonal)", "most similar pair"]
    assert set(rule) == {"-", " "} and len(rule.split()) == 5
    assert rows == [
        "    0  1 (1.000)       0 (0.200)         0.400                          1~2 (0.700)",
        "    1  0 (1.000)       1 (0.250)        -0.133                          1~2 (0.100)"]


def test_the_markdown_summary_for_benchmark_records_is_unchanged() -> None:
    assert summarize(STATS) == (
        "expert statistics (test): 2 layers x 3 experts\n"
        "| layer | most important | least important | mean similarity (off-diagonal) "
        "| most similar pair |\n|---|---|---|---|---|\n"
        "| 0 | 1 (1.000) | 0 (0.200) | 0.400 | 1~2 (0.700) |\n"
        "| 1 | 0 (1.000) | 1 (0.250) | -0.133 | 1~2 (0.100) |")


def test_the_command_prints_the_plain_table(tmp_path: Path, capsys) -> None:
    trace = tmp_path / "t.npz"
    save_trace(trace, synth_trace(load_spec("tiny"), SynthConfig(decode_steps=3)))
    assert main(["experts", "stats", "--trace", str(trace)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("expert statistics (trace-routing (proxy)): 4 layers x 8 experts")
    assert lines[1].startswith("layer  most important") and set(lines[2]) == {"-", " "}
    assert [line.split()[0] for line in lines[3:7]] == ["0", "1", "2", "3"]
    assert not any("|" in line for line in lines[:7])
    assert lines[7] == f"wrote {tmp_path / 't.expert_stats.json'}"
