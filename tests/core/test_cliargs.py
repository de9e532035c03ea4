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
