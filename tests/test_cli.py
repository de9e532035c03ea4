"""The CLI end to end: outputs written, and bad input as one line, exit code 2, no traceback."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from d2moe.cli import build_parser, main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_simulate_writes_every_output(capsys, tmp_path):
    code, out, _ = run(capsys, "simulate", "--model-spec", "llama-moe-3.5b", "--steps", "6",
                       "--policy", "fifo,hebf,johnson", "--budget", "20%", "--out",
                       str(tmp_path))
    assert code == 0
    for name in ("events-fifo.npz", "events-hebf.npz", "events-johnson.npz", "metrics.json",
                 "bubbles.png", "resident.png", "chrome.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["policies"]) == {"fifo", "hebf", "johnson"}
    assert "tok/s" in out and "hebf" in out
    assert (tmp_path / "bubbles.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lean = tmp_path / "lean"  # --no-chrome: all but the Perfetto trace (megabytes)
    assert run(capsys, "simulate", "--model-spec", "tiny", "--steps", "3", "--no-chrome",
               "--out", str(lean))[0] == 0
    assert (lean / "metrics.json").is_file() and not (lean / "chrome.json").exists()


def test_simulate_replays_a_synthesized_trace(capsys, tmp_path):
    trace = tmp_path / "t.npz"
    assert run(capsys, "trace", "synth", "--model-spec", "olmoe-1b-7b", "--prefill-tokens",
               "8", "--decode-steps", "4", "--out", str(trace))[0] == 0
    code, out, _ = run(capsys, "simulate", "--model-spec", "olmoe-1b-7b", "--trace", str(trace),
                       "--profile", "jetson-agx-orin", "--policy", "hebf", "--budget", "1GiB",
                       "--engine", "simpy", "--out", str(tmp_path / "o"))
    assert code == 0 and "5 steps" in out


def test_demo_runs_with_no_arguments(capsys, tmp_path):
    code, out, _ = run(capsys, "demo", "--out", str(tmp_path))
    assert code == 0
    assert "HEBF vs FIFO" in out
    assert (tmp_path / "bubbles.png").exists()
    # the real side: the tiny model on this CPU against the simulator on the shipped profile
    rows = [line.split() for line in out.splitlines() if line.startswith(("fifo ", "hebf "))]
    assert [r[:2] for r in rows if r[1] == "50%"] == [["fifo", "50%"], ["hebf", "50%"]]
    assert (tmp_path / "real" / "timeline-50pct.png").exists()
    # on the shipped profile of a CPU like this one, else cpu-2core, named with both machines
    from d2moe.executor.profile_choice import chosen_profile
    from d2moe.executor.validate import ValidateConfig

    picked = chosen_profile(ValidateConfig(profile="auto", threads=1))
    assert f"measured {picked.name} profile" in out
    assert picked.source.device in out and "--profile measure" in out


def test_every_verb_has_help_for_every_option(capsys):
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices  # noqa: SLF001 (argparse internals)
    for name, sub in verbs.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


def test_simulate_help_names_every_shipped_spec_and_profile():
    from d2moe.core.spec import shipped_specs
    from d2moe.profiles.files import shipped_profiles
    from d2moe.sim.cmd import SimulateConfig

    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(SimulateConfig)}
    assert [s for s in shipped_specs() if s not in helps["model_spec"]] == []
    assert [p for p in shipped_profiles() if p not in helps["profile"]] == []


@pytest.mark.parametrize(("group", "verb"), [("eval", "ppl"), ("model", "train-tiny")])
def test_a_verb_group_without_a_sub_verb_prints_its_help_and_exits_2(capsys, group, verb):
    pytest.importorskip("torch")
    code, out, err = run(capsys, group)
    assert code == 2 and out.startswith(f"usage: d2moe {group} ") and verb in out and not err


def _one_line_error(capsys, *argv: str) -> str:
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unknown_policy(capsys, tmp_path):
    line = _one_line_error(capsys, "simulate", "--policy", "fifo,nope", "--out", str(tmp_path))
    assert "nope" in line and "policy" in line and "choose one of" in line


def test_budget_below_one_expert(capsys, tmp_path):
    line = _one_line_error(capsys, "simulate", "--budget", "1MiB", "--steps", "2",
                           "--out", str(tmp_path))
    assert "budget" in line and "smaller than one expert" in line and "fix" in line


def test_malformed_and_unknown_yaml_keys(capsys, tmp_path):
    bad = tmp_path / "spec.yaml"
    bad.write_text("name: x\nlayers: [1\n")
    assert "malformed YAML" in _one_line_error(capsys, "simulate", "--model-spec", str(bad))
    bad.write_text("name: x\nlayers: 2\nexperts: 4\ntop_k: 2\nhidden: 64\nffn: 128\nheads: 2\n"
                   "kv_heads: 1\nvocab: 16\nexpertz: 3\n")
    line = _one_line_error(capsys, "simulate", "--model-spec", str(bad))
    assert str(bad) in line and "expertz" in line
    prof = tmp_path / "p.yaml"
    prof.write_text("name: p\ndisk: {read_GBps: 1}\n")
    line = _one_line_error(capsys, "simulate", "--profile", str(prof))
    assert str(prof) in line


def test_wrong_trace_version(capsys, tmp_path):
    trace = tmp_path / "t.npz"
    assert run(capsys, "trace", "synth", "--model-spec", "tiny", "--decode-steps", "2",
               "--out", str(trace))[0] == 0
    with np.load(trace) as z:
        arrays = dict(z)
    header = json.loads(str(arrays["header"]))
    header["version"] = 99
    arrays["header"] = np.array(json.dumps(header))
    np.savez(trace, **arrays)
    line = _one_line_error(capsys, "simulate", "--model-spec", "tiny", "--trace", str(trace))
    assert "version" in line and str(trace) in line


def test_trace_of_another_model(capsys, tmp_path):
    trace = tmp_path / "t.npz"
    run(capsys, "trace", "synth", "--model-spec", "tiny", "--decode-steps", "2", "--out",
        str(trace))
    line = _one_line_error(capsys, "simulate", "--model-spec", "mixtral-8x7b", "--trace",
                           str(trace))
    assert str(trace) in line


@pytest.mark.parametrize("budget", ["lots", "12XB"])
def test_unreadable_budget(capsys, tmp_path, budget):
    line = _one_line_error(capsys, "simulate", "--budget", budget, "--out", str(tmp_path))
    assert "budget" in line


def test_out_under_a_file_is_one_line(capsys, tmp_path):
    (tmp_path / "file.yaml").write_text("x")
    out = tmp_path / "file.yaml" / "sub"
    line = _one_line_error(capsys, "simulate", "--model-spec", "tiny", "--profile", "cpu-2core",
                           "--steps", "2", "--out", str(out))
    assert str(out) in line and "not a directory" in line and "fix:" in line


def test_trace_out_onto_a_directory_is_one_line(capsys, tmp_path):
    adir = tmp_path / "adir"
    adir.mkdir()
    line = _one_line_error(capsys, "trace", "synth", "--model-spec", "tiny", "--out", str(adir))
    assert str(adir) in line and "is a directory" in line
    assert [p.name for p in tmp_path.iterdir()] == ["adir"]  # no temp file left beside it


def test_an_unhandled_os_error_is_one_line(capsys, tmp_path, monkeypatch):
    def refuse(path, trace):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("d2moe.traces.cmd.save_trace", refuse)
    out = tmp_path / "t.npz"
    line = _one_line_error(capsys, "trace", "synth", "--model-spec", "tiny", "--out", str(out))
    assert line == (f"d2moe trace synth: error: {out}: Permission denied "
                    "(fix: check the path and its permissions)")


@pytest.mark.parametrize("option,value,field", [
    ("--steps", "-1", "steps"), ("--plot-steps", "-1", "plot-steps"),
    ("--host-cache", "-1", "host-cache"), ("--budget", "inf%", "budget"),
    ("--budget", "1e999", "budget"), ("--group", "0", "group")])
def test_simulate_rejects_bad_numbers(capsys, tmp_path, option, value, field):
    line = _one_line_error(capsys, "simulate", "--model-spec", "tiny", "--profile", "cpu-2core",
                           "--steps", "2", option, value, "--out", str(tmp_path))
    assert f"field '{field}'" in line and "fix:" in line


def test_binary_profile_is_one_line(capsys, tmp_path):
    prof = tmp_path / "p.yaml"
    prof.write_bytes(b"\x00\x85\xff")
    line = _one_line_error(capsys, "simulate", "--model-spec", "tiny", "--profile", str(prof))
    assert str(prof) in line and "not a text file (UTF-8)" in line


def test_profile_checks_its_out_path_before_measuring(capsys, tmp_path, monkeypatch):
    import d2moe.profiles.measure as measure

    def never(*a, **k):
        raise AssertionError("measured before checking --out")

    monkeypatch.setattr(measure, "measure_profile", never)
    (tmp_path / "file").write_text("x")
    line = _one_line_error(capsys, "profile", "--out", str(tmp_path / "file" / "p.yaml"))
    assert "field 'out'" in line and str(tmp_path / "file") in line


@pytest.mark.parametrize("argv", [("simulate", "--group", "abc"), ("simulate", "--budget"),
                                  ("serve", "--max-batch", "nan")])
def test_a_bad_option_value_is_one_line_not_the_usage_block(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "usage:" not in err
    assert err.startswith(f"d2moe {argv[0]}: error: argument {argv[1]}")
    assert "--help" in err or f"goes after '=': {argv[1]}=-5" in err  # (a missing value)


def test_a_negative_value_is_shown_the_spelling_that_takes_it(capsys):
    """argparse takes `--budget -5%` for two options; the fix names `--budget=-5%`."""
    with pytest.raises(SystemExit):
        main(["simulate", "--budget", "-5%"])
    assert "(fix: give it a value; one that starts with '-' goes after '=': --budget=-5)" \
        in capsys.readouterr().err
    code, _, err = run(capsys, "simulate", "--model-spec", "tiny", "--budget=-5%", "--out",
                       "unused")
    assert code == 2 and "field 'budget'" in err, err


def _parsers(parser=None, name="d2moe"):
    """Every (full verb, parser) pair, sub-verbs included (argparse internals)."""
    import argparse

    parser = parser or build_parser()
    yield name, parser
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _options(parser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]  # noqa: SLF001


@pytest.mark.parametrize("verb,rest", [
    ("demo", ()), ("simulate", ()), ("serve", ()), ("sweep", ("grid.yaml",)), ("run", ()),
    ("validate", ()), ("profile", ()), ("trace synth", ()), ("trace record", ()),
    ("quantize", ("--model", "tiny"))])
def test_an_empty_out_is_one_line_and_writes_nothing(capsys, tmp_path, monkeypatch, verb,
                                                      rest):
    monkeypatch.chdir(tmp_path)  # `--out ''` used to write here (demo: below /)
    with pytest.raises(SystemExit) as exc:
        main([*verb.split(), *rest, "--out", ""])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"d2moe {verb}: error: field 'out': must not be empty")
    assert "(fix: pass a path, e.g. --out " in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [("experts", "stats"), ("router", "train"),
                                  ("plot", "budget", "t.jsonl"), ("model", "train-tiny")])
def test_an_empty_out_still_means_the_default_place_where_it_is_the_default(argv):
    args = build_parser().parse_args([*argv, "--out", ""])
    assert args.out == ""


def test_every_verb_and_sub_verb_has_a_description():
    for name, parser in _parsers():
        if name != "d2moe":
            assert parser.description, f"{name} has no description"
            assert not parser.description.startswith("`"), name  # not a module docstring


def test_help_states_each_default_once_and_never_an_empty_one():
    for name, parser in _parsers():
        for action in _options(parser):
            text, flag = action.help or "", f"{name} {action.option_strings[0]}"
            assert "(default: )" not in text, flag
            assert text.count("default:") <= 1, flag
            if action.default == "" and not action.required:  # empty means something
                assert "empty" in text or "default:" in text, flag


def test_string_defaults_with_spaces_or_brackets_are_quoted():
    from d2moe.core.cliargs import default_note

    assert default_note("prompt", "def fib(") == " (default: 'def fib(')"
    assert default_note("p", "a\nb") == " (default: 'a\\nb')"
    assert default_note("budget", "50%") == " (default: 50%%)"  # argparse %-formats help
    assert default_note("out", "") == "" and default_note("n (default: auto)", "x") == ""
    helps = {a.dest: a.help for a in _options(dict(_parsers())["d2moe run"])}
    assert helps["prompt"].endswith("(default: 'def fib(')")


def test_host_cache_help_names_every_form_it_accepts(capsys, tmp_path):
    helps = {a.dest: a.help for a in _options(dict(_parsers())["d2moe simulate"])}
    assert all(w in helps["host_cache"] for w in ("bytes", "percentage", "fraction"))
    code, out, _ = run(capsys, "simulate", "--model-spec", "tiny", "--profile",
                       "rtx3060-laptop", "--steps", "2", "--policy", "fifo", "--host-cache",
                       "100%", "--out",
                       str(tmp_path))
    assert code == 0 and "fifo" in out


def test_train_tiny_warns_that_it_overwrites_the_shipped_checkpoint():
    parser = dict(_parsers())["d2moe model train-tiny"]
    out = next(a for a in _options(parser) if a.dest == "out")
    assert "OVERWRITING the shipped checkpoint" in out.help and "OVERWRITES" in parser.description


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"d2moe {version('d2moe')}"


@pytest.mark.parametrize("verb,unknown", [("simulate", "--budgte 10%"),
                                          ("trace synth", "--nope")])
def test_an_unknown_option_points_at_the_verbs_help(capsys, verb, unknown):
    with pytest.raises(SystemExit) as exc:
        main([*verb.split(), *unknown.split()])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"d2moe {verb}: error: unrecognized arguments: "
                                       f"{unknown} (fix: see d2moe {verb} --help)\n")


def test_simulate_list_aligns_the_descriptions(capsys):
    from d2moe.policies import POLICIES

    code, out, _ = run(capsys, "simulate", "--list")
    lines = out.splitlines()
    assert code == 0 and len(lines) == len(POLICIES.names())
    starts = {line.index(POLICIES.doc(name)) for name, line in zip(POLICIES.names(), lines,
                                                                     strict=True)}
    assert len(starts) == 1 and starts.pop() > max(len(n) for n in POLICIES.names())


def test_errors_name_the_full_sub_verb(capsys, tmp_path):
    line = _one_line_error(capsys, "trace", "info", str(tmp_path / "none.npz"))
    assert line.startswith("d2moe trace info: error: ")


def test_version_falls_back_to_the_package_attribute(monkeypatch):
    import importlib.metadata

    import d2moe
    from d2moe.cli import version

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert version() == d2moe.__version__
