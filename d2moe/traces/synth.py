"""Synthetic workload traces: skewed, local, cross-layer-correlated routing, capacity-bound bits.

The generator (deterministic given `seed`, all numpy, one pass per layer):
- popularity: at layer l, expert of rank r has weight r^-zipf; each layer gets its own random
  permutation of ranks over expert ids (`layer_popularity`).
- a "fresh" token draws its top-k without replacement in proportion to popularity (Gumbel
  top-k: keys = log p + Gumbel noise, take the k largest).
- cross_layer: each slot of a fresh token at layer l >= 1 follows, with this chance, a fixed
  per-layer permutation `maps[l-1]` of the token's expert at layer l-1 (forced into the top-k).
- locality: with this chance a token (not the first of its sequence) reuses the previous token
  of its sequence's whole top-k at that layer.
- router weights: softmax over k normal logits (std `logit_std`), sorted so slot 0 is heaviest.
- bits (per token and layer, shared by its k slots): each token ranks the bit-widths at random
  (Plackett-Luce with weights = capacities); in rounds, each bit-width accepts proposers in
  token order up to ceil(c_k * tokens of the step); the rest fall to their next preference.
Layout: batch sequences, each prefill_tokens prompt tokens then decode_steps tokens. Step 0
(if prefill_tokens > 0) holds every sequence's prompt; each decode step holds one token per
sequence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from d2moe.core.cliargs import once_each, split_list
from d2moe.core.errors import UserError
from d2moe.core.spec import ModelSpec
from d2moe.traces.schema import DECODE, MAX_BITS, PREFILL, Trace

_CAP_EPS = 1e-9  # ceil(c*n - eps): 0.3 * 10 must give 3, not 4
# Largest zipf: r^-zipf stays above 0 in float64 for r up to e^(744/50), 2.9 million experts;
# beyond it low ranks underflow to weight 0, log 0 = -inf, and the Gumbel top-k then breaks
# their ties by expert id instead of rank. At 50, rank 2 weighs 2^-50 of rank 1 already.
ZIPF_MAX = 50.0


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the synthetic trace generator (the CLI is built from these fields)."""

    seed: int = field(default=0, metadata={"help": "random seed; same seed, same trace"})
    prefill_tokens: int = field(default=64, metadata={
        "help": "prompt length per sequence (0: no prefill step)"})
    decode_steps: int = field(default=128, metadata={"help": "decode steps after the prompt"})
    batch: int = field(default=1, metadata={
        "help": "sequences decoded together (tokens per decode step)"})
    zipf: float = field(default=0.8, metadata={
        "help": f"per-layer expert popularity skew exponent, 0 (uniform) to {ZIPF_MAX:g}"})
    locality: float = field(default=0.3, metadata={
        "help": "chance a token reuses the previous token's experts at a layer"})
    cross_layer: float = field(default=0.3, metadata={
        "help": "chance a token's expert at layer l+1 follows a fixed map of its expert at l"})
    bits: str = field(default="2,3,4", metadata={
        "help": "candidate bit-widths, comma-separated ('' leaves bits unknown)",
        "metavar": "B1,B2,..."})
    capacities: str = field(default="0.3,0.4,0.3", metadata={
        "help": "per-bit-width capacity fractions of a step's tokens (sum >= 1)",
        "metavar": "C1,C2,..."})
    logit_std: float = field(default=1.0, metadata={
        "help": "spread of the router logits (larger: heavier top-1 weight)"})

    def __post_init__(self) -> None:
        for name in ("prefill_tokens", "decode_steps", "seed"):
            if getattr(self, name) < 0:
                raise UserError(f"must be >= 0, got {getattr(self, name)}", field=name,
                                fix="pass a non-negative integer")
        if self.prefill_tokens + self.decode_steps == 0:
            raise UserError("the trace would be empty", field="decode_steps",
                            fix="ask for prefill tokens or decode steps")
        if self.batch < 1:
            raise UserError(f"must be >= 1, got {self.batch}", field="batch", fix="pass >= 1")
        if not 0 <= self.zipf <= ZIPF_MAX:  # NaN fails too
            raise UserError(f"must be in [0, {ZIPF_MAX:g}], got {self.zipf}", field="zipf",
                            fix=f"e.g. 0.8 ({ZIPF_MAX:g} already puts all but the top ranks "
                                "at weight ~0)")
        for name in ("locality", "cross_layer"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"must be a probability in [0, 1], got {getattr(self, name)}",
                                field=name, fix="e.g. 0.3")
        if not (self.logit_std >= 0 and math.isfinite(self.logit_std)):
            raise UserError(f"must be >= 0, got {self.logit_std}", field="logit_std",
                            fix="e.g. 1.0")
        bits, caps = self.bit_choices, self.capacity_fractions
        if len(set(bits)) != len(bits) or any(not 1 <= b <= MAX_BITS for b in bits):
            raise UserError(f"need distinct bit-widths in 1..{MAX_BITS}, got {self.bits!r}",
                            field="bits", fix="e.g. --bits 2,3,4")
        if len(caps) != len(bits):
            raise UserError(f"{len(caps)} capacities for {len(bits)} bit-widths",
                            field="capacities", fix="give one capacity per bit-width")
        if bits and (any(not 0 <= c <= 1 for c in caps) or sum(caps) < 1 - _CAP_EPS):
            raise UserError(f"capacities must lie in [0, 1] and sum to >= 1, got "
                            f"{self.capacities!r}", field="capacities",
                            fix="e.g. --capacities 0.3,0.4,0.3")

    @property
    def bit_choices(self) -> tuple[int, ...]:
        """`bits` parsed: () when bits are left unknown."""
        return _parse_list(self.bits, int, "bits", "--bits 2,3,4", unique=True)

    @property
    def capacity_fractions(self) -> tuple[float, ...]:
        """`capacities` parsed."""
        if not self.bits.strip():
            return ()
        return _parse_list(self.capacities, float, "capacities", "--capacities 0.3,0.4,0.3",
                           unique=False)


