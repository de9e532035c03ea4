"""The shared option helpers of d2moe.core.cliargs."""

from __future__ import annotations

import pytest

from d2moe.core.cliargs import split_list
from d2moe.core.errors import UserError


def test_split_list_strips_and_keeps_order():
    assert split_list(" hebf , fifo", "policy", example="--policy fifo") == ["hebf", "fifo"]
    assert split_list("", "policies", example="--policies fifo", allow_none=True) == []
    assert split_list("0.5,0.5", "capacities", example="x", unique=False) == ["0.5", "0.5"]


@pytest.mark.parametrize("text,what", [("fifo,,hebf", "empty item"), ("fifo,", "empty item"),
                                       (",fifo", "empty item"), ("fifo, ,hebf", "empty item"),
                                       ("fifo,hebf,fifo", "given twice"),
                                       ("fifo, fifo", "given twice"), ("", "nothing given"),
                                       (" ", "nothing given")])
def test_split_list_rejects_empty_and_repeated_items(text, what):
    with pytest.raises(UserError, match=rf"x.yaml: field 'policy': .*{what}.*fix: "):
        split_list(text, "policy", example="--policy fifo,hebf", path="x.yaml")


def test_once_each_names_both_spellings_of_one_value():
    from d2moe.core.cliargs import once_each

    assert once_each([4096, 1 << 20], ["4KiB", "1MiB"], "disk-sizes", example="x") == \
        [4096, 1 << 20]
    with pytest.raises(UserError, match=r"field 'disk-sizes': '4KiB' and '4096' are the same "
                                        r"value, given twice.*fix: name each value once"):
        once_each([1, 4096, 4096], ["1", "4KiB", "4096"], "disk-sizes", example="x")


def test_add_fields_adds_each_alias_to_the_same_field():
    import argparse
    import dataclasses

    from d2moe.core.cliargs import add_fields, from_args

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        batch_size: int = dataclasses.field(default=2, metadata={"aliases": ("--batch",)})
        fast: bool = dataclasses.field(default=True, metadata={"aliases": ("--quick",)})

    parser = argparse.ArgumentParser()
    add_fields(parser, Cfg)
    assert from_args(Cfg, parser.parse_args([])) == Cfg()
    assert from_args(Cfg, parser.parse_args(["--batch", "5", "--no-quick"])) == Cfg(5, False)
    assert from_args(Cfg, parser.parse_args(["--batch-size", "7", "--no-fast"])) == Cfg(7, False)
    assert "--batch-size BATCH_SIZE, --batch BATCH_SIZE" in parser.format_help()


def test_add_fields_choices_and_required_fields():
    """`choices` refuses as argparse does; a field without a default is a required option of
    its annotated type, and a required `out` is checked non-empty with its `example`."""
    import argparse
    import dataclasses

    from d2moe.core.cliargs import add_fields, from_args

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        out: str = dataclasses.field(metadata={"help": "where", "example": "out/x"})
        count: int = dataclasses.field(metadata={"help": "how many"})
        kind: str = dataclasses.field(default="a", metadata={"help": "k", "choices": ("a", "b")})

    class Refusal(Exception):
        pass

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise Refusal(message)

    parser = Parser()
    add_fields(parser, Cfg)
    assert from_args(Cfg, parser.parse_args(["--out", "o", "--count", "3"])) == Cfg("o", 3)
    assert parser.parse_args(["--out", "o", "--count", "3", "--kind", "b"]).kind == "b"
    with pytest.raises(Refusal, match="required: --out, --count"):
        parser.parse_args([])
    with pytest.raises(Refusal, match=r"--kind: invalid choice: 'c' \(choose from 'a', 'b'\)"):
        parser.parse_args(["--out", "o", "--count", "3", "--kind", "c"])
    with pytest.raises(Refusal, match="--count: invalid int value"):
        parser.parse_args(["--out", "o", "--count", "x"])
    with pytest.raises(UserError, match=r"field 'out': must not be empty.*e\.g\. --out out/x"):
        parser.parse_args(["--out", "", "--count", "3"])
    helps = {a.dest: a.help for a in parser._actions}  # noqa: SLF001 (argparse internals)
    assert helps["out"] == "where" and helps["kind"] == "k (default: a)"


def test_model_field_takes_a_verbs_own_wording():
    import dataclasses

    from d2moe.core.cliargs import model_field

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        shared: str = model_field("Mixtral")
        own: str = model_field(help_text="a model", metavar="M")

    shared, own = dataclasses.fields(Cfg)
    assert Cfg() == Cfg("tiny", "tiny")
    assert dict(shared.metadata) == {"help": "`tiny` (built in) or an HF checkpoint directory "
                                             "(Mixtral)"}
    assert dict(own.metadata) == {"help": "a model", "metavar": "M"}


def test_int_ranges_expand_in_order_and_refuse_what_a_typo_would_give():
    from d2moe.core.cliargs import int_ranges

    assert int_ranges("5-8, 2,3", "bits", example="--bits 2-4") == [5, 6, 7, 8, 2, 3]
    assert int_ranges("4-4", "bits", example="--bits 2-4") == [4]
    for text, what in (("2-4,3", "3 is given twice"), ("2-4,4-6", "4 is given twice"),
                       ("4-2", "empty range '4-2'"), ("2,x", "cannot read 'x'"),
                       ("2,,3", "empty item"), ("", "nothing given"), ("-1", "cannot read")):
        with pytest.raises(UserError, match=what) as exc:
            int_ranges(text, "bits", example="--bits 2-4")
        assert exc.value.field == "bits", text


def test_split_list_reads_an_unset_option_as_nothing_not_as_none():
    assert split_list(None, "models", example="--models a", allow_none=True) == []
    with pytest.raises(UserError, match="field 'models': nothing given"):
        split_list(None, "models", example="--models a")
