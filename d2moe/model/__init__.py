"""A compact Mixtral-family MoE transformer, HF safetensors loading, the tiny built-in model.

Public API (imported lazily, so `import d2moe.model` and the CLI stay light; torch is needed
only when a name is used):

- `Transformer(spec, cfg)`, `ModelConfig`, `KVCache`            the model
- `ExpertBackend`, `DenseExperts`, `RouterObserver`, `route`    the expert seam
- `load_hf(dir)`, `save_hf(model, dir)`, `load_tiny()`, `load_model(ref)`
- `perplexity(model, bytes, backend=...)`, `unigram_perplexity(train, heldout)`
- `generate(model, prompt_ids, max_new_tokens, backend=..., observer=...)`
- `encode(text)`, `decode(ids)`                                 byte-level tokenizer
- `text_codec(dir, vocab)`            (encode, decode): bytes, or the checkpoint's tokenizer
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Transformer": "transformer", "ModelConfig": "config", "KVCache": "attention",
    "ExpertBackend": "moe", "DenseExperts": "moe", "RouterObserver": "moe", "route": "moe",
    "load_hf": "hf", "save_hf": "hf", "load_tiny": "load", "load_model": "load",
    "tiny_dir": "load", "perplexity": "perplexity", "unigram_perplexity": "perplexity",
    "generate": "generate", "encode": "tokenizer", "decode": "tokenizer", "text_codec": "tokenizer",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    """Import the public names on first use (PEP 562)."""
    if name not in _WHERE:
        raise AttributeError(f"module 'd2moe.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"d2moe.model.{_WHERE[name]}"), name)
