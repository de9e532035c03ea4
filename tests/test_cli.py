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
    from d2moe.profiles import load_profile

    assert load_profile("cpu-2core").source.device in out and "--profile measure" in out


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
    assert err.startswith(f"d2moe {argv[0]}: error: argument {argv[1]}") and "--help" in err


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


_LIST_OPTIONS = [  # (argv before the list, option, a good value): every comma list a verb takes
    (("simulate", "--steps", "2", "--out", "{out}"), "--policy", "fifo,hebf"),
    (("serve", "--out", "{out}"), "--policy", "fifo,hebf"),
    (("validate", "--out", "{out}"), "--policies", "fifo,hebf"),
    (("validate", "--out", "{out}"), "--budgets", "25%,50%"),
    (("eval", "ppl"), "--format", "mwq,rtn"),
    (("eval", "ppl"), "--bits", "2,3"),
    (("profile", "--out", "{out}"), "--tokens", "1,2"),
    (("profile", "--out", "{out}"), "--disk-sizes", "4KiB,1MiB"),
    (("trace", "synth", "--out", "{out}"), "--bits", "2,3"),
    (("router", "train", "--out", "{out}"), "--bits", "2,4"),
    (("plot", "budget", "table.csv", "--out", "{out}"), "--policies", "fifo,hebf"),
    (("plot", "budget", "table.csv", "--out", "{out}"), "--budgets", "20%,40%"),
]


@pytest.mark.parametrize("head,option,good", _LIST_OPTIONS)
@pytest.mark.parametrize("bad", ["{a},,{b}", "{a},{b},", "{a},{a}"])
def test_comma_lists_reject_empty_and_repeated_items(capsys, tmp_path, head, option, good, bad):
    """One splitter for every verb: no list silently drops an empty item or runs one twice."""
    a, b = good.split(",")
    argv = [h.format(out=tmp_path / "out") for h in head]
    line = _one_line_error(capsys, *argv, option, bad.format(a=a, b=b))
    assert f"field '{option[2:]}'" in line
    assert ("given twice" if bad == "{a},{a}" else "empty item") in line


@pytest.mark.parametrize("head,option,bad", [
    (("trace", "synth", "--out", "{out}"), "--bits", "2,02"),
    (("eval", "ppl"), "--bits", "2,02"),
    (("router", "train", "--out", "{out}"), "--bits", "2,4,04"),
    (("profile", "--out", "{out}"), "--tokens", "1,01"),
    (("validate", "--out", "{out}"), "--budgets", "50%,50.0%"),
])
def test_numeric_lists_reject_one_value_written_twice(capsys, tmp_path, head, option, bad):
    """'2,02' names the value 2 twice, though not the same text."""
    argv = [h.format(out=tmp_path / "out") for h in head]
    line = _one_line_error(capsys, *argv, option, bad)
    assert f"field '{option[2:]}'" in line and "given twice" in line


def test_simulate_budget_1_5_suggests_150_percent_not_1_byte(capsys, tmp_path):
    line = _one_line_error(capsys, "simulate", "--budget", "1.5", "--steps", "2",
                           "--out", str(tmp_path))
    assert "field 'budget'" in line and "150%" in line and "1 B" not in line


@pytest.mark.parametrize("argv,fix", [(("--store-bits", "3:8"), "2:8"),
                                      (("--store-bits", "2:3"), "2:4"),
                                      (("--b1", "3"), "2:8"), (("--bK", "3"), "2:4")])
def test_simulate_refuses_trace_bits_outside_the_stored_range_alike(capsys, tmp_path, argv,
                                                                    fix):
    """A trace of 2..4-bit experts fits neither a store from 3 bits nor one up to 3 bits;
    the older --b1/--bK are told the one spelling, --store-bits."""
    trace = tmp_path / "t.npz"
    assert run(capsys, "trace", "synth", "--model-spec", "tiny", "--bits", "2,3,4",
               "--decode-steps", "2", "--out", str(trace))[0] == 0
    line = _one_line_error(capsys, "simulate", "--model-spec", "tiny", "--trace", str(trace),
                           "--profile", "cpu-2core", *argv, "--out",
                           str(tmp_path / "o"))
    assert "field 'store-bits'" in line and "2..4-bit experts" in line
    assert f"fix: pass --store-bits {fix}," in line and not (tmp_path / "o").exists()
    assert "--b1" not in line and "--bK" not in line


