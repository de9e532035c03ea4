"""Generation's limits and progress: the model's maximum positions, a bar of new tokens."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from d2moe.cli import main  # noqa: E402
from d2moe.core.errors import UserError  # noqa: E402
from d2moe.model import generate as gen_module  # noqa: E402
from d2moe.model.generate import check_positions, generate  # noqa: E402
from d2moe.model.load import load_tiny  # noqa: E402
from d2moe.model.tokenizer import encode  # noqa: E402
from tests.conftest import CountingBar  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()[0]


def test_prompt_and_new_tokens_stay_within_the_models_positions(tiny) -> None:
    assert tiny.cfg.max_positions == 4096  # the tiny config.json's max_position_embeddings
    check_positions(tiny, 8, 4088)  # exactly the limit
    with pytest.raises(UserError) as err:
        generate(tiny, encode("def fib("), 4200)  # ran on past 4096 before
    assert err.value.field == "max-new-tokens"
    assert "4096" in str(err.value) and "--max-new-tokens 4088 or less" in str(err.value)
    with pytest.raises(UserError, match="shorten the prompt") as err:
        check_positions(tiny, 5000, 1, field="output-tokens")
    assert err.value.field == "output-tokens"


def test_scoring_windows_stay_within_the_models_positions(tiny, capsys) -> None:
    from d2moe.model.perplexity import perplexity

    ids = list(encode("x" * 9000))
    with pytest.raises(UserError) as err:
        perplexity(tiny, ids, ctx=4097, batch=1)  # scored past 4096 positions before
    assert err.value.field == "ctx" and "--ctx 4096 or less" in str(err.value)
    assert main(["eval", "ppl", "--ctx", "5000", "--format", "fp"]) == 2
    assert "--ctx 4096 or less" in capsys.readouterr().err


def test_a_generation_advances_its_bar_by_each_new_token(tiny, monkeypatch) -> None:
    calls, bar = [], CountingBar()

    def counting_bar(total: int, enabled: bool, desc: str, unit: str, **kw: float) -> CountingBar:
        calls.append((total, enabled))
        return bar if enabled else None

    monkeypatch.setattr(gen_module, "progress_bar", counting_bar)
    got = generate(tiny, encode("def fib("), 5, progress=True)
    assert calls == [(5, True)] and bar.n == len(got.new_ids) == 5 and bar.closed
    generate(tiny, encode("def fib("), 2)  # no bar unless asked (library callers)
    assert calls[-1] == (2, False)


def test_the_generate_cli_names_the_limit_in_one_line(capsys) -> None:
    assert main(["generate", "--max-new-tokens", "4200", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "field 'max-new-tokens'" in err and "4096" in err
