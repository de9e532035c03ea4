"""Continuous batching as a pure scheduler: it is told the time, it never reads a clock.

The rule, at each step boundary (time t):

1. Admit requests that have arrived by t, in arrival order, while fewer than `max_batch` are
   active.
2. If any were just admitted, the step is their prefill (phase "prefill", one step for all of
   them, tokens = the sum of their prompts); requests already decoding wait one step
   (prefill first, as vLLM's default scheduler does: new requests get their first token soon).
3. Otherwise, if any are active, the step is one decode step: one token for every active
   request.
4. Otherwise nothing can run: the caller moves its clock to `next_arrival_us()` (the
   simulator jumps, the real server sleeps) and asks again.

Token accounting, as in usual serving (and `d2moe.model.generate`): a request's prefill
produces its first output token, so it then needs `output_tokens - 1` decode steps; its first
token time is the end of its prefill step, its end the end of the step producing its last.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from d2moe.core.errors import UserError
from d2moe.core.events import Event
from d2moe.serve.arrivals import Request

PREFILL, DECODE = "prefill", "decode"


@dataclass(frozen=True)
class BatchStep:
    """One forward step: its phase, the requests in it and each one's token count there
    (their tokens are concatenated in this order)."""

    phase: str
    requests: tuple[int, ...]
    tokens: tuple[int, ...]

    @property
    def total_tokens(self) -> int:
        """Tokens in the step."""
        return sum(self.tokens)


@dataclass
class _State:
    request: Request
    generated: int = 0
    first_us: float = -1.0
    end_us: float = -1.0


class ContinuousBatcher:
    """Admits, prefills and decodes requests step by step; records when each one's first and
    last tokens came."""

    def __init__(self, requests: Sequence[Request], max_batch: int) -> None:
        if max_batch < 1:
            raise UserError(f"must be >= 1, got {max_batch}", field="max_batch",
                            fix="pass e.g. --max-batch 4")
        if len({r.id for r in requests}) != len(requests):
            raise ValueError("request ids must be distinct")
        self.max_batch = max_batch
        self.states = {r.id: _State(r) for r in requests}
        self.waiting = deque(sorted(requests, key=lambda r: (r.arrival_us, r.id)))
        self.active: list[int] = []  # admission order
        self.finished: list[int] = []  # completion order
        self._in_flight: tuple[BatchStep, float] | None = None

    @property
    def done(self) -> bool:
        """Every request has all its tokens."""
        return not self.waiting and not self.active

    def next_arrival_us(self) -> float | None:
        """When the next request not yet admitted arrives (None: none left)."""
        return self.waiting[0].arrival_us if self.waiting else None

    def next_step(self, t_us: float) -> BatchStep | None:
        """The step to run from `t_us`, or None when nothing has arrived and nothing is active."""
        if self._in_flight is not None:
            raise RuntimeError("complete() the step in flight before asking for the next")
        new: list[Request] = []
        while self.waiting and len(self.active) < self.max_batch \
                and self.waiting[0].arrival_us <= t_us:
            r = self.waiting.popleft()
            self.active.append(r.id)
            new.append(r)
        if new:
            step = BatchStep(PREFILL, tuple(r.id for r in new),
                             tuple(r.prompt_tokens for r in new))
        elif self.active:
            step = BatchStep(DECODE, tuple(self.active), (1,) * len(self.active))
        else:
            return None
        self._in_flight = (step, t_us)
        return step

    def complete(self, step: BatchStep, t_end_us: float) -> list[int]:
        """Record that `step` ended at `t_end_us`; returns the ids it finished."""
        if self._in_flight is None or self._in_flight[0] is not step:
            raise RuntimeError("complete() a step returned by next_step()")
        if t_end_us < self._in_flight[1]:
            raise ValueError(f"step ends at {t_end_us} before it started ({self._in_flight[1]})")
        self._in_flight = None
        done = []
        for rid in step.requests:
            st = self.states[rid]
            st.generated += 1
            if st.generated == 1:
                st.first_us = t_end_us
            if st.generated >= st.request.output_tokens:
                st.end_us = t_end_us
                done.append(rid)
        if done:
            gone = set(done)
            self.active = [rid for rid in self.active if rid not in gone]
            self.finished.extend(done)
        return done

    def rows(self) -> list[Event]:
        """`request` and `first_token` rows of the finished requests (the request lane)."""
        out = []
        for rid in self.finished:
            st = self.states[rid]
            r = st.request
            out.append(Event("request", "request", rid, -1, -1, 0, 0, r.output_tokens,
                             r.prompt_tokens, r.arrival_us, st.end_us))
            out.append(Event("request", "first_token", rid, -1, -1, 0, 0, 1, r.prompt_tokens,
                             r.arrival_us, st.first_us))
        return out