def test_simulate_sends_a_16_bit_trace_to_the_dense_layout(capsys, tmp_path):
    """No --store-bits range holds 16 bits: the fix names --layout dense instead."""
    trace = tmp_path / "t.npz"
    assert run(capsys, "trace", "synth", "--model-spec", "tiny", "--bits", "4,16",
               "--capacities", "0.5,0.5", "--decode-steps", "2", "--out", str(trace))[0] == 0
    line = _one_line_error(capsys, "simulate", "--model-spec", "tiny", "--trace", str(trace),
                           "--profile", "cpu-2core", "--out", str(tmp_path / "o"))
    assert "4..16-bit experts" in line and "fix: pass --layout dense" in line
    assert "--store-bits 2:16" not in line


@pytest.mark.parametrize("argv,field,fix", [
    (("simulate", "--b1", "5", "--bK", "3"), "store-bits", "--store-bits 2:8"),
    (("simulate", "--store-bits", "5:3"), "store-bits", "--store-bits 2:8"),
    (("profile", "--b1", "5", "--bK", "2"), "store-bits", "--store-bits 2:8"),
    (("profile", "--store-bits", "5:2"), "store-bits", "--store-bits 2:8"),
    (("simulate", "--layout", "foo"), "layout", "use mwq, bitplane"),
    (("eval", "ppl", "--store-bits", "9:2"), "store-bits", "--store-bits 2:8"),
    (("quantize", "--model", "tiny", "--bits", "9:2"), "store-bits", "--store-bits 2:8")])
def test_layout_errors_name_the_verbs_own_options(capsys, tmp_path, argv, field, fix):
    out = () if argv[0] == "eval" else ("--out", str(tmp_path / "o"))
    line = _one_line_error(capsys, *argv, *out)
    assert f"field '{field}'" in line and fix in line
    assert "--bits" not in line or field == "bits"
    assert "--b1" not in line and "--bK" not in line


