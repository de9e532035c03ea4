"""Held-out perplexity with every routed expert dequantized at one uniform bit-width.

One code path for `d2moe eval ppl` and `benchmarks/mwq_accuracy.py`: the expert weights of a
model are quantized (MWQ, bitplane: one nested object per matrix, quantized in memory or read
from a store; RTN: one copy per bit-width), dequantized at b bits with the reference
dequantizers (`d2moe.quant.reference`, `d2moe.quant.rtn`) into a `DenseExperts` backend, and
scored by `d2moe.model.perplexity.perplexity` on the held-out split of the tiny model's
corpus. `fp` is the model's own experts (no backend passed), so it equals `perplexity(model)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from d2moe.core.cliargs import int_ranges, model_field, split_list
from d2moe.core.errors import UserError
from d2moe.core.progress import progress_bar
from d2moe.core.sizes import (
    DEFAULT_STORE_BITS,
    QuantLayout,
    layout_from_options,
    parse_bits_range,
)
from d2moe.quant.mwq import PLANE_FITS
from d2moe.quant.nested import NESTED_KINDS, NestedMatrix
from d2moe.quant.store import TENSORS  # also DenseExperts' parameter names

if TYPE_CHECKING:
    import torch

    from d2moe.core.spec import ModelSpec
    from d2moe.model.moe import DenseExperts
    from d2moe.model.transformer import Transformer

FORMATS = ("mwq", "bitplane", "rtn", "fp")
Key = tuple[int, int, str]  # (layer, expert, tensor)


@dataclass(frozen=True)
class PplConfig:
    """Options of `d2moe eval ppl` (the CLI is built from these fields)."""

    model: str = model_field()
    store: str = field(default="", metadata={
        "help": "nested store from `d2moe quantize` to read the planes from; empty: quantize "
                "the model's experts in memory"})
    format: str = field(default="auto", metadata={
        "help": "mwq, bitplane, rtn or fp, or a comma list (mwq,bitplane,rtn); auto: the "
                "store's format, else bitplane (d2moe quantize's default)"})
    bits: str = field(default="2,3,4,5,6,7,8", metadata={
        "help": "comma list of uniform bit-widths to score (ranges like 2-8 allowed)"})
    store_bits: str = field(default=DEFAULT_STORE_BITS, metadata={
        "help": "b1:bK, the stored range of the nested formats when quantizing in memory "
                "(no --store)"})
    group: int = field(default=64, metadata={"help": "weights per scale group (no --store)"})
    fit: str = field(default="mean", metadata={
        "help": "MWQ plane-scale fit when quantizing in memory: mean (the paper's), halve, "
                "lookahead (d2moe/quant/mwq.py)"})
    heldout_kib: int = field(default=64, metadata={
        "help": "KiB of the held-out corpus split to score (the first files of the split)"})
    ctx: int = field(default=256, metadata={"help": "tokens per scoring window"})
    batch: int = field(default=16, metadata={"help": "windows per forward"})
    progress: bool = field(default=True, metadata={"help": "progress bar on a terminal"})
    router: str = field(default="", metadata={
        "help": "also score a trained bit-width router (DIR, or auto: <store>/router) against "
                "random allocation at its shares and its uniform widths; empty: none"})


@dataclass(frozen=True)
class PplRow:
    """Perplexity of one format at one bit-width (bits 0 and format fp: unquantized)."""

    format: str
    bits: int
    ppl: float
    tokens_scored: int


@dataclass(frozen=True)
class PplTable:
    """Every row of one evaluation, the fp reference and what was scored."""

    rows: tuple[PplRow, ...]
    fp_ppl: float
    tokens_scored: int
    model: str
    source: str  # "in memory (...)" or the store path

    def get(self, fmt: str, bits: int) -> float:
        """Perplexity of `fmt` at `bits`."""
        for r in self.rows:
            if r.format == fmt and r.bits == bits:
                return r.ppl
        raise KeyError((fmt, bits))

    def render(self) -> str:
        """One row per bit-width, one column per format, % above fp in brackets, then fp;
        laid out as the terminal's tables are (`analysis.tables.format_table`)."""
        from d2moe.analysis.tables import format_table

        fmts = list(dict.fromkeys(r.format for r in self.rows if r.format != "fp")) or ["ppl"]
        bits = sorted({r.bits for r in self.rows if r.format != "fp"})
        w = {f: max(len(f"{r.ppl:.4f}") for r in self.rows  # decimal points in line
                    if r.format == f or (f == fmts[0] and r.format == "fp")) for f in fmts}
        rows: list[dict[str, Any]] = [
            {"bits": b, **{f: f"{self.get(f, b):>{w[f]}.4f} "
                              f"({100 * (self.get(f, b) / self.fp_ppl - 1):+.2f}%)"
                           for f in fmts}} for b in bits]
        rows.append({"bits": "fp", fmts[0]: f"{self.fp_ppl:>{w[fmts[0]]}.4f}"})
        return format_table(rows, ["bits", *fmts])


