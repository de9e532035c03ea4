"""Byte-level tokenizer: token id = byte value (vocabulary 256), UTF-8 text."""

from __future__ import annotations

VOCAB = 256


def encode(text: str | bytes) -> list[int]:
    """Text (UTF-8 encoded) or raw bytes -> token ids 0..255. Bytes that are not UTF-8 and
    reached a str as surrogates (a command-line argument) become those bytes again."""
    return list(text.encode("utf-8", errors="surrogateescape") if isinstance(text, str)
                else bytes(text))


def decode(ids: list[int]) -> str:
    """Token ids -> text; byte sequences that are not valid UTF-8 become U+FFFD."""
    return bytes(ids).decode("utf-8", errors="replace")