def _exit_2(capsys, *argv: str) -> str:
    """The one error line of a command refused with exit 2, while parsing (SystemExit) or
    while running (main's return)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize("verb,config", [("simulate", "d2moe.sim.cmd:SimulateConfig"),
                                         ("profile", "d2moe.profiles.measure:ProfileConfig")])
def test_store_bits_and_the_older_b1_bk_give_the_same_config(verb, config):
    import importlib

    from d2moe.core.cliargs import from_args
    from d2moe.core.sizes import QuantLayout

    module, name = config.split(":")
    cls = getattr(importlib.import_module(module), name)
    parse = build_parser().parse_args
    assert from_args(cls, parse([verb])) == cls()
    assert cls().quant_layout == QuantLayout()
    new = from_args(cls, parse([verb, "--store-bits", "3:6"]))
    for old in (["--b1", "3", "--bK", "6"], ["--bK", "6", "--b1", "3"],
                ["--store-bits", "3:6", "--b1", "3"], ["--bK", "6", "--store-bits", "3:6"],
                ["--store-bits", "2:2", "--store-bits", "3:6"]):  # the last one wins
        assert from_args(cls, parse([verb, *old])) == new, old
    assert (new.b1, new.bK) == (3, 6) and new == dataclasses.replace(cls(), b1=3, bK=6)
    assert new.quant_layout == QuantLayout(b1=3, bK=6)
    assert from_args(cls, parse([verb, "--b1", "3"])) == dataclasses.replace(cls(), b1=3)


@pytest.mark.parametrize("verb", ["simulate", "profile"])
@pytest.mark.parametrize("argv,first,second", [
    (("--store-bits", "3:6", "--b1", "2"), "--store-bits gives b1 3", "--b1 gives 2"),
    (("--bK", "8", "--store-bits", "3:6"), "--bK gives bK 8", "--store-bits gives 6")])
def test_store_bits_and_b1_bk_disagreeing_are_refused(capsys, tmp_path, verb, argv, first,
                                                      second):
    line = _exit_2(capsys, verb, *argv, "--out", str(tmp_path / "o"))
    assert line.startswith(f"d2moe {verb}: error: field 'store-bits': {first}, {second}")
    assert "fix: give the range once: --store-bits B1:BK" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("verb", ["simulate", "profile"])
@pytest.mark.parametrize("value,what", [("x", "cannot read 'x' as a bit range"),
                                        ("3", "cannot read '3' as a bit range"),
                                        ("5:3", "need 1 <= b1 <= bK <= 8"),
                                        ("0:4", "need 1 <= b1 <= bK <= 8"),
                                        ("2:9", "need 1 <= b1 <= bK <= 8")])
def test_a_bad_store_bits_range_names_store_bits(capsys, tmp_path, verb, value, what):
    line = _exit_2(capsys, verb, "--store-bits", value, "--model-spec", "tiny", "--out",
                   str(tmp_path / "o"))
    assert f"field 'store-bits': {what}" in line and "(fix: " in line
    assert "--store-bits" in line.split("(fix: ")[1] and not (tmp_path / "o").exists()


def test_every_verb_with_a_stored_range_takes_store_bits():
    """One spelling of the stored bit range: a verb with the older --b1/--bK has
    --store-bits too (quantize's older --bits is an alias of it)."""
    verbs = set()
    for name, parser in _parsers():
        flags = {f for a in _options(parser) for f in a.option_strings}
        if flags & {"--b1", "--bK"}:
            assert "--store-bits" in flags, name
        if "--store-bits" in flags:
            verbs.add(name)
    assert {"d2moe simulate", "d2moe profile", "d2moe quantize", "d2moe eval ppl"} <= verbs


@pytest.mark.parametrize("verb", [("run",), ("serve", "--backend", "real"), ("quantize",),
                                  ("generate",), ("router", "train"), ("experts", "stats")])
@pytest.mark.parametrize("model,what", [("nope", "nope: field 'model': no such directory"),
                                        ("", "field 'model': no model given"),
                                        ("{tmp}", "field 'model': no config.json in this "
                                                  "directory"),
                                        ("{tmp}/f", "field 'model': is a file")])
def test_a_bad_model_is_named_before_any_store_or_spec(capsys, tmp_path, verb, model, what):
    (tmp_path / "f").write_text("x")
    model = model.format(tmp=tmp_path)
    out = () if verb[0] == "generate" else ("--out", str(tmp_path / "o"))
    line = _one_line_error(capsys, *verb, "--model", model, *out)
    assert what.format(tmp=tmp_path) in line
    assert "store" not in line.split("(fix:")[0] and "spec YAML" not in line
    assert "--model  " not in line  # no command with an empty model in the fix


# a thing several verbs take has the name most of them give it; a verb's own older spelling
# stays as an alias (scripts keep working)
COMMON_NAMES = {"--batch-size": "--batch", "--ctx-len": "--ctx", "--capacity": "--capacities",
                "--train-kb": "--train-kib", "--heldout-kb": "--heldout-kib"}


def test_one_thing_has_its_common_name_in_every_verb():
    for name, parser in _parsers():
        for action in _options(parser):
            for own, common in COMMON_NAMES.items():
                if own in action.option_strings:
                    assert common in action.option_strings, f"{name} {own}"


@pytest.mark.parametrize("verb,own,common", [
    ("model train-tiny", ["--batch-size", "3", "--ctx-len", "40", "--train-kb", "9",
                          "--heldout-kb", "2"],
     ["--batch", "3", "--ctx", "40", "--train-kib", "9", "--heldout-kib", "2"]),
    ("router train", ["--capacity", "0.5,0.5"], ["--capacities", "0.5,0.5"]),
    ("quantize --model tiny --out s", ["--bits", "3:5"], ["--store-bits", "3:5"])])
def test_aliases_parse_to_the_same_options(verb, own, common):
    def parse(argv: list[str]) -> dict:  # the options, not the parser's own bookkeeping
        return {k: v for k, v in vars(build_parser().parse_args(argv)).items()
                if not k.startswith("_")}

    a, b = parse([*verb.split(), *own]), parse([*verb.split(), *common])
    assert a == b and a != parse(verb.split())


@pytest.mark.parametrize("verb,first,second", [
    ("quantize --model tiny", ["--bits", "2:6"], ["--store-bits", "3:6"]),
    ("model train-tiny", ["--batch", "3"], ["--batch-size", "4"]),
    ("router train", ["--capacities", "0.5,0.5"], ["--capacity", "0.4,0.6"])])
def test_two_spellings_of_one_option_must_agree(capsys, tmp_path, verb, first, second):
    """An option and its alias giving different values is refused, whichever comes first;
    the same value under both is accepted."""
    out = ["--out", str(tmp_path / "o")] if verb.startswith("quantize") else []
    for argv in ([*first, *second], [*second, *first]):
        line = _exit_2(capsys, *verb.split(), *argv, *out)
        assert first[0] in line and second[0] in line and "(fix: give --" in line
    same = [*first, second[0], first[1]]
    parsed = build_parser().parse_args([*verb.split(), *same, *out])
    assert first[1] in str(vars(parsed))


@pytest.mark.parametrize("verb,config,required", [
    ("trace record", "d2moe.traces.cmd:RecordConfig", {}),
    ("model info", "d2moe.model.cmd:InfoConfig", {}),
    ("generate", "d2moe.model.cmd:GenerateConfig", {}),
    ("quantize", "d2moe.quant.cmd:QuantizeConfig", {"model": "tiny", "out": "s"}),
    ("demo", "d2moe.demo:DemoConfig", {})])
def test_a_verb_built_from_its_config_parses_to_its_defaults_and_every_option(verb, config,
                                                                              required):
    """No options give the config's defaults; each spelling of each option (aliases, --no-x,
    quantize's hidden --quiet) sets its own field and no other."""
    import argparse
    import importlib

    from d2moe.core.cliargs import from_args

    module, name = config.split(":")
    cls = getattr(importlib.import_module(module), name)
    head = [*verb.split(), *(x for k, v in required.items() for x in (f"--{k}", v))]
    parse = build_parser().parse_args
    default = cls(**required)
    assert from_args(cls, parse(head)) == default
    seen = set()
    for action in _options(dict(_parsers())[f"d2moe {verb}"]):
        for flag in action.option_strings:
            now = getattr(default, action.dest)
            if isinstance(action, argparse.BooleanOptionalAction):
                argv, value = [flag], not flag.startswith("--no-")
            elif action.nargs == 0:  # --quiet: the earlier --no-progress
                argv, value = [flag], action.const
            else:
                value = ([c for c in action.choices if c != now][0] if action.choices
                         else now + 1 if isinstance(now, int) else f"{now}x")
                argv = [flag, str(value)]
            got = from_args(cls, parse([*head, *argv]))
            assert got == dataclasses.replace(default, **{action.dest: value}), flag
            seen.add(action.dest)
    assert seen == {f.name for f in dataclasses.fields(cls)}


def test_converted_verbs_take_their_defaults_from_the_dataclass_that_owns_them():
    from d2moe.core.sizes import QuantLayout, layout_from_options
    from d2moe.executor.cmd import RunConfig
    from d2moe.model.cmd import GenerateConfig
    from d2moe.quant.cmd import QuantizeConfig, parse_bits_range
    from d2moe.traces.cmd import RecordConfig
    from d2moe.traces.synth import SynthConfig

    q = QuantizeConfig(model="tiny", out="s")
    assert layout_from_options(q.format, *parse_bits_range(q.store_bits), q.group) == QuantLayout()
    g, r = GenerateConfig(), RunConfig()
    assert (g.prompt, g.max_new_tokens) == (r.prompt, r.max_new_tokens)
    rec, syn = RecordConfig(), SynthConfig()
    assert (rec.prefill_tokens, rec.decode_steps) == (syn.prefill_tokens, syn.decode_steps)


def test_python_dash_m_runs_the_cli():
    """`python -m d2moe` is the same command: a user error gives its exit code 2, one line."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "d2moe", "simulate", "--policy", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "unknown policy 'nope'" in done.stderr and "Traceback" not in done.stderr
