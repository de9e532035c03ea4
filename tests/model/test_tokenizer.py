"""Text to token ids: bytes for the tiny model, an HF checkpoint's tokenizer.json for any
other, the same in every verb that takes text (`generate`, `run`, `validate`, ...)."""

from __future__ import annotations

import json

import pytest

from d2moe.core.errors import UserError
from d2moe.model.tokenizer import decode, encode, text_codec

tokenizers = pytest.importorskip("tokenizers")

WORDS = ["[UNK]", "def", "fib", "(", ")", ":", "return", "n", "+", "1"]


def _write_tokenizer(directory, words=WORDS) -> dict[str, int]:
    """A word-level tokenizer.json over `words` (ids in order), as `tokenizers` saves one."""
    vocab = {w: i for i, w in enumerate(words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    return vocab


def hf_checkpoint(tmp_path, *, tokenizer: bool = True):
    """A transformers-made 2-layer Mixtral checkpoint of 97 tokens in tmp_path/mixtral, its
    nested store in tmp_path/store, and (`tokenizer`) a word-level tokenizer.json with a word
    for every id: (model dir, store dir, the words by id)."""
    pytest.importorskip("transformers")
    from d2moe.core.sizes import QuantLayout
    from d2moe.quant.cmd import quantize_checkpoint
    from tests.model.test_hf import VOCAB, _hf_model

    model_dir, store = tmp_path / "mixtral", tmp_path / "store"
    _hf_model("mixtral").save_pretrained(model_dir)
    quantize_checkpoint(model_dir, store, QuantLayout(), progress=False)
    words = WORDS + [f"w{i}" for i in range(len(WORDS), VOCAB)]
    if tokenizer:
        _write_tokenizer(model_dir, words)
    return model_dir, store, words


def test_a_byte_vocabulary_is_bytes_whatever_the_directory_holds(tmp_path):
    _write_tokenizer(tmp_path)
    enc, dec = text_codec(tmp_path, 256)
    assert (enc, dec) == (encode, decode)
    assert enc("fib(") == list(b"fib(")


def test_another_vocabulary_reads_the_checkpoints_tokenizer(tmp_path):
    vocab = _write_tokenizer(tmp_path)
    enc, dec = text_codec(str(tmp_path), 97)
    want = [vocab[w] for w in ("def", "fib", "(", "n", ")", ":")]
    assert enc("def fib(n) :") == want
    assert enc(b"def fib(n) :") == want  # bytes (a text file) alike
    assert enc("def lambda") == [vocab["def"], vocab["[UNK]"]]
    assert dec([vocab["return"], vocab["n"]]) == "return n"


def test_a_missing_damaged_or_foreign_tokenizer_is_a_user_error_naming_it(tmp_path):
    path = tmp_path / "tokenizer.json"
    with pytest.raises(UserError, match="no tokenizer.json") as err:
        text_codec(tmp_path, 97)
    assert err.value.path == str(path)
    path.write_text('{"version": "1.0", "model": ')
    with pytest.raises(UserError, match="cannot read the tokenizer") as err:
        text_codec(tmp_path, 97)
    assert err.value.path == str(path)
    _write_tokenizer(tmp_path)  # ids up to 9, for a model of 5 tokens
    enc, _ = text_codec(tmp_path, 5)
    assert enc("def fib") == [1, 2]
    with pytest.raises(UserError, match="token id 9, the model has 5 tokens"):
        enc("def 1")


def test_run_and_generate_encode_an_hf_checkpoints_prompt_with_its_tokenizer(
        tmp_path, capsys, monkeypatch):
    """Before, `d2moe run` fed an HF model the prompt's bytes as token ids (valid ids in a
    large vocabulary, meaning nothing) and decoded its tokens as bytes."""
    import d2moe.model.generate as gen_mod
    from d2moe.cli import main

    model_dir, store, words = hf_checkpoint(tmp_path, tokenizer=False)
    capsys.readouterr()  # transformers' own progress bar
    argv = ["--model", str(model_dir), "--prompt", "def fib(n) :", "--max-new-tokens", "3",
            "--no-progress"]
    run_argv = ["run", "--store", str(store), "--budget", "50%", "--out", str(tmp_path / "o"),
                *argv]
    import d2moe.model.load as load_mod

    def no_load(*args, **kwargs):
        raise AssertionError("the weights loaded before the tokenizer was checked")

    with monkeypatch.context() as m:
        m.setattr(load_mod, "load_model", no_load)
        for verb in (run_argv, ["generate", *argv]):
            assert main(verb) == 2  # no tokenizer.json yet: one line naming it, at once
            err = capsys.readouterr().err
            assert "tokenizer.json" in err and "Traceback" not in err, err
            assert err.count("\n") == 1, err

    vocab = _write_tokenizer(model_dir, words)
    seen: list[list[int]] = []
    original = gen_mod.generate

    def spy(model, prompt_ids, *args, **kwargs):
        seen.append(list(prompt_ids))
        gen = original(model, prompt_ids, *args, **kwargs)
        seen.append(list(gen.new_ids))
        return gen

    monkeypatch.setattr(gen_mod, "generate", spy)
    want = [vocab[w] for w in ("def", "fib", "(", "n", ")", ":")]
    for verb in (run_argv, ["generate", *argv]):
        seen.clear()
        assert main(verb) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        prompt, new = seen
        assert prompt == want, verb[0]
        # decoded with the prompt (a word-level decoder joins words with spaces)
        assert "def fib(n) : " + " ".join(words[i] for i in new) in out, (verb[0], new, out)
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["meta"]["prompt"] == "def fib(n) :"


def test_new_text_keeps_the_space_a_sentencepiece_decoder_drops_from_ids_alone(tmp_path):
    from d2moe.model.tokenizer import continuation

    vocab = {"[UNK]": 0, "\u2581Hello": 1, "\u2581world": 2, "!": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tok.decoder = tokenizers.decoders.Metaspace()
    tok.save(str(tmp_path / "tokenizer.json"))
    enc, dec = text_codec(tmp_path, 97)
    assert dec([2]) == "world"  # alone: the leading space is stripped
    assert continuation(dec, enc("Hello"), [2]) == " world"
    assert continuation(decode, encode("fib("), encode("n)")) == "n)"  # bytes alike
