"""The bit-width gate ("dual routing", method.md part 1): per MoE layer, a map from the MoE
input (the post-attention-normed hidden state) to K bit-width logits.

Granularity (`slots`): one width per (token, expert slot) by default, or one per token
(`slots` 0) shared by its top-k experts. Why per slot: a slot's output enters the layer scaled
by its router weight, so quantization error on a low-weight slot costs less; with top-2 and
capacities 0.3/0.4/0.3 over 2/3/4 bits, sending the lowest-weight 30% of slots to 2 bits and
the highest 30% to 4 beats uniform 3 bits, where no per-token allocation we tried did
(docs/results/router.md). The per-slot logits stay cheap: the token's K logits from the
hidden state plus a learned per-width slope on the slot's router weight and a per-(rank,
width) bias, not expert-conditioned logits (E x K outputs, E times the parameters). The
slope starts at the weight ordering (low weight prefers few bits); training moves it.
The schedule is unchanged in kind: an expert demanded at several widths in one step is one
job, loaded to the widest (MWQ serves the narrower ones as a prefix).

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


SLOPE_INIT = 4.0  # initial |logit slope| per unit router weight at the widest/narrowest width


class BitGate(nn.Module):
    """Per MoE layer a Linear(hidden -> K) with bias (`width` 0), or a two-layer MLP
    hidden -> width -> K with SiLU: logits of the K bit-widths; with `slots` = top-k > 0,
    plus slope[l, K] x (the slot's router weight - 1/k) + rank_bias[l, slot, K] (module
    doc): at the start a lighter-than-average slot prefers fewer bits, a heavier one more."""

    def __init__(self, layers: int, hidden: int, k: int, seed: int = 0, width: int = 0,
                 slots: int = 0) -> None:
        super().__init__()
        self.layers_, self.hidden, self.k, self.width, self.slots = layers, hidden, k, width, slots

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
        if slots:  # start at the weight ordering: narrow widths for light slots
            ramp = torch.linspace(-SLOPE_INIT, SLOPE_INIT, k) if k > 1 else torch.zeros(1)
            self.slope = nn.Parameter(ramp.repeat(layers, 1))  # [L, K]
            self.rank_bias = nn.Parameter(torch.zeros(layers, slots, k))  # [L, k, K]

    @property
    def granularity(self) -> str:
        """'slot' (one width per token and expert slot) or 'token'."""
        return "slot" if self.slots else "token"

    def forward(self, layer: int, x: torch.Tensor, weights: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x [T, D] (+ router weights [T, k] per slot) -> logits [T, K] or [T, k, K] (fp32)."""
        logits = self.proj[layer](x.float())  # [T, K]
        if not self.slots:
            return logits
        if weights is None or weights.shape[-1] != self.slots:
            raise ValueError(f"a per-slot gate needs router weights [T, {self.slots}]")
        w = weights.float()[..., None] - 1 / self.slots  # [T, k, 1] centred at the mean weight
        return logits[:, None, :] + w * self.slope[layer] + self.rank_bias[layer]  # [T, k, K]


def relaxed_choice(logits: torch.Tensor, idx: torch.Tensor, tau: float) -> torch.Tensor:
    """Straight-through one-hot [T, K]: forward = one_hot(idx), gradient = d softmax(l/tau)."""
    soft = torch.softmax(logits / tau, dim=-1)  # [T, K]
    hard = torch.nn.functional.one_hot(idx, logits.shape[-1]).to(soft.dtype)  # [T, K]
    return hard - soft.detach() + soft


class BitRouter:
    """Inference: the gate plus the capacities; `choose(layer, x, weights)` gives the bits of
    each token [T] or of each (token, slot) [T, k]. Capacities are shares of the rows (tokens
    or slots); `window` counts tokens (k slots each for a per-slot gate)."""

    def __init__(self, gate: BitGate, bits: Sequence[int], capacities: Sequence[float], *,
                 window: int = 64, meta: dict | None = None) -> None:
        self.gate = gate.eval().requires_grad_(False)
        self.bits = tuple(int(b) for b in bits)
        self.capacities = check_capacities(capacities, len(self.bits))
        self.rows_per_token = max(1, gate.slots)
        self.window_tokens = window
        self.window = CapacityWindow(self.capacities, window * self.rows_per_token)
        self.meta = dict(meta or {})
        self._bits_t = torch.tensor(self.bits, dtype=torch.long)
        # layer -> the last call's gate probabilities [T, K] or [T, k, K] (trace recording)
        self.last_probs: dict[int, torch.Tensor] = {}
        # layer -> the last call's width index [T] or [T, k] into `bits` (trace recording)
        self.last_index: dict[int, torch.Tensor] = {}

    def to(self, device: torch.device | str) -> BitRouter:
        """Move the gate to `device`."""
        self.gate.to(device)
        self._bits_t = self._bits_t.to(device)
        return self

    def reset(self) -> None:
        """Start a new sequence: forget the decode windows."""
        self.window.reset()
        self.last_probs.clear()
        self.last_index.clear()

    def set_capacities(self, caps: Sequence[float], window: int | None = None) -> None:
        """New capacities (and window size) from the next call on; every window restarts."""
        self.capacities = check_capacities(caps, len(self.bits))
        self.window_tokens = window or self.window_tokens
        self.window = CapacityWindow(self.capacities, self.window_tokens * self.rows_per_token)

    @property
    def granularity(self) -> str:
        """'slot' or 'token' (the gate's)."""
        return self.gate.granularity

    def describe(self) -> dict:
        """JSON-ready: widths, capacities and window (tokens) it places under now, and the
        granularity; what the simulator needs to re-place recorded preferences (trace meta
        `router_config`)."""
        return {"path": str(self.meta.get("path", "")), "bits": list(self.bits),
                "capacities": list(self.capacities), "granularity": self.granularity,
                "window": int(self.window_tokens)}

    def probs(self, layer: int, x: torch.Tensor, weights: torch.Tensor | None = None
              ) -> torch.Tensor:
        """x [T, D] (+ router weights [T, k]) -> gate probabilities [T, K] or [T, k, K]."""
        with torch.no_grad():
            return torch.softmax(self.gate(layer, x, weights), dim=-1)

    def choose_index(self, layer: int, x: torch.Tensor, weights: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """x [T, D], router weights [T, k] -> width index [T] (per token) or [T, k] (per
        slot) into `bits`, capacities enforced over the window's rows."""
        p = self.probs(layer, x, weights)
        self.last_probs[layer] = p
        idx = self.window.place(layer, p.reshape(-1, p.shape[-1])).view(p.shape[:-1])
        self.last_index[layer] = idx  # [T] or [T, k]
        return idx

    def choose(self, layer: int, x: torch.Tensor, weights: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Bits (int64) of each token [T] or (token, slot) [T, k], capacities enforced."""
        return self._bits_t.to(x.device)[self.choose_index(layer, x, weights)]
