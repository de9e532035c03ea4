"""`d2moe trace synth`, `d2moe trace record` and `d2moe trace info`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from d2moe.core.cliargs import add_fields, add_out_option, from_args, model_field
from d2moe.core.fileio import check_writable
from d2moe.core.progress import progress_bar
from d2moe.core.spec import load_spec
from d2moe.traces.schema import DECODE, MAX_BITS, PREFILL, Trace, load_trace, save_trace
from d2moe.traces.synth import SynthConfig, synth_trace, synth_units

TRACE_OUT = "out/trace.npz"  # where synth and record write the trace by default (as
# every verb writes under out/)


@dataclass(frozen=True)
class RecordConfig:
    """Options of `d2moe trace record` (the CLI is built from these fields); the trace's
    shape defaults to a synthetic trace's (SynthConfig)."""

    model: str = model_field(help_text="the built-in tiny model or an HF checkpoint directory",
                             metavar="tiny|DIR")
    text: str = field(default="", metadata={
        "help": "text to run over (default: the tiny model's held-out split)",
        "metavar": "FILE"})
    prefill_tokens: int = field(default=SynthConfig.prefill_tokens, metadata={
        "help": "tokens of the prefill step"})
    decode_steps: int = field(default=SynthConfig.decode_steps, metadata={
        "help": "one-token steps after it"})
    bits: int = field(default=0, metadata={
        "help": "label every slot with this bit-width (default: 0, unknown)"})
    router: str = field(default="", metadata={
        "help": "a trained bit-width router: the experts run at its widths (dequantized from "
                "--store) and the trace carries them, with its gate probabilities (`prefs`: "
                "d2moe simulate --capacity-mode adaptive re-places them); empty: none, --bits "
                "labels the slots",
        "metavar": "DIR|auto"})
    store: str = field(default="", metadata={
        "help": "nested store for --router (default: the router's own store)",
        "metavar": "DIR"})
    out: str = field(default=TRACE_OUT, metadata={"help": "where to write the trace",
                                                  "metavar": "FILE.npz"})


def register(subparsers: Any) -> None:
    """Add the `trace` verb with its `synth`, `record` and `info` actions."""
    parser = subparsers.add_parser("trace", help="synthesize or inspect workload traces",
                                   description="Workload traces: per step and layer, each "
                                               "token's top-k experts, router weights, bits.")
    actions = parser.add_subparsers(dest="trace_action", metavar="ACTION")
    parser.set_defaults(func=lambda _args: (parser.print_help(), 2)[1])

    synth = actions.add_parser("synth", help="write a synthetic trace",
                               description="Write a synthetic trace (skewed, local, "
                                           "cross-layer-correlated routing; capacity-bound bits).")
    synth.add_argument("--model-spec", default="mixtral-8x7b", metavar="NAME|PATH",
                       help="shipped spec name, spec YAML or HF config.json "
                            "(default: mixtral-8x7b)")
    add_fields(synth, SynthConfig)
    add_out_option(synth, default=TRACE_OUT, metavar="FILE.npz",
                   help_text="where to write the trace")
    synth.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction,
                       help="show a progress bar on a terminal when it takes over a second "
                            "(default: True)")
    synth.set_defaults(func=_synth)

    rec = actions.add_parser("record", help="record a trace from a real model's routing",
                             description="Run a real model (needs torch) over a text: one "
                                         "prefill step, then teacher-forced decode steps; "
                                         "write every layer's top-k ids and router weights.")
    add_fields(rec, RecordConfig)
    rec.set_defaults(func=_record)

    info = actions.add_parser("info", help="summarize a trace",
                              description="Print steps, tokens, phases, per-layer expert "
                                          "popularity, step-to-step reuse and bits histogram.")
    info.add_argument("file", metavar="FILE", help="a trace .npz")
    info.set_defaults(func=_info)


def _synth(args: argparse.Namespace) -> int:
    spec = load_spec(args.model_spec)
    check_writable(args.out, field="out")  # before the work (not inside a store, ...)
    cfg = from_args(SynthConfig, args)
    bar = progress_bar(synth_units(spec) + 1, args.progress, "trace synth", "stage", delay_s=1.0)
    try:
        trace = synth_trace(spec, cfg, bar)
        if bar:
            bar.set_description("trace synth: writing")
        save_trace(args.out, trace)
        if bar:
            bar.update(1)
    finally:
        if bar:
            bar.close()
    print(f"wrote {args.out}: {trace.num_steps} steps, {trace.num_tokens} tokens of "
          f"{spec.name} ({trace.layers} layers, top-{trace.top_k} of {trace.num_experts})")
    return 0


