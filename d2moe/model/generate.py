"""Greedy generation with a KV cache: one prefill, then one-token decode steps."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from d2moe.core.errors import UserError
from d2moe.model.moe import ExpertBackend, RouterObserver
from d2moe.model.transformer import Transformer


@dataclass(frozen=True)
class Generation:
    """New token ids and the wall time of the prefill and of the decode steps."""

    prompt_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    prefill_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second (the first new token comes from the prefill)."""
        steps = len(self.new_ids) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, *,
             backend: ExpertBackend | None = None, observer: RouterObserver | None = None,
             stop_id: int | None = None) -> Generation:
    """Greedy decoding of up to `max_new_tokens` tokens after `prompt_ids` (batch of one)."""
    if not prompt_ids:
        raise UserError("the prompt is empty", field="prompt", fix="give at least one token")
    if max_new_tokens <= 0:
        raise UserError("must be positive", field="max-new-tokens", fix="pass e.g. 64")
    model.eval()
    device = next(model.parameters()).device
    cache = model.new_cache(batch=1, max_len=len(prompt_ids) + max_new_tokens)
    new: list[int] = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(torch.tensor([prompt_ids], device=device), cache, backend=backend,
                       observer=observer, last_only=True)  # [1, 1, V]
        nxt = int(logits[0, -1].argmax())
        new.append(nxt)
        t1 = time.perf_counter()
        while len(new) < max_new_tokens and nxt != stop_id:
            logits = model(torch.tensor([[nxt]], device=device), cache, backend=backend,
                           observer=observer)  # [1, 1, V]
            nxt = int(logits[0, -1].argmax())
            new.append(nxt)
        t2 = time.perf_counter()
    return Generation(prompt_ids=tuple(prompt_ids), new_ids=tuple(new), prefill_s=t1 - t0,
                      decode_s=t2 - t1)
