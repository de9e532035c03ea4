"""Per-byte perplexity of a model on a byte string, and the unigram-byte baseline."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from d2moe.core.errors import UserError
from d2moe.model.generate import check_window
from d2moe.model.moe import ExpertBackend
from d2moe.model.transformer import Transformer


@dataclass(frozen=True)
class Perplexity:
    """exp(mean negative log-likelihood in nats) over `tokens_scored` predicted tokens."""

    ppl: float
    nll_nats: float
    tokens_scored: int

    @property
    def bits_per_token(self) -> float:
        """Mean NLL in bits (per byte for a byte-level model)."""
        return self.nll_nats / math.log(2)


def perplexity(model: Transformer, data: bytes | list[int], *, ctx: int = 256, batch: int = 8,
               backend: ExpertBackend | None = None, max_tokens: int = 0,
               progress: bool = False) -> Perplexity:
    """Perplexity over non-overlapping windows of `ctx` tokens (each window's first token is
    context only); routed experts run in `backend` (default: the model's own DenseExperts).

    `max_tokens` > 0 scores only the first `max_tokens` tokens of `data`.
    """
    ids = torch.tensor(list(data), dtype=torch.long)
    if max_tokens:
        ids = ids[:max_tokens]
    check_window(model, ctx)
    n_win = len(ids) // ctx
    if n_win == 0:
        raise UserError(f"{len(ids)} tokens are fewer than one window of {ctx}", field="ctx",
                        fix="use a longer text or a smaller ctx")
    windows = ids[: n_win * ctx].view(n_win, ctx)  # [N, ctx]
    total, count = 0.0, 0
    starts = range(0, n_win, batch)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="perplexity", unit="batch")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in starts:
                w = windows[s:s + batch]  # [b, ctx]
                logits = model(w[:, :-1], backend=backend)  # [b, ctx-1, V]
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                      w[:, 1:].reshape(-1), reduction="sum")
                total += nll.item()
                count += w[:, 1:].numel()
    finally:
        model.train(was_training)
    return Perplexity(ppl=math.exp(total / count), nll_nats=total / count, tokens_scored=count)


def unigram_perplexity(train: bytes, heldout: bytes, vocab: int = 256) -> Perplexity:
    """Perplexity on `heldout` of byte frequencies counted on `train` (add-one smoothing)."""
    counts = Counter(train)
    denom = len(train) + vocab  # Laplace: p(b) = (c_b + 1) / (N + V)
    held = Counter(heldout)
    total = -sum(n * math.log((counts.get(b, 0) + 1) / denom) for b, n in held.items())
    return Perplexity(ppl=math.exp(total / len(heldout)), nll_nats=total / len(heldout),
                      tokens_scored=len(heldout))
