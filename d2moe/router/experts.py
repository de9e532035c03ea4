"""Resident expert backends that run every token at its chosen bit-width.

`WidthWeights` holds each expert dequantized at each candidate width (the store's nested
levels read once and dequantized with `d2moe.quant.reference`: for the tiny model 3.5 M
weights x K widths, small). `BitRoutedExperts` is the inference backend (any chooser: the
trained router, one uniform width, random allocation) and the reference the executor is
tested against; `MixExperts` is the training backend: every token runs at all K widths and the
outputs are mixed by the straight-through one-hot of `gate.relaxed_choice`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from d2moe.core.spec import ModelSpec
from d2moe.model.moe import swiglu
from d2moe.quant.nested import NestedMatrix
from d2moe.quant.store import TENSORS, StoreReader
from d2moe.router.capacity import CapacityWindow, assign, capacity_counts
from d2moe.router.gate import BitGate, relaxed_choice

_CACHE: dict[tuple, WidthWeights] = {}  # WidthWeights.from_store, newest last


@dataclass(frozen=True)
class WidthWeights:
    """w1, w3 [K, L, E, F, D] and w2 [K, L, E, D, F]: every expert at every width in `bits`."""

    bits: tuple[int, ...]
    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor

    @classmethod
    def from_nested(cls, nested: dict[tuple[int, int, str], NestedMatrix], spec: ModelSpec,
                    bits: Sequence[int]) -> WidthWeights:
        """From {(layer, expert, tensor): NestedMatrix} (the store's or in-memory)."""
        from d2moe.quant.reference import dequantize

        out = {}
        for t in TENSORS:
            mats = [[[dequantize(nested[(layer, e, t)], b) for e in range(spec.experts)]
                     for layer in range(spec.layers)] for b in bits]
            out[t] = torch.stack([torch.stack([torch.stack(row) for row in per_layer])
                                  for per_layer in mats])  # [K, L, E, out, in]
        return cls(tuple(bits), out["w1"], out["w3"], out["w2"])

    @classmethod
    def from_store(cls, reader: StoreReader, bits: Sequence[int]) -> WidthWeights:
        """From an open `StoreReader` (every expert read once at its highest width); the last
        two results are kept per (store, index mtime, widths): dequantizing costs seconds."""
        index = Path(reader.path) / "index.json"
        key = (str(Path(reader.path).resolve()), index.stat().st_mtime_ns, tuple(bits))
        hit = _CACHE.get(key)
        if hit is None:
            from d2moe.eval.ppl import store_matrices

            hit = cls.from_nested(store_matrices(reader), reader.spec, bits)
            _CACHE[key] = hit
            while len(_CACHE) > 2:
                _CACHE.pop(next(iter(_CACHE)))
        return hit

    def expert(self, k: int, layer: int, e: int) -> tuple[torch.Tensor, ...]:
        """(w1, w3, w2) of expert e of `layer` at width index k."""
        return self.w1[k, layer, e], self.w3[k, layer, e], self.w2[k, layer, e]

    def to(self, device: torch.device | str) -> WidthWeights:
        """A copy on `device`."""
        return WidthWeights(self.bits, self.w1.to(device), self.w3.to(device),
                            self.w2.to(device))


class Chooser(Protocol):
    """Picks a width index per token or per (token, slot) of one layer's call."""

    def choose_index(self, layer: int, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], router weights [T, k] -> index [T] or [T, k] into the widths."""
        ...


class UniformChooser:
    """Every token at width index `k`."""

    def __init__(self, k: int) -> None:
        self.k = k

    def choose_index(self, layer: int, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """All tokens at `k`."""
        return torch.full((x.shape[0],), self.k, dtype=torch.long, device=x.device)

    def reset(self) -> None:
        """Stateless."""


class RandomChooser:
    """Random allocation with exact per-width shares (per layer), seeded: the baseline at
    the same average bits as a router whose measured shares are `shares[layer]`; per slot
    (`per_slot`) or per token, like the router it stands beside."""

    def __init__(self, shares: Sequence[Sequence[float]], seed: int = 0, window: int = 64,
                 per_slot: bool = False) -> None:
        self.shares = [tuple(s) for s in shares]
        self.seed, self.window, self.per_slot = seed, window, per_slot
        self.reset()

    def reset(self) -> None:
        """Restart the random stream and the decode windows."""
        self.gen = torch.Generator().manual_seed(self.seed)
        self.windows = [CapacityWindow(s, self.window) for s in self.shares]

    def choose_index(self, layer: int, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """A random preference order per row, placed under the layer's shares."""
        rows = weights.shape if self.per_slot else weights.shape[:1]  # [T, k] or [T]
        noise = torch.rand((*rows, len(self.shares[layer])), generator=self.gen)  # [.., K]
        idx = self.windows[layer].place(layer, noise.reshape(-1, noise.shape[-1]))
        return idx.view(rows).to(x.device)


class BitRoutedExperts:
    """Inference backend: each token's experts at the width its chooser picks (resident)."""

    def __init__(self, weights: WidthWeights, chooser: Chooser) -> None:
        self.weights, self.chooser = weights, chooser
        self.last_index: dict[int, torch.Tensor] = {}  # layer -> width index [T] of last call
        self.counts = torch.zeros(len(weights.bits), dtype=torch.long)  # expert runs per width

    def reset(self) -> None:
        """Reset the chooser's state and the counts."""
        if hasattr(self.chooser, "reset"):
            self.chooser.reset()
        self.counts.zero_()
        self.last_index.clear()

    def token_bits(self) -> torch.Tensor:
        """Bits [T, L, k] of the last forward's (token, slot) runs (for trace recording)."""
        bits = torch.tensor(self.weights.bits)
        return torch.stack([bits[self.last_index[layer].cpu()]
                            for layer in sorted(self.last_index)], dim=1)

    def token_prefs(self) -> torch.Tensor:
        """Gate probabilities [T, L, k, K] (fp32) of the last forward's (token, slot) rows,
        for trace recording: the simulator re-places them under moved capacities. A per-token
        router's row repeats over the token's k slots. Needs a chooser that keeps
        `last_probs` (the `BitRouter`)."""
        probs = getattr(self.chooser, "last_probs", None)
        if not probs:
            raise ValueError("the chooser keeps no gate probabilities (not a BitRouter)")
        k = self.last_index[min(self.last_index)].shape[1]
        per_layer = [probs[layer].float().cpu() for layer in sorted(probs)]
        return torch.stack([p if p.dim() == 3 else p[:, None, :].expand(-1, k, -1)
                            for p in per_layer], dim=1)  # [T, L, k, K]

    def average_bits(self) -> float:
        """Mean bits over every (token, slot, layer) expert run so far."""
        bits = torch.tensor(self.weights.bits, dtype=torch.float64)
        return float((self.counts * bits).sum() / self.counts.sum())

    def run_layer(self, layer: int, x: torch.Tensor, ids: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], ids/weights [T, k] -> Σ_k weights · expert_k at each token's width."""
        idx = self.chooser.choose_index(layer, x, weights)  # [T] or [T, k]
        slot_w = idx if idx.dim() == 2 else idx[:, None].expand_as(ids)  # [T, k] slot widths
        self.last_index[layer] = slot_w
        self.counts += torch.bincount(slot_w.flatten().cpu(), minlength=len(self.weights.bits))
        out = torch.zeros_like(x)  # [T, D]
        key = ids * len(self.weights.bits) + slot_w  # [T, k] (expert, width)
        for kk in torch.unique(key).tolist():
            e, w = divmod(kk, len(self.weights.bits))
            tok, slot = (key == kk).nonzero(as_tuple=True)
            y = swiglu(x[tok], *self.weights.expert(w, layer, e))  # [n, D]
            out.index_add_(0, tok, y * weights[tok, slot, None].to(y.dtype))
        return out


class MixExperts:
    """Training backend: all K widths per routed (token, slot), mixed by the straight-through
    one-hot of the capacity-constrained choice; keeps each layer's gate probabilities (one row
    per token or per slot, as the gate decides) for the loss."""

    def __init__(self, weights: WidthWeights, gate: BitGate, capacities: Sequence[float], *,
                 tau: float = 1.0, relax: str = "st", generator: torch.Generator | None = None
                 ) -> None:
        self.weights, self.gate, self.capacities = weights, gate, tuple(capacities)
        self.tau, self.relax, self.gen = tau, relax, generator
        self.probs: list[torch.Tensor] = []  # per layer [rows, K], this forward
        self.index: list[torch.Tensor] = []  # per layer [T] or [T, k], this forward

    def clear(self) -> None:
        """Forget the last forward's probabilities."""
        self.probs, self.index = [], []

    def run_layer(self, layer: int, x: torch.Tensor, ids: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> Σ_k weights · Σ_w z[t, k, w] · expert_k^w(x) [T, D]."""
        logits = self.gate(layer, x, weights)  # [T, K] or [T, k, K]
        noisy = logits
        if self.relax == "gumbel":
            u = torch.rand(logits.shape, generator=self.gen).clamp_(1e-9, 1 - 1e-9)
            noisy = logits - torch.log(-torch.log(u)).to(logits.device)  # + Gumbel(0, 1)
        rows = noisy.reshape(-1, noisy.shape[-1])  # [R, K], R = T or T*k
        idx = assign(torch.softmax(rows.detach(), -1),
                     capacity_counts(self.capacities, rows.shape[0]))  # [R]
        z = relaxed_choice(rows, idx, self.tau).view(noisy.shape)  # one-hot fwd, soft bwd
        if z.dim() == 2:  # per token: every slot of the token at its width
            z = z[:, None, :].expand(*ids.shape, z.shape[-1])  # [T, k, K]
        self.probs.append(torch.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1))
        self.index.append(idx.view(noisy.shape[:-1]))
        ww = self.weights
        out = torch.zeros_like(x)  # [T, D]
        for e in torch.unique(ids).tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            xe = x[tok]  # [n, D]
            w1, w3, w2 = ww.w1[:, layer, e], ww.w3[:, layer, e], ww.w2[:, layer, e]
            h = torch.nn.functional.silu(torch.einsum("nd,kfd->knf", xe, w1)) \
                * torch.einsum("nd,kfd->knf", xe, w3)  # [K, n, F]
            y = torch.einsum("knf,kdf->knd", h, w2)  # [K, n, D]
            mix = torch.einsum("nk,knd->nd", z[tok, slot].to(y.dtype), y)  # [n, D]
            out = out.index_add(0, tok, mix * weights[tok, slot, None].to(y.dtype))
        return out
