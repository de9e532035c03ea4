"""The MoE layer: router, the expert-backend seam, and the default in-memory experts.

The seam: a `MoELayer` computes router logits and the top-k itself, then hands the tokens,
their expert ids and router weights to `backend.run_layer`. `DenseExperts` (all experts
resident, plain torch) is the default; the executor plugs in a backend that streams nested
low-bit experts from disk. Anything with a `run_layer` method of this signature serves.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from d2moe.core.spec import ModelSpec
from d2moe.model.config import ModelConfig


@runtime_checkable
class ExpertBackend(Protocol):
    """Runs the routed experts of one MoE layer."""

    def run_layer(self, layer: int, x: torch.Tensor, ids: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], ids [T, k] int64, weights [T, k] -> sum_k weights * expert_ids(x) [T, D]."""
        ...


class RouterObserver(Protocol):
    """Called once per MoE layer per forward with that layer's routing (for trace recording)."""

    def __call__(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """ids [T, k] int64 and weights [T, k] of the T = batch * seq tokens of this forward."""
        ...


def route(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] float32, ids [T, k] int64).

    Mixtral (renormalize): softmax over the top-k logits, equal to the top-k of the full
    softmax divided by their sum. OLMoE / Qwen-MoE: the top-k of the full softmax as is.
    """
    probs = F.softmax(logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, k, dim=-1)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU FFN (Shazeer 2020): w2 (silu(w1 x) * w3 x); x [N, D], w1/w3 [F, D], w2 [D, F]."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


class DenseExperts(nn.Module):
    """Every expert of every layer resident in memory: the reference `ExpertBackend`.

    w1, w3: [L, E, F, D] (gate, up); w2: [L, E, D, F] (down). Differentiable, so the tiny
    model trains through it.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        shape_in = (spec.layers, spec.experts, spec.ffn, spec.hidden)
        self.w1 = nn.Parameter(torch.empty(shape_in))
        self.w3 = nn.Parameter(torch.empty(shape_in))
        self.w2 = nn.Parameter(torch.empty(spec.layers, spec.experts, spec.hidden, spec.ffn))

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w3, w2) of one expert."""
        return self.w1[layer, e], self.w3[layer, e], self.w2[layer, e]

    def run_layer(self, layer: int, x: torch.Tensor, ids: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[t, k] * SwiGLU_{ids[t, k]}(x[t]), grouped by expert."""
        out = torch.zeros_like(x)  # [T, D]
        for e in torch.unique(ids).tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)  # tokens routed to e, and which slot
            y = swiglu(x[tok], *self.expert(layer, e))  # [n_e, D]
            out.index_add_(0, tok, y * weights[tok, slot, None].to(y.dtype))
        return out


class SharedExpert(nn.Module):
    """An always-on SwiGLU FFN beside the routed experts (Qwen-MoE), optionally gated."""

    def __init__(self, hidden: int, ffn: int, gated: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)
        self.gate = nn.Linear(hidden, 1, bias=False) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]; Qwen-MoE scales by sigmoid(gate(x))."""
        y = swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        return y if self.gate is None else torch.sigmoid(self.gate(x)) * y


class MoELayer(nn.Module):
    """Router + top-k here; the routed experts themselves run in the backend."""

    def __init__(self, spec: ModelSpec, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.top_k, self.renormalize = layer, spec.top_k, cfg.renormalize_topk
        self.gate = nn.Linear(spec.hidden, spec.experts, bias=False)  # router
        self.shared = (SharedExpert(spec.hidden, spec.shared_ffn, cfg.shared_expert_gate)
                       if spec.shared_ffn else None)

    def forward(self, x: torch.Tensor, backend: ExpertBackend,
                observer: RouterObserver | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (output [T, D], router logits [T, E])."""
        logits = self.gate(x)  # [T, E]
        weights, ids = route(logits, self.top_k, self.renormalize)  # [T, k] each
        if observer is not None:
            observer(self.layer, ids, weights)
        y = backend.run_layer(self.layer, x, ids, weights.to(x.dtype))  # [T, D]
        if self.shared is not None:
            y = y + self.shared(x)
        return y, logits
