"""Record a trace from a real model's routing: one prefill step, then teacher-forced decode
steps over the text that follows, with every layer's top-k ids and router weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from d2moe.core.errors import UserError
from d2moe.traces.schema import DECODE, PREFILL, Trace


def record_trace(model: Any, spec: Any, token_ids: list[int], *, prefill_tokens: int,
                 decode_steps: int, bits: int = 0, source: str = "", backend: Any = None,
                 token_bits: Callable[[], Any] | None = None,
                 token_prefs: Callable[[], Any] | None = None,
                 router_config: dict | None = None) -> Trace:
    """Run `model` on `token_ids`: `prefill_tokens` at once, then `decode_steps` single
    tokens through the KV cache; `bits` > 0 labels every slot with that bit-width.

    `backend` runs the experts (default: the model's own); `token_bits()`, called after each
    forward, gives that forward's bits [T, L] (the bit-width router's live choices), which
    label every slot of the token in that layer, or [T, L, k] (a per-slot router).
    `token_prefs()` gives the router's gate probabilities [T, L, k, K] of that forward: the
    trace's `prefs`, with `router_config` (`BitRouter.describe()`) in its meta, so the
    simulator can re-place them under other capacities (docs/formats.md)."""
    import torch

    from d2moe.model.generate import check_positions

    if prefill_tokens < 1:
        raise UserError("need at least one prefill token", field="prefill-tokens",
                        fix="pass --prefill-tokens 1 or more")
    need = prefill_tokens + decode_steps
    check_positions(model, prefill_tokens, decode_steps, field="decode-steps")
    if len(token_ids) < need:
        raise UserError(f"the text has {len(token_ids)} tokens, {need} are needed",
                        field="text", fix="give a longer text or fewer steps")
    layers: list[tuple[np.ndarray, np.ndarray]] = []

    def observe(layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        layers.append((ids.cpu().numpy().astype(np.int16),
                       weights.float().cpu().numpy().astype(np.float32)))

    device = next(model.parameters()).device
    cache = model.new_cache(batch=1, max_len=need)
    steps = []
    prefs: list[np.ndarray] = []  # per step [T, L, k, K]
    model.eval()
    with torch.inference_mode():
        chunks = [token_ids[:prefill_tokens]] + [[t] for t in token_ids[prefill_tokens:need]]
        for i, chunk in enumerate(chunks):
            layers.clear()
            model(torch.tensor([chunk], device=device), cache, backend=backend,
                  observer=observe, last_only=True)  # (the logits are not read)
            experts = np.stack([ids for ids, _ in layers], axis=1)  # [T, L, k]
            weights = np.stack([w for _, w in layers], axis=1)  # [T, L, k]
            b = np.full(experts.shape, bits, np.int8) if bits else None
            if token_bits is not None:  # [T, L, k], or [T, L]: every slot of the token
                tb = np.asarray(token_bits(), dtype=np.int8)
                b = np.broadcast_to(tb if tb.ndim == 3 else tb[:, :, None], experts.shape).copy()
            if token_prefs is not None:
                prefs.append(np.asarray(token_prefs(), dtype=np.float32))
            steps.append((PREFILL if i == 0 else DECODE, experts, weights, b))
    meta = {"source": "record", "model": spec.name, "text": source,
            "prefill_tokens": prefill_tokens, "decode_steps": decode_steps, "bits": bits}
    if router_config is not None:
        meta["router_config"] = dict(router_config)
    return Trace.from_steps(spec.name, spec.experts, steps, meta,
                            prefs=np.concatenate(prefs) if prefs else None)
