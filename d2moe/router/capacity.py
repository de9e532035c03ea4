"""Capacities of the bit-width router: exact per-width token counts and the overflow rule.

method.md part 1: each bit-width k has a capacity c_k, the largest fraction of a batch's tokens
that may use it; tokens over capacity fall to their next-preferred bit-width.

Counts: a batch of T tokens gives width k at most n_k = floor(c_k T) tokens; when the floors
leave tokens without a place (sum n_k < T, which happens whenever the c_k T are not integers),
the missing places go to the widths with the largest remainders c_k T - floor(c_k T) (ties:
the lower width), so sum n_k >= T always and, when sum c_k = 1, sum n_k = T exactly: every
width is then filled to exactly n_k.

Assignment (`assign`): in round r = 1..K, every token still unplaced proposes its r-th
preferred width (by the gate's probabilities); a width with room accepts its proposers in
order of their probability for it (ties: the earlier token) up to its remaining count; the
rest go on to round r + 1. Because sum n_k >= T, every token is placed after K rounds.

Batches: a call of T >= `window` tokens (training, prefill, perplexity windows) is one batch.
Smaller calls (decode steps of one token) share a running window of `window` tokens per
layer: their counts come from n_k(window) minus what the window has used, and a new window
starts when the next call would not fit. This keeps the shares exact over every window of
decode tokens, deterministically (the state depends only on the calls so far).

numpy or torch: the rule runs in numpy (torch tensors are converted once per call and the
result goes back to their device), so the simulator re-places a trace's recorded gate
probabilities with this very code and no torch (d2moe/sim/adaptive.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from d2moe.core.cliargs import int_ranges, split_list
from d2moe.core.errors import UserError


def parse_floats(text: str, field: str) -> tuple[float, ...]:
    """'0.3,0.4,0.3' -> (0.3, 0.4, 0.3)."""
    parts = split_list(text, field, example=f"--{field} 0.3,0.4,0.3", unique=False)
    try:
        return tuple(float(p) for p in parts)
    except ValueError:
        raise UserError(f"cannot read {text!r} as numbers", field=field,
                        fix="write a comma list like 0.3,0.4,0.3") from None


def parse_bits(text: str) -> tuple[int, ...]:
    """'2,3,4' or '2-4' -> (2, 3, 4), strictly increasing."""
    out = int_ranges(text, "bits", example="--bits 2,3,4")
    if len(out) < 2 or any(b >= c for b, c in zip(out, out[1:], strict=False)):
        raise UserError(f"need at least two increasing bit-widths, got {text!r}", field="bits",
                        fix="e.g. --bits 2,3,4")
    return tuple(out)


def check_capacities(caps: Sequence[float], k: int) -> tuple[float, ...]:
    """Capacities for K widths: each in [0, 1], summing to at least 1 (every token fits)."""
    caps = tuple(float(c) for c in caps)
    if len(caps) != k:
        raise UserError(f"{len(caps)} capacities for {k} bit-widths", field="capacity",
                        fix="give one capacity per bit-width, e.g. 0.3,0.4,0.3 for 2,3,4")
    if any(not 0 <= c <= 1 or math.isnan(c) for c in caps) or sum(caps) < 1 - 1e-9:
        raise UserError(f"capacities {caps} must lie in [0, 1] and sum to >= 1", field="capacity",
                        fix="e.g. 0.3,0.4,0.3 (sum 1: exact shares) or 1,1,1 (no limit)")
    return caps


def capacity_counts(caps: Sequence[float], tokens: int) -> list[int]:
    """n_k for a batch of `tokens`: floor(c_k T), the shortfall by largest remainder."""
    raw = [c * tokens for c in caps]
    counts = [min(tokens, math.floor(r + 1e-9)) for r in raw]
    short = tokens - sum(counts)
    if short > 0:
        order = sorted(range(len(caps)), key=lambda k: (-(raw[k] - math.floor(raw[k] + 1e-9)), k))
        for k in [k for k in order if caps[k] > 0][:short]:
            counts[k] += 1
    return counts


def assign(probs: Any, counts: Sequence[int]) -> Any:
    """probs [T, K] (gate preferences) + room per width -> width index [T] (module doc):
    numpy in, int64 numpy out; torch in, a long tensor on the same device out."""
    p, back = _as_numpy(probs)
    return back(_assign(p, counts))


def _as_numpy(probs: Any) -> tuple[np.ndarray, Any]:
    """probs as a numpy array, and the map of an index array back to the input's kind."""
    if isinstance(probs, np.ndarray):
        return probs, lambda idx: idx
    import torch

    p = probs.detach()
    return p.float().cpu().numpy(), lambda idx: torch.from_numpy(idx).to(p.device)


def _assign(p: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """The overflow rule on a numpy array p [T, K]: width index [T] int64."""
    t, k = p.shape
    if sum(counts) < t:
        raise ValueError(f"room for {sum(counts)} tokens, {t} to place")
    pref = np.argsort(-p, axis=1, kind="stable")  # [T, K] widths, most preferred first
    out = np.full(t, -1, dtype=np.int64)  # [T]
    room = list(counts)
    for r in range(k):
        open_ = out < 0  # [T]
        if not open_.any():
            break
        prop = pref[:, r]  # [T]
        for w in range(k):
            cand = np.flatnonzero(open_ & (prop == w))  # [n] token ids, ascending
            if cand.size == 0 or room[w] == 0:
                continue
            if cand.size > room[w]:  # over capacity: the most confident tokens stay
                order = np.argsort(-p[cand, w], kind="stable")
                cand = cand[order[:room[w]]]
            out[cand] = w
            room[w] -= int(cand.size)
    return out


class CapacityWindow:
    """Per-layer running window for calls smaller than `window` tokens (module doc)."""

    def __init__(self, caps: Sequence[float], window: int) -> None:
        if window < 1:
            raise UserError(f"window must be positive, got {window}", field="window",
                            fix="e.g. --window 64")
        self.caps, self.window = tuple(caps), window
        self.full = capacity_counts(self.caps, window)
        self.used: dict[int, list[int]] = {}
        self.filled: dict[int, int] = {}

    def reset(self) -> None:
        """Forget every window (a new sequence begins)."""
        self.used.clear()
        self.filled.clear()

    def place(self, layer: int, probs: Any) -> Any:
        """probs [T, K] of one layer's call (numpy or torch) -> width index [T] (the same
        kind, see `assign`) under the capacities."""
        p, back = _as_numpy(probs)
        t = p.shape[0]
        if t >= self.window:
            return back(_assign(p, capacity_counts(self.caps, t)))
        used = self.used.setdefault(layer, [0] * len(self.caps))
        if self.filled.get(layer, 0) + t > self.window:  # next window
            used[:] = [0] * len(self.caps)
            self.filled[layer] = 0
        idx = _assign(p, [n - u for n, u in zip(self.full, used, strict=True)])  # [T]
        for w, c in enumerate(np.bincount(idx, minlength=len(self.caps)).tolist()):
            used[w] += c
        self.filled[layer] = self.filled.get(layer, 0) + t
        return back(idx)
