"""Serving on the simulator: the batcher decides each step from the simulated clock, a
`SimSession` runs it, and the clock jumps to the next arrival when nothing is active."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from d2moe.core.events import Timeline
from d2moe.policies.presets import Policy
from d2moe.serve.arrivals import Request
from d2moe.serve.batching import PREFILL, BatchStep, ContinuousBatcher
from d2moe.serve.routing import RoutingSource, TokenRouting, step_demands
from d2moe.sim.simulator import SimSession, SimSetup, StepWork, policy_setup


def step_parts(step: BatchStep, batcher: ContinuousBatcher,
               routing: dict[int, TokenRouting]) -> list[TokenRouting]:
    """The routing rows of each request's tokens in `step`, in the step's order: a prefill
    takes a request's prompt rows, a decode step the row after its tokens so far."""
    parts = []
    for rid, n in zip(step.requests, step.tokens, strict=True):
        r = routing[rid]
        if step.phase == PREFILL:
            lo = 0
        else:  # generated tokens so far g >= 1: the input is forward row prompt + g - 1
            lo = batcher.states[rid].request.prompt_tokens + batcher.states[rid].generated - 1
        parts.append(TokenRouting(r.experts[lo:lo + n], r.weights[lo:lo + n], r.bits[lo:lo + n]))
    return parts


def serve_sim(setup: SimSetup, policy: Policy, requests: Sequence[Request],
              source: RoutingSource, *, max_batch: int, bits: int, progress: Any = None,
              **meta: Any) -> Timeline:
    """Serve `requests` with continuous batching on the simulator; the timeline holds the
    simulator's rows plus the request lane (`request`, `first_token`). `progress` (a bar
    from d2moe.core.progress, or None) advances by each finished request."""
    routing = {r.id: source.for_request(r) for r in requests}
    top = max((int(r.bits.max()) for r in routing.values() if r.bits.size), default=0)
    setup = policy_setup(setup, policy, max(top, bits))  # the policy's layout, checked
    session = SimSession(setup, policy)
    batcher = ContinuousBatcher(requests, max_batch)
    t, s = 0.0, 0
    while not batcher.done:
        step = batcher.next_step(t)
        if step is None:  # idle: jump to the next arrival
            t = max(t, batcher.next_arrival_us())  # type: ignore[arg-type]
            continue
        layers = step_demands(setup.spec, step_parts(step, batcher, routing), step.phase, bits)
        t = session.run_step(s, StepWork(step.phase, step.total_tokens, layers), t)
        done = batcher.complete(step, t)
        if progress and done:
            progress.update(len(done))
        s += 1
    tl = session.timeline(max_batch=max_batch, requests=len(requests), **meta)
    tl.events.extend(batcher.rows())
    return tl