def _record(args: argparse.Namespace) -> int:

    from d2moe.core.errors import UserError
    from d2moe.core.fileio import require_file
    from d2moe.model.load import load_model
    from d2moe.model.tokenizer import model_codec
    from d2moe.traces.record import record_trace

    cfg = from_args(RecordConfig, args)
    if cfg.prefill_tokens < 1:  # before the model loads; record_trace would name max_len
        raise UserError(f"must be >= 1, got {cfg.prefill_tokens}", field="prefill-tokens",
                        fix=f"e.g. --prefill-tokens {RecordConfig.prefill_tokens}")
    if cfg.decode_steps < 0:
        raise UserError(f"must be >= 0, got {cfg.decode_steps}", field="decode-steps",
                        fix=f"e.g. --decode-steps {RecordConfig.decode_steps}")
    if not 0 <= cfg.bits <= MAX_BITS:  # the trace format's range; the file check's fix
        raise UserError(f"must be 0 (unknown) or 1..{MAX_BITS}, got {cfg.bits}", field="bits",
                        fix="e.g. --bits 4, or leave it out (unknown)")
    check_writable(cfg.out, field="out")  # before the model runs
    if cfg.text:
        path = require_file(cfg.text, field="text", what="a text file")
        data, source = path.read_bytes(), cfg.text
    else:
        from d2moe.model.corpus import load_corpus

        data, source = load_corpus(1, 64 * 1024).heldout, "tiny held-out split"
    encode, _ = model_codec(cfg.model)  # (a missing tokenizer.json before the load)
    model, spec = load_model(cfg.model)
    routed: dict[str, Any] = {}
    if cfg.router:
        from d2moe.router.evaluate import routed_backend

        backend = routed_backend(cfg.model, spec, cfg.store, cfg.router)
        routed = {"backend": backend, "token_bits": backend.token_bits,
                  "token_prefs": backend.token_prefs,
                  "router_config": backend.chooser.describe()}
    trace = record_trace(model, spec, encode(data), prefill_tokens=cfg.prefill_tokens,
                         decode_steps=cfg.decode_steps, bits=cfg.bits, source=source,
                         **routed)
    if cfg.router:
        trace.meta["router"] = backend.chooser.meta["path"]
    save_trace(cfg.out, trace)
    print(f"wrote {cfg.out}: {trace.num_steps} steps, {trace.num_tokens} tokens of "
          f"{spec.name} routing from {source}")
    return 0


def _info(args: argparse.Namespace) -> int:
    print(format_info(load_trace(args.file)))
    return 0


def layer_counts(trace: Trace) -> np.ndarray:
    """[layers, experts] token-slot counts: how often each expert was routed to."""
    L, E = trace.layers, trace.num_experts
    flat = trace.experts.astype(np.int64) + (np.arange(L) * E)[None, :, None]
    return np.bincount(flat.ravel(), minlength=L * E).reshape(L, E)


def reuse_rate(trace: Trace) -> float:
    """Share of a step's (layer, expert) demands already demanded at the previous step.

    Averaged over all steps after the first (NaN for a one-step trace): the fraction of
    experts a one-step cache of the previous step would hit.
    """
    S, L, E = trace.num_steps, trace.layers, trace.num_experts
    if S < 2:
        return float("nan")
    step_of = np.repeat(np.arange(S), np.diff(trace.step_offsets))
    used = np.zeros((S, L, E), dtype=bool)
    layer = np.broadcast_to(np.arange(L)[None, :, None], trace.experts.shape)
    used[np.broadcast_to(step_of[:, None, None], trace.experts.shape), layer, trace.experts] = True
    hits = (used[1:] & used[:-1]).sum()
    return float(hits / used[1:].sum())


def format_info(trace: Trace) -> str:
    """The text `d2moe trace info` prints."""
    phases = trace.phase_codes
    tok = np.diff(trace.step_offsets)
    lines = [
        f"trace of {trace.spec_name}: {trace.layers} layers, {trace.num_experts} experts, "
        f"top-{trace.top_k}",
        f"steps: {trace.num_steps} ({int((phases == PREFILL).sum())} prefill, "
        f"{int((phases == DECODE).sum())} decode)",
        f"tokens: {trace.num_tokens} ({int(tok[phases == PREFILL].sum())} prefill, "
        f"{int(tok[phases == DECODE].sum())} decode; per step min {tok.min()} max {tok.max()})",
    ]
    meta = {k: v for k, v in trace.meta.items() if k != "generator"}
    if meta:
        lines.append("meta: " + ", ".join(f"{k}={v}" for k, v in meta.items()))
    if "generator" in trace.meta:
        lines.append("generator: " + ", ".join(f"{k}={v}"
                                               for k, v in trace.meta["generator"].items()))
    counts = layer_counts(trace)
    share = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(share > 0, share * np.log(share), 0.0), axis=1)
    lines.append("expert popularity per layer (share of token-slots; effective experts = "
                 "exp(entropy)):")
    for layer in range(trace.layers):
        top = np.argsort(-counts[layer], kind="stable")[:3]
        tops = ", ".join(f"E{e} {share[layer, e]:.1%}" for e in top)
        lines.append(f"  L{layer:<3d} top {tops}; effective {np.exp(entropy[layer]):.2f} of "
                     f"{trace.num_experts}")
    lines.append(f"reuse rate (step's experts also used by the previous step): "
                 f"{reuse_rate(trace):.1%}")
    values, freq = np.unique(trace.bits, return_counts=True)
    hist = ", ".join(f"{'unknown' if v == 0 else f'{v} bits'}: {c / trace.bits.size:.1%}"
                     for v, c in zip(values.tolist(), freq.tolist(), strict=True))
    lines.append(f"bits: {hist}")
    if trace.prefs is not None:
        cfg = trace.meta["router_config"]
        lines.append(f"router preferences: {cfg['granularity']} rows over "
                     f"{'/'.join(map(str, cfg['bits']))} bits (d2moe simulate "
                     f"--capacity-mode adaptive re-places them)")
    return "\n".join(lines)