def _parse_list(text: str, kind: type, name: str, example: str, *, unique: bool) -> tuple:
    """A comma list of `kind`; '' is (). Capacities may repeat (0.5,0.5), bit-widths not."""
    parts = split_list(text, name, example=example, unique=unique, allow_none=True)
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        raise UserError(f"cannot read {text!r} as a comma-separated list of {kind.__name__}",
                        field=name, fix=f"write e.g. {example}") from None
    return tuple(once_each(list(values), parts, name, example=example)) if unique else values


def layer_popularity(spec: ModelSpec, cfg: SynthConfig) -> np.ndarray:
    """[layers, experts] routing popularity (rows sum to 1) that `synth_trace` draws from."""
    rng = np.random.default_rng(cfg.seed)
    return _popularity(rng, spec.layers, spec.experts, cfg.zipf)


def layer_maps(spec: ModelSpec, cfg: SynthConfig) -> np.ndarray:
    """[layers-1, experts] the cross-layer permutations: expert e at l maps to maps[l, e] at l+1."""
    rng = np.random.default_rng(cfg.seed)
    _popularity(rng, spec.layers, spec.experts, cfg.zipf)
    return _maps(rng, spec.layers, spec.experts)


def _popularity(rng: np.random.Generator, L: int, E: int, zipf: float) -> np.ndarray:
    base = np.arange(1, E + 1, dtype=np.float64) ** -zipf  # Zipf weight of rank r: r^-s
    base /= base.sum()
    perms = np.stack([rng.permutation(E) for _ in range(L)])  # perms[l, r] = expert of rank r
    pop = np.empty((L, E))
    np.put_along_axis(pop, perms, np.broadcast_to(base, (L, E)), axis=1)
    return pop


def _maps(rng: np.random.Generator, L: int, E: int) -> np.ndarray:
    if L < 2:
        return np.zeros((0, E), dtype=np.int64)
    return np.stack([rng.permutation(E) for _ in range(L - 1)])


def _step_order(batch: int, prefill: int, decode: int) -> tuple[np.ndarray, list[int], list[int]]:
    """Rows in step order from sequence-major rows (seq * T + pos); phases; tokens per step."""
    T = prefill + decode
    seq = np.arange(batch)[:, None] * T
    pre = (seq + np.arange(prefill)[None, :]).ravel()
    dec = (seq.T + prefill + np.arange(decode)[:, None]).ravel()  # [decode, batch]
    phases = ([PREFILL] if prefill else []) + [DECODE] * decode
    counts = ([batch * prefill] if prefill else []) + [batch] * decode
    return np.concatenate([pre, dec]), phases, counts


