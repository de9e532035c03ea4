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
