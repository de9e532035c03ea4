"""The bit-width gate ("dual routing", method.md part 1): one linear map per MoE layer from the
MoE input (the post-attention-normed hidden state) to K bit-width logits.

Per token, not per (token, expert): the decision is one width per token and layer, shared by
the token's top-k experts. Why: (1) method.md part 1 describes a gate that "picks a bit-width
for each token", with capacities as fractions of a batch's tokens; (2) the gate's input, the
hidden state, is the same for all k experts of a token, so a per-(token, expert) choice would
need expert-conditioned logits (E x K outputs per layer, E times the parameters and far fewer
training examples per output); (3) the schedule is unchanged in kind: an expert demanded by
tokens at several widths is one job loaded to the largest (MWQ serves the smaller widths as a
prefix), so per-token widths cost no extra loads beyond what the widest token needs.

Relaxation: straight-through (Bengio et al. 2013). The forward pass uses the hard choice that
inference makes, after the capacities (`capacity.assign`), so training runs exactly the
computation that inference runs (same widths, same overflow); the backward pass takes the
gradient of softmax(logits / tau). A plain Gumbel-softmax would mix a blend of widths in the
forward pass (a "2.6-bit" expert that no store serves) and could not respect exact counts.
Optional Gumbel noise (`relax="gumbel"`: straight-through Gumbel-softmax) adds exploration.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from d2moe.router.capacity import CapacityWindow, check_capacities

RELAXATIONS = ("st", "gumbel")


class BitGate(nn.Module):
    """Per MoE layer a Linear(hidden -> K) with bias (`width` 0), or a two-layer MLP
    hidden -> width -> K with SiLU: logits of the K bit-widths."""

    def __init__(self, layers: int, hidden: int, k: int, seed: int = 0, width: int = 0) -> None:
        super().__init__()
        self.layers_, self.hidden, self.k, self.width = layers, hidden, k, width

        def one() -> nn.Module:
            if not width:
                return nn.Linear(hidden, k)
            return nn.Sequential(nn.Linear(hidden, width), nn.SiLU(), nn.Linear(width, k))

        self.proj = nn.ModuleList(one() for _ in range(layers))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.proj.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                else:  # small last layer: near-uniform preferences at the start
                    std = 0.01 if p.shape[0] == k else 1 / p.shape[1] ** 0.5
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> logits [T, K] (float32)."""
        return self.proj[layer](x.float())  # [T, K]


def relaxed_choice(logits: torch.Tensor, idx: torch.Tensor, tau: float) -> torch.Tensor:
    """Straight-through one-hot [T, K]: forward = one_hot(idx), gradient = d softmax(l/tau)."""
    soft = torch.softmax(logits / tau, dim=-1)  # [T, K]
    hard = torch.nn.functional.one_hot(idx, logits.shape[-1]).to(soft.dtype)  # [T, K]
    return hard - soft.detach() + soft


class BitRouter:
    """Inference: the gate plus the capacities; `choose(layer, x)` gives each token's bits."""

    def __init__(self, gate: BitGate, bits: Sequence[int], capacities: Sequence[float], *,
                 window: int = 64, meta: dict | None = None) -> None:
        self.gate = gate.eval().requires_grad_(False)
        self.bits = tuple(int(b) for b in bits)
        self.capacities = check_capacities(capacities, len(self.bits))
        self.window = CapacityWindow(self.capacities, window)
        self.meta = dict(meta or {})
        self._bits_t = torch.tensor(self.bits, dtype=torch.long)

    def to(self, device: torch.device | str) -> BitRouter:
        """Move the gate to `device`."""
        self.gate.to(device)
        self._bits_t = self._bits_t.to(device)
        return self

    def reset(self) -> None:
        """Start a new sequence: forget the decode windows."""
        self.window.reset()

    def set_capacities(self, caps: Sequence[float], window: int | None = None) -> None:
        """New capacities (and window size) from the next call on; every window restarts."""
        self.capacities = check_capacities(caps, len(self.bits))
        self.window = CapacityWindow(self.capacities, window or self.window.window)

    def probs(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> gate probabilities [T, K]."""
        with torch.no_grad():
            return torch.softmax(self.gate(layer, x), dim=-1)  # [T, K]

    def choose_index(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> width index [T] into `bits`, capacities enforced."""
        return self.window.place(layer, self.probs(layer, x))

    def choose(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> bits [T] (int64), capacities enforced."""
        return self._bits_t.to(x.device)[self.choose_index(layer, x)]  # [T]