def _draw_experts(rng: np.random.Generator, pop: np.ndarray, maps: np.ndarray, k: int,
                  n: int, T: int, cfg: SynthConfig, bar: Any = None) -> np.ndarray:
    """[n, L, k] expert ids for sequence-major tokens (seq * T + pos); `bar` advances by
    one per layer."""
    L, E = pop.shape
    first = (np.arange(n) % T) == 0  # first token of a sequence never reuses
    rows = np.arange(n)
    out = np.empty((n, L, k), dtype=np.int16)
    for layer in range(L):
        reuse = (rng.random(n) < cfg.locality) & ~first
        keys = np.log(pop[layer])[None, :] + rng.gumbel(size=(n, E))
        cross = rng.random((n, k)) < cfg.cross_layer
        if layer > 0:
            mapped = maps[layer - 1][out[:, layer - 1, :]]
            r, c = np.nonzero(cross)
            keys[r, mapped[r, c]] = np.inf  # forced in; a permutation keeps them distinct
        chosen = np.argsort(-keys, axis=1, kind="stable")[:, :k]
        # forward-fill: a reusing token copies the nearest earlier fresh token of its sequence
        src = np.maximum.accumulate(np.where(reuse, 0, rows))
        out[:, layer, :] = chosen[src]
        if bar:
            bar.update(1)
    return out


def _draw_bits(rng: np.random.Generator, counts: list[int], L: int,
               cfg: SynthConfig) -> np.ndarray:
    """[N, L] bit-widths per token and layer under per-step capacities."""
    choices, caps = np.array(cfg.bit_choices), np.array(cfg.capacity_fractions)
    n, K = sum(counts), len(choices)
    with np.errstate(divide="ignore"):
        pref_keys = np.log(caps)[None, None, :] + rng.gumbel(size=(n, L, K))
    pref = np.argsort(-pref_keys, axis=2, kind="stable").reshape(n * L, K)
    step_of = np.repeat(np.arange(len(counts)), counts)
    group = (step_of[:, None] * L + np.arange(L)[None, :]).ravel()  # rows in token order
    tokens = np.repeat(np.asarray(counts), L)  # tokens of each (step, layer) group
    remaining = np.ceil(caps[None, :] * tokens[:, None] - _CAP_EPS).astype(np.int64).ravel()
    assigned = np.full(n * L, -1, dtype=np.int64)
    for r in range(K):
        m = np.flatnonzero(assigned < 0)
        if not m.size:
            break
        gk = group[m] * K + pref[m, r]
        order = np.argsort(gk, kind="stable")  # stable: token order within a group
        gk_s = gk[order]
        idx = np.arange(len(gk_s))
        rank = idx - np.maximum.accumulate(np.where(np.r_[True, gk_s[1:] != gk_s[:-1]], idx, 0))
        ok = rank < remaining[gk_s]
        assigned[m[order][ok]] = pref[m[order][ok], r]
        remaining -= np.bincount(gk_s[ok], minlength=len(remaining))
    # sum(caps) >= 1 guarantees every token found room (a full bit-width stays full)
    assert (assigned >= 0).all()
    return choices[assigned].reshape(n, L)


def synth_units(spec: ModelSpec) -> int:
    """The units `synth_trace` advances a progress bar by: one per layer's experts, one for
    the router weights, one for the bits."""
    return spec.layers + 2


def synth_trace(spec: ModelSpec, cfg: SynthConfig, bar: Any = None) -> Trace:
    """A synthetic trace for `spec`, deterministic given `cfg.seed`; `bar` (a progress bar
    from d2moe.core.progress, or None) advances by `synth_units(spec)` (millions of tokens
    take minutes). The bar draws no random numbers: the trace is the same with or without."""
    rng = np.random.default_rng(cfg.seed)
    L, E, k = spec.layers, spec.experts, spec.top_k
    pop = _popularity(rng, L, E, cfg.zipf)
    maps = _maps(rng, L, E)
    T = cfg.prefill_tokens + cfg.decode_steps
    n = cfg.batch * T
    experts_seq = _draw_experts(rng, pop, maps, k, n, T, cfg, bar)
    order, phases, counts = _step_order(cfg.batch, cfg.prefill_tokens, cfg.decode_steps)
    experts = experts_seq[order]
    logits = rng.normal(0.0, cfg.logit_std, size=(n, L, k))
    w = np.exp(logits - logits.max(axis=2, keepdims=True))
    weights = -np.sort(-(w / w.sum(axis=2, keepdims=True)), axis=2)  # slot 0 heaviest
    if bar:
        bar.update(1)
    if cfg.bit_choices:
        bits = np.broadcast_to(_draw_bits(rng, counts, L, cfg)[:, :, None], (n, L, k))
    else:
        bits = np.zeros((n, L, k), dtype=np.int8)
    if bar:
        bar.update(1)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    meta = {"source": "synth", "seed": cfg.seed, "generator": asdict(cfg)}
    return Trace(spec.name, E, phases, offsets, experts, weights.astype(np.float32), bits, meta)
