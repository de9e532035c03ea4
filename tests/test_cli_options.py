"""The CLI's options across verbs: comma lists, bit ranges, layouts, aliases and spellings of
one option, and each verb's parser against the dataclass it is built from."""

from __future__ import annotations

import dataclasses

import pytest

from d2moe.cli import build_parser, main
from tests.test_cli import _one_line_error, _options, _parsers, run

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
