"""Perplexity with per-token or per-slot bit-widths: the trained router, one uniform width,
or random allocation at the router's measured shares (the same average bits), all through
`BitRoutedExperts` and `d2moe.model.perplexity.perplexity` (the code of `d2moe eval ppl`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from d2moe.router.experts import (
    BitRoutedExperts,
    Chooser,
    RandomChooser,
    UniformChooser,
    WidthWeights,
)


@dataclass(frozen=True)
class RoutedPpl:
    """Perplexity at per-token widths, the mean bits and each layer's share per width."""

    label: str
    ppl: float
    avg_bits: float
    shares: tuple[tuple[float, ...], ...]  # [L][K]
    tokens_scored: int


def routed_ppl(model: Any, ids: list[int], weights: WidthWeights, chooser: Chooser, label: str, *,
               ctx: int = 256, batch: int = 16) -> RoutedPpl:
    """Score `model` with every token's experts at the width `chooser` picks."""
    from d2moe.model.perplexity import perplexity

    backend = BitRoutedExperts(weights, chooser)
    backend.reset()
    shares: dict[int, torch.Tensor] = {}
    inner = backend.chooser

    class _Counting:
        def choose_index(self, layer: int, x: torch.Tensor, slot_w: torch.Tensor
                         ) -> torch.Tensor:
            idx = inner.choose_index(layer, x, slot_w)  # [T] or [T, k]
            c = torch.bincount(idx.flatten().cpu(), minlength=len(weights.bits))
            shares[layer] = shares.get(layer, torch.zeros_like(c)) + c
            return idx

    backend.chooser = _Counting()
    p = perplexity(model, ids, ctx=ctx, batch=batch, backend=backend)
    per_layer = tuple(tuple((shares[layer].double() / shares[layer].sum()).tolist())
                      for layer in sorted(shares))
    return RoutedPpl(label, p.ppl, backend.average_bits(), per_layer, p.tokens_scored)


def uniform_ppl(model: Any, ids: list[int], weights: WidthWeights, k: int, **kw: Any) -> RoutedPpl:
    """Every token at width index k."""
    return routed_ppl(model, ids, weights, UniformChooser(k), f"uniform {weights.bits[k]}", **kw)


def random_ppl(model: Any, ids: list[int], weights: WidthWeights,
               shares: tuple[tuple[float, ...], ...], seed: int = 0, per_slot: bool = False,
               **kw: Any) -> RoutedPpl:
    """Random allocation with each layer's `shares` (exact counts per forward), seeded; per
    (token, slot) or per token."""
    chooser = RandomChooser(shares, seed=seed, per_slot=per_slot)
    return routed_ppl(model, ids, weights, chooser, "random", **kw)


def describe(r: RoutedPpl, bits: tuple[int, ...]) -> str:
    """One line: label, perplexity, average bits and the overall share per width."""
    k = len(bits)
    overall = [sum(s[i] for s in r.shares) / len(r.shares) for i in range(k)]
    mix = ", ".join(f"{b}: {v:.1%}" for b, v in zip(bits, overall, strict=True))
    return f"{r.label}: perplexity {r.ppl:.4f} at {r.avg_bits:.3f} average bits ({mix})"


def open_router(model_ref: str, spec: Any, store: str, router_ref: str) -> tuple[Any, Any]:
    """(BitRouter, WidthWeights): the router checked against the model and the store (given,
    else the one it was trained on, else tiny's cached store) and its widths dequantized."""
    import json

    from d2moe.router.store import META_FILE, load_router, resolve
    from d2moe.router.train import check_store, open_store

    if router_ref == "auto" and not store:  # beside tiny's cached store (else UserError)
        reader, found = open_store(model_ref, "")
        reader.close()
        store = str(found)
    path = resolve(router_ref, store or None)
    if not store and (path / META_FILE).is_file():
        try:
            store = str(json.loads((path / META_FILE).read_text()).get("store") or "")
        except (json.JSONDecodeError, AttributeError):
            store = ""  # load_router below reports the malformed record
    reader, store_path = open_store(model_ref, store)
    try:
        router = load_router(path, spec=spec, store_bits=(reader.layout.b1, reader.bits_stored),
                             store_layout=reader.layout, store_source=reader.source)
        check_store(reader, spec, router.bits, store_path, model_ref)
        weights = WidthWeights.from_store(reader, router.bits)
    finally:
        reader.close()
    return router, weights


def routed_backend(model_ref: str, spec: Any, store: str, router_ref: str) -> BitRoutedExperts:
    """The resident backend running each token at the router's live choice."""
    router, weights = open_router(model_ref, spec, store, router_ref)
    return BitRoutedExperts(weights, router)


def router_report(model_ref: str, store: str, router_ref: str, *, heldout_kib: int = 64,
                  ctx: int = 256, batch: int = 16, seed: int = 0) -> list[str]:
    """`d2moe eval ppl --router`: the router's perplexity and mean bits, random allocation at
    the same shares, and each uniform width of the router, as printable lines."""
    from d2moe.eval.ppl import heldout_ids
    from d2moe.model.load import load_model

    model, spec = load_model(model_ref)
    router, weights = open_router(model_ref, spec, store, router_ref)
    ids = heldout_ids(model_ref, spec, heldout_kib)
    kw = {"ctx": ctx, "batch": batch}
    mine = routed_ppl(model, ids, weights, router, f"router {router.meta['path']}", **kw)
    rows = [mine, random_ppl(model, ids, weights, mine.shares, seed=seed,
                             per_slot=router.granularity == "slot", **kw)]
    rows += [uniform_ppl(model, ids, weights, k, **kw) for k in range(len(router.bits))]
    return [describe(r, router.bits) for r in rows]
