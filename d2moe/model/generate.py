"""Greedy generation with a KV cache: one prefill, then one-token decode steps."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from d2moe.core.errors import UserError
from d2moe.core.progress import progress_bar
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


PROGRESS_DELAY_S = 1.0  # a generation's bar shows once it has run this long


def max_positions(model: Any) -> int:
    """The longest sequence `model` was made for (its HF config's `max_position_embeddings`;
    0: none recorded)."""
    return int(getattr(getattr(model, "cfg", None), "max_positions", 0) or 0)


def check_window(model: Any, ctx: int, *, field: str = "ctx") -> None:
    """Refuse scoring windows of `ctx` tokens longer than the model's maximum positions
    (perplexity, calibration): past it the model's outputs mean nothing."""
    limit = max_positions(model)
    if limit and ctx > limit:
        raise UserError(f"windows of {ctx} tokens exceed the model's maximum of {limit} "
                        "positions (max_position_embeddings)", field=field,
                        fix=f"pass --{field} {limit} or less")


def check_positions(model: Any, prompt_tokens: int, new_tokens: int, *,
                    field: str = "max-new-tokens") -> None:
    """Refuse a sequence longer than the model's maximum positions (its HF config's
    `max_position_embeddings`; no limit when it has none): past it a model was never
    trained and its output means nothing. `field` is the option that sets `new_tokens`."""
    limit = max_positions(model)
    if not limit or prompt_tokens + new_tokens <= limit:
        return
    room = limit - prompt_tokens
    fix = (f"pass --{field} {room} or less" if room > 0 else
           f"shorten the prompt to under {limit} tokens")
    raise UserError(f"{prompt_tokens} prompt + {new_tokens} new tokens exceed the model's "
                    f"maximum of {limit} positions (max_position_embeddings)", field=field,
                    fix=fix)


def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, *,
             backend: ExpertBackend | None = None, observer: RouterObserver | None = None,
             stop_id: int | None = None, progress: bool = False) -> Generation:
    """Greedy decoding of up to `max_new_tokens` tokens after `prompt_ids` (batch of one),
    at most the model's maximum positions in all (`check_positions`). With `progress`, a
    bar of new tokens on a terminal once the generation runs past `PROGRESS_DELAY_S`."""
    if not prompt_ids:
        raise UserError("the prompt is empty", field="prompt", fix="give at least one token")
    if max_new_tokens <= 0:
        raise UserError("must be positive", field="max-new-tokens", fix="pass e.g. 64")
    check_positions(model, len(prompt_ids), max_new_tokens)
    bar = progress_bar(max_new_tokens, progress, "generate", "tok", delay_s=PROGRESS_DELAY_S)
    try:
        return _generate(model, prompt_ids, max_new_tokens, backend, observer, stop_id, bar)
    finally:
        if bar:
            bar.close()


def _generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int,
              backend: ExpertBackend | None, observer: RouterObserver | None,
              stop_id: int | None, bar: Any) -> Generation:
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
        if bar:
            bar.update(1)
        while len(new) < max_new_tokens and nxt != stop_id:
            logits = model(torch.tensor([[nxt]], device=device), cache, backend=backend,
                           observer=observer)  # [1, 1, V]
            nxt = int(logits[0, -1].argmax())
            new.append(nxt)
            if bar:
                bar.update(1)
        t2 = time.perf_counter()
    return Generation(prompt_ids=tuple(prompt_ids), new_ids=tuple(new), prefill_s=t1 - t0,
                      decode_s=t2 - t1)
