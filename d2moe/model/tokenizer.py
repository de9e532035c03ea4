"""Text <-> token ids: byte-level for the tiny model (token id = byte value, vocabulary 256,
UTF-8 text); an HF checkpoint's own `tokenizer.json` for every other model (`text_codec`)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from d2moe.core.errors import UserError

VOCAB = 256

Encode = Callable[[str | bytes], list[int]]
Decode = Callable[[list[int]], str]


def encode(text: str | bytes) -> list[int]:
    """Text (UTF-8 encoded) or raw bytes -> token ids 0..255. Bytes that are not UTF-8 and
    reached a str as surrogates (a command-line argument) become those bytes again."""
    return list(text.encode("utf-8", errors="surrogateescape") if isinstance(text, str)
                else bytes(text))


def decode(ids: list[int]) -> str:
    """Token ids -> text; byte sequences that are not valid UTF-8 become U+FFFD."""
    return bytes(ids).decode("utf-8", errors="replace")


def text_codec(model_ref: str | Path, vocab: int) -> tuple[Encode, Decode]:
    """(encode, decode) for a model of `vocab` tokens: the byte-level pair above for a byte
    vocabulary (tiny), else the checkpoint directory's tokenizer.json through the
    `tokenizers` package. Byte ids in a model of another vocabulary would run, and mean
    nothing: a model without a tokenizer.json is a UserError naming the file."""
    if vocab == VOCAB:
        return encode, decode
    path = Path(model_ref) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"this model's vocabulary is {vocab} tokens, not bytes, and its "
                        "directory has no tokenizer.json", path=str(path),
                        fix="copy the checkpoint's tokenizer.json into the model directory")
    if importlib.util.find_spec("tokenizers") is None:
        raise UserError("reading tokenizer.json needs the `tokenizers` package",
                        path=str(path), fix="pip install tokenizers")
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust library's own error type, whatever the damage
        raise UserError(f"cannot read the tokenizer: {str(exc).splitlines()[0][:200]}",
                        path=str(path), fix="copy the checkpoint's own tokenizer.json "
                        "again") from None

    def hf_encode(text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = tok.encode(text).ids
        if ids and max(ids) >= vocab:
            raise UserError(f"the tokenizer gives token id {max(ids)}, the model has "
                            f"{vocab} tokens", path=str(path),
                            fix="use the tokenizer.json of this checkpoint")
        return ids

    return hf_encode, lambda ids: tok.decode(list(ids))


def model_codec(model_ref: str | Path) -> tuple[Encode, Decode]:
    """`text_codec` of a model named as `--model` takes it (`tiny` or a checkpoint
    directory), from its config.json alone: a missing tokenizer.json is named before the
    weights load (tens of seconds for a large model)."""
    from d2moe.core.spec import load_spec
    from d2moe.model.load import check_model_ref

    return text_codec(model_ref, load_spec(check_model_ref(model_ref)).vocab)


def continuation(decode: Callable[[list[int]], str], prompt_ids: list[int],
                 new_ids: list[int] | tuple[int, ...]) -> str:
    """The text `new_ids` add after `prompt_ids`: decoded with the prompt and cut after the
    prompt's own text, since a SentencePiece-style decoder drops the leading space of ids
    decoded alone ('Hello' + decode([' world']) would print 'Helloworld')."""
    head, whole = decode(list(prompt_ids)), decode([*prompt_ids, *new_ids])
    return whole[len(head):] if whole.startswith(head) else decode(list(new_ids))
