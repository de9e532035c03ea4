"""Per-token routing for simulated requests, and a batched step's demands per layer.

Each request owns `prompt_tokens + output_tokens - 1` forward tokens: its prompt (in its
prefill step), then the input of each decode step (its previous output token). Their routing
is fixed per request before serving starts, so it does not depend on how requests are batched:

- `SynthRouting`: the synthetic generator's model (d2moe/traces/synth.py): one per-layer
  popularity and cross-layer map for the model (from the seed), each request's tokens drawn
  as one sequence (locality within it), with its own random stream (seed, request id).
- `TraceRouting`: the token rows of a recorded trace, in order and cycling: request i takes
  the rows after those of requests 0..i-1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np

from d2moe.core.jobs import Demand
from d2moe.core.spec import ModelSpec
from d2moe.serve.arrivals import Request
from d2moe.traces.schema import DECODE, PREFILL, Trace
from d2moe.traces.synth import SynthConfig, _draw_experts, layer_maps, layer_popularity


class TokenRouting(NamedTuple):
    """Routing of n tokens: experts [n, L, k], weights [n, L, k], bits [n, L, k] (0: default)."""

    experts: np.ndarray
    weights: np.ndarray
    bits: np.ndarray


class RoutingSource(Protocol):
    """Gives each request the routing of its forward tokens."""

    def for_request(self, request: Request) -> TokenRouting:
        """Routing of the request's `prompt_tokens + output_tokens - 1` forward tokens."""
        ...


def forward_tokens(request: Request) -> int:
    """Tokens a request sends through the model: its prompt, then each decode step's input."""
    return request.prompt_tokens + request.output_tokens - 1


class SynthRouting:
    """Synthetic routing: the generator's popularity, maps and draws, one sequence per request."""

    def __init__(self, spec: ModelSpec, cfg: SynthConfig | None = None) -> None:
        self.spec = spec
        self.cfg = cfg if cfg is not None else SynthConfig()
        self.pop = layer_popularity(spec, self.cfg)
        self.maps = layer_maps(spec, self.cfg)

    def for_request(self, request: Request) -> TokenRouting:
        """Drawn from the stream (seed, request id): the same whatever the batching."""
        rng = np.random.default_rng([self.cfg.seed, request.id])
        n, L, k = forward_tokens(request), self.spec.layers, self.spec.top_k
        experts = _draw_experts(rng, self.pop, self.maps, k, n, n, self.cfg)
        logits = rng.normal(0.0, self.cfg.logit_std, size=(n, L, k))
        w = np.exp(logits - logits.max(axis=2, keepdims=True))
        weights = -np.sort(-(w / w.sum(axis=2, keepdims=True)), axis=2)  # slot 0 heaviest
        return TokenRouting(experts, weights.astype(np.float32), np.zeros((n, L, k), np.int8))


class TraceRouting:
    """A recorded trace's token rows, in order, cycling; request i after requests 0..i-1."""

    def __init__(self, trace: Trace, requests: Sequence[Request]) -> None:
        self.trace = trace
        self.start: dict[int, int] = {}
        at = 0
        for r in sorted(requests, key=lambda r: r.id):
            self.start[r.id] = at
            at += forward_tokens(r)

    def for_request(self, request: Request) -> TokenRouting:
        """The rows from this request's start, wrapping at the trace's end."""
        n_rows = self.trace.num_tokens
        rows = (self.start[request.id] + np.arange(forward_tokens(request))) % n_rows
        t = self.trace
        return TokenRouting(t.experts[rows], t.weights[rows], t.bits[rows])


def step_demands(spec: ModelSpec, parts: Sequence[TokenRouting], phase: str,
                 default_bits: int) -> list[list[Demand]]:
    """Demands per layer of one step whose tokens are `parts` concatenated: grouped by
    (expert, bits), tokens counted, importance = the largest router weight, sorted by expert
    then bits (the trace replayer's grouping, `Trace.demands`)."""
    experts = np.concatenate([p.experts for p in parts])
    weights = np.concatenate([p.weights for p in parts])
    bits = np.concatenate([p.bits for p in parts])
    code = PREFILL if phase == "prefill" else DECODE
    one = Trace.from_steps(spec.name, spec.experts, [(code, experts, weights, bits)])
    return one.demands(default_bits)[0]