def parse_bits_list(text: str) -> tuple[int, ...]:
    """'2,3,4' or '2-8' or '2-4,8' -> sorted bit-widths (each named once)."""
    return tuple(sorted(int_ranges(text, "bits", example="--bits 2-4,8")))


def parse_formats(text: str, store_kind: str | None) -> tuple[str, ...]:
    """The formats to score; `auto` is the store's kind, else bitplane."""
    if text.strip() == "auto":
        return (store_kind or "bitplane",)
    fmts = tuple(split_list(text, "format", example="--format mwq,bitplane"))
    for f in fmts:
        if f not in FORMATS:
            raise UserError(f"unknown format {f!r}", field="format",
                            fix=f"use {', '.join(FORMATS)} or a comma list of them")
        if store_kind and f in NESTED_KINDS and f != store_kind:
            raise UserError(f"the store holds {store_kind} planes, not {f}", field="format",
                            fix=f"use --format {store_kind} (or rtn/fp), or drop --store")
    return fmts


def check_bits_for(fmt: str, bits: tuple[int, ...], low: int, high: int) -> None:
    """UserError unless every width is in low..high (the nested store's range; rtn: 1..8)."""
    if fmt == "fp":
        return
    if fmt == "rtn":
        low, high = 1, 8
    bad = [b for b in bits if not low <= b <= high]
    if bad:
        where = "RTN" if fmt == "rtn" else f"the {fmt} store's range"
        raise UserError(f"{','.join(map(str, bad))} bits is outside {where} {low}..{high}",
                        field="bits", fix=f"ask for {low}..{high} bits"
                        + ("" if fmt == "rtn" else " (or widen --store-bits / re-quantize)"))


def heldout_ids(model_ref: str, spec: ModelSpec, kib: int) -> list[int]:
    """The first `kib` KiB of the held-out split as token ids (bytes for a byte vocabulary)."""
    from d2moe.model.corpus import load_corpus

    if kib < 1:
        raise UserError(f"need at least 1 KiB, got {kib}", field="heldout_kib",
                        fix="e.g. --heldout-kib 64")
    from d2moe.model.tokenizer import text_codec

    text = load_corpus(1, kib * 1024).heldout  # train split: 1 byte, unused
    encode, _ = text_codec(model_ref, spec.vocab)
    return list(encode(text))


def expert_weights(model: Transformer) -> dict[Key, np.ndarray]:
    """float32 numpy copies of every routed expert matrix of a model loaded with experts."""
    experts = model.experts
    out = {}
    for t in TENSORS:
        w = getattr(experts, t).detach().float().cpu().numpy()  # [L, E, out, in]
        for layer in range(w.shape[0]):
            for e in range(w.shape[1]):
                out[(layer, e, t)] = w[layer, e]
    return out


def nested_matrices(weights: Mapping[Key, np.ndarray], layout: QuantLayout,
                    fit: str = "mean") -> dict[Key, NestedMatrix]:
    """Quantize every matrix into `layout.kind` (MWQ with plane-scale `fit`)."""
    from d2moe.quant.nested import quantize_matrix

    if fit not in PLANE_FITS:
        raise UserError(f"unknown plane-scale fit {fit!r}", field="fit",
                        fix=f"use one of {', '.join(PLANE_FITS)}")
    return {k: quantize_matrix(w, layout, fit=fit) for k, w in weights.items()}


def store_matrices(reader: Any) -> dict[Key, NestedMatrix]:
    """Every expert matrix of an open `StoreReader`, at the store's highest width."""
    layers = sorted({e.layer for e in reader.entries.values()})
    out = {}
    for layer in layers:
        experts = sorted({e.expert for e in reader.entries.values() if e.layer == layer})
        for e in experts:
            for t, m in reader.read_expert(layer, e, reader.bits_stored).items():
                out[(layer, e, t)] = m
    return out


