"""The router's training loss (method.md part 1):

    Loss = (1/T) Σ_x [ CE(p(x), q(x)) + (α/L) Σ_{l=1..L} Σ_{k=1..K} p_k^l(x) b_k ]

p(x): the output distribution of the model running at the chosen bit-widths; q(x): the target,
the frozen full-precision model's distribution (distillation, the default) or the next token;
p_k^l(x): the gate's probability of width k at layer l; b_k: its bits; L: MoE layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TARGETS = ("distill", "next")


@dataclass(frozen=True)
class LossParts:
    """The loss and its two terms (per token means)."""

    total: torch.Tensor
    ce: torch.Tensor
    bit_cost: torch.Tensor  # (1/L) Σ_l Σ_k p_k^l b_k, mean over tokens (expected bits)


def router_loss(logits: torch.Tensor, target: torch.Tensor, probs: Sequence[torch.Tensor],
                bits: Sequence[int], alpha: float) -> LossParts:
    """logits [N, V] of the quantized model; target: teacher logits [N, V] (distill) or token
    ids [N] (next); probs: per layer gate probabilities [rows, K]."""
    ce = target_ce(logits, target)
    b = torch.tensor([float(x) for x in bits], device=logits.device)  # [K]
    bit_cost = torch.stack([(p * b).sum(dim=-1).mean() for p in probs]).mean()  # (1/L) Σ_l
    return LossParts(total=ce + alpha * bit_cost, ce=ce, bit_cost=bit_cost)


def target_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean CE(p, q) over N positions: q the teacher's softmax (target [N, V]) or the next
    token (target [N])."""
    logp = F.log_softmax(logits.float(), dim=-1)  # [N, V]
    if target.dim() == 2:  # CE(p, q) = -Σ_v q_v log p_v with q = softmax(teacher)
        q = F.softmax(target.float(), dim=-1)  # [N, V]
        return -(q * logp).sum(dim=-1).mean()
    return F.nll_loss(logp, target)
