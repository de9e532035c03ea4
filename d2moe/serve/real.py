"""Serving on the real executor: requests arrive by the wall clock, the batcher decides each
step, and one ragged forward runs it (attention per request on its own KV cache, one MoE call
over every request's tokens: `Transformer.forward_ragged`). Greedy decoding."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from d2moe.core.events import Event
from d2moe.serve.arrivals import Request
from d2moe.serve.batching import PREFILL, ContinuousBatcher

# Prompt text: request i reads from offset 7i of its bytes, cycling (the bytes taken modulo
# the vocabulary: serving measures time and routing, so a model of another vocabulary gets
# valid ids without a tokenizer).
PROMPT_TEXT = ("def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"
               "\n\nclass Stack:\n    def __init__(self):\n        self.items = []\n\n"
               "    def push(self, item):\n        self.items.append(item)\n\n"
               "import os\nimport sys\n\nfor line in sys.stdin:\n    print(line.strip())\n")


def make_prompts(requests: Sequence[Request], text: str = PROMPT_TEXT,
                 vocab: int = 256) -> dict[int, list[int]]:
    """Token ids of each request's prompt, `prompt_tokens` long, cut from `text`'s bytes
    (each modulo `vocab`: the tiny model's byte ids as they are)."""
    data = text.encode()
    return {r.id: [data[(7 * r.id + i) % len(data)] % vocab for i in range(r.prompt_tokens)]
            for r in requests}


@dataclass(frozen=True)
class Served:
    """What a real serving run produced: request rows, each request's tokens, each forward
    step's phase, and when the waits for arrivals ended."""

    rows: list[Event]
    outputs: dict[int, list[int]]
    phases: list[str]  # per forward step, in order


def serve_model(model: Any, backend: Any, requests: Sequence[Request],
                prompts: dict[int, list[int]], *, max_batch: int,
                clock: Callable[[], float], progress: Any = None) -> Served:
    """Serve `requests` on `model` with `backend` (any ExpertBackend) by the clock `clock`
    (microseconds); arrivals are waited for in real time. `progress` (a bar from
    d2moe.core.progress, or None) advances by each finished request. A backend with
    `resume()` (StreamingExperts) is told when serving starts and when each wait for an
    arrival ends: idle time belongs to no step and no row."""
    batcher = ContinuousBatcher(requests, max_batch)
    device = next(model.parameters()).device
    model.eval()
    caches: dict[int, Any] = {}
    outputs: dict[int, list[int]] = {r.id: [] for r in requests}
    phases: list[str] = []
    resume = getattr(backend, "resume", lambda: None)
    resume()  # the first step starts now, not when the backend was built
    with torch.inference_mode():
        while not batcher.done:
            step = batcher.next_step(clock())
            if step is None:  # nothing active: wait for the next arrival
                wait = batcher.next_arrival_us() - clock()  # type: ignore[operator]
                if wait > 0:
                    time.sleep(wait / 1e6)
                resume()
                continue
            if step.phase == PREFILL:
                for rid, n in zip(step.requests, step.tokens, strict=True):
                    out = batcher.states[rid].request.output_tokens
                    caches[rid] = model.new_cache(batch=1, max_len=n + out)
                seqs = [torch.tensor(prompts[rid], device=device) for rid in step.requests]
            else:
                seqs = [torch.tensor(outputs[rid][-1:], device=device) for rid in step.requests]
            if hasattr(backend, "step_phase"):
                backend.step_phase = step.phase
            logits = model.forward_ragged(seqs, [caches[rid] for rid in step.requests],
                                          backend=backend, last_only=True)
            for rid, lg in zip(step.requests, logits, strict=True):
                outputs[rid].append(int(lg[-1].argmax()))
            phases.append(step.phase)
            done = batcher.complete(step, clock())
            for rid in done:
                del caches[rid]
            if progress and done:
                progress.update(len(done))
    return Served(batcher.rows(), outputs, phases)


def fix_steps(events: list[Event], served: Served) -> list[Event]:
    """The backend's rows with each step row labelled by the batcher's phase (the backend
    alone calls only its first step a prefill). Assumes the backend ran only `served`'s
    forward steps, numbered from 0."""
    return [e._replace(kind=served.phases[e.step])
            if e.lane == "step" and 0 <= e.step < len(served.phases) else e for e in events]