def dequantizer(fmt: str, *, nested: Mapping[Key, NestedMatrix] | None = None,
                weights: Mapping[Key, np.ndarray] | None = None,
                group: int = 64) -> Callable[[Key, int], torch.Tensor]:
    """(key, bits) -> float32 weights of that matrix in `fmt` at `bits`."""
    import torch

    if fmt in NESTED_KINDS:
        from d2moe.quant.reference import dequantize

        assert nested is not None
        return lambda key, bits: dequantize(nested[key], bits)
    if fmt == "rtn":
        from d2moe.quant.rtn import dequantize_rtn, quantize_rtn

        assert weights is not None
        return lambda key, bits: torch.from_numpy(
            dequantize_rtn(quantize_rtn(weights[key], bits=bits, group=group)))
    raise UserError(f"{fmt!r} has no quantized weights", field="format",
                    fix="use mwq, bitplane or rtn")


def dense_backend(spec: ModelSpec, weight_of: Callable[[Key], torch.Tensor]) -> DenseExperts:
    """A `DenseExperts` whose every matrix is `weight_of((layer, expert, tensor))`."""
    import torch

    from d2moe.model.moe import DenseExperts

    backend = DenseExperts(spec)
    with torch.inference_mode():
        for t in TENSORS:
            param = getattr(backend, t)
            for layer in range(spec.layers):
                for e in range(spec.experts):
                    param[layer, e].copy_(weight_of((layer, e, t)))
    return backend.eval().requires_grad_(False)


def eval_ppl(cfg: PplConfig) -> PplTable:
    """Score the model at every requested (format, bit-width), plus fp."""
    from d2moe.model.load import load_model
    from d2moe.model.perplexity import perplexity

    if cfg.group < 1:
        raise UserError(f"group must be positive, got {cfg.group}", field="group",
                        fix="e.g. --group 64")
    if cfg.fit not in PLANE_FITS:
        raise UserError(f"unknown plane-scale fit {cfg.fit!r}", field="fit",
                        fix=f"use one of {', '.join(PLANE_FITS)}")
    if cfg.heldout_kib < 1:
        raise UserError(f"need at least 1 KiB, got {cfg.heldout_kib}", field="heldout_kib",
                        fix="e.g. --heldout-kib 64")
    if cfg.ctx < 2 or cfg.batch < 1:
        raise UserError(f"need ctx >= 2 and batch >= 1, got {cfg.ctx} and {cfg.batch}",
                        field="ctx" if cfg.ctx < 2 else "batch", fix="e.g. --ctx 256 --batch 16")
    bits = parse_bits_list(cfg.bits)
    reader = None
    if cfg.store:
        from d2moe.quant.store import StoreReader

        reader = StoreReader(cfg.store)
    try:
        fmts = parse_formats(cfg.format, reader.layout.kind if reader else None)
        if reader is not None:
            low, high, group = reader.layout.b1, reader.bits_stored, reader.layout.group
        else:
            low, high = parse_bits_range(cfg.store_bits, "store-bits")
            layout_from_options("bitplane", low, high, cfg.group)
            group = cfg.group
        for f in fmts:
            check_bits_for(f, bits, low, high)
        model, spec = load_model(cfg.model)
        if reader is not None:
            from d2moe.executor.setup import check_match

            check_match(spec, reader, cfg.store, cfg.model)
        ids = heldout_ids(cfg.model, spec, cfg.heldout_kib)
        weights = expert_weights(model)
        quant = [f for f in fmts if f != "fp"]
        bar = progress_bar(1 + len(quant) * len(bits), cfg.progress, "eval ppl", "run")

        def score(backend: Any) -> Any:
            p = perplexity(model, ids, ctx=cfg.ctx, batch=cfg.batch, backend=backend)
            if bar is not None:
                bar.update(1)
            return p

        fp = score(None)
        rows = [PplRow("fp", 0, fp.ppl, fp.tokens_scored)]
        for f in quant:
            nested = None
            if f in NESTED_KINDS:
                nested = store_matrices(reader) if reader is not None else nested_matrices(
                    weights, QuantLayout(kind=f, b1=low, bK=high, group=cfg.group), cfg.fit)
            deq = dequantizer(f, nested=nested, weights=weights, group=group)
            for b in bits:
                p = score(dense_backend(spec, lambda key, b=b, deq=deq: deq(key, b)))
                rows.append(PplRow(f, b, p.ppl, p.tokens_scored))
        if bar is not None:
            bar.close()
    finally:
        if reader is not None:
            reader.close()
    source = cfg.store or (f"quantized in memory, b1:bK {low}:{high}, group {cfg.group}"
                           + (f", MWQ fit {cfg.fit}" if "mwq" in fmts else ""))
    return PplTable(rows=tuple(rows), fp_ppl=fp.ppl, tokens_scored=fp.tokens_scored,
                    model=cfg.model, source=source)
