"""`d2moe model train-tiny | info` and `d2moe generate`: the model's verbs.

torch is imported only when a verb runs, so `d2moe --help` stays fast; `register` raises
ImportError when torch is absent so the CLI lists these verbs as unavailable.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from d2moe.core.cliargs import (
    add_fields,
    check_dtype,
    dtype_field,
    from_args,
    group_usage,
    model_field,
    require_modules,
)
from d2moe.core.fileio import check_writable
from d2moe.executor.cmd import RunConfig

_MODEL_HELP = "`tiny` (the built-in model) or an HF checkpoint directory (config.json + " \
              "*.safetensors; Mixtral, OLMoE or Qwen-MoE)"


@dataclass(frozen=True)
class InfoConfig:
    """Options of `d2moe model info` (the CLI is built from these fields)."""

    model: str = model_field(help_text=_MODEL_HELP, metavar="MODEL")


@dataclass(frozen=True)
class GenerateConfig:
    """Options of `d2moe generate` (the CLI is built from these fields): the reference for
    `d2moe run`, so its prompt and length default to run's."""

    model: str = model_field(help_text=_MODEL_HELP, metavar="MODEL")
    prompt: str = field(default=RunConfig.prompt, metadata={"help": "prompt text"})
    max_new_tokens: int = field(default=RunConfig.max_new_tokens, metadata={
        "help": "tokens to generate; with the prompt at most the model's "
                "max_position_embeddings"})
    dtype: str = dtype_field("the resident dense experts take it too")
    progress: bool = field(default=True, metadata={
        "help": "show a progress bar on a terminal when it takes over a second"})

    def __post_init__(self) -> None:
        check_dtype(self.dtype)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `model` and `generate` verbs."""
    require_modules("torch", "safetensors", verb="model")
    from d2moe.model.config import TrainConfig

    model = sub.add_parser("model", help="the built-in tiny model: train it, describe models",
                           description="The model side: train the built-in tiny model "
                                       "(train-tiny) or describe a model's sizes (info).")
    verbs = model.add_subparsers(dest="model_verb", metavar="MODEL_VERB")
    train = verbs.add_parser(
        "train-tiny", help="train the built-in tiny model on the Python standard library's "
                           "sources (CPU, minutes)",
        description="Train the built-in tiny model (4 layers, 8 experts, bytes as tokens) on "
                    "the Python standard library's sources, measure its held-out perplexity "
                    "and save it as an HF checkpoint with provenance.json. Without --out it "
                    "OVERWRITES the checkpoint shipped in the installed package, the one "
                    "`--model tiny` loads everywhere (this is how it was made); pass --out DIR "
                    "to keep it.")
    add_fields(train, TrainConfig)
    train.set_defaults(func=_train_tiny)
    info = verbs.add_parser("info", help="sizes, parameter counts and expert bytes of a model",
                            description="Print a model's shape, its parameter counts by part, "
                                        "its expert bytes at fp16 and its checkpoint (with the "
                                        "tiny model's training record).")
    add_fields(info, InfoConfig)
    info.set_defaults(func=_info)
    model.set_defaults(func=group_usage(model))

    gen = sub.add_parser("generate", help="greedy generation with all experts resident "
                                          "(reference for `d2moe run`)",
                         description="Greedy generation from a prompt with every expert "
                                     "resident in memory (no streaming, no budget): the "
                                     "reference output and speed for `d2moe run`.")
    add_fields(gen, GenerateConfig)
    gen.set_defaults(func=_generate)


def _train_tiny(args: argparse.Namespace) -> int:
    from d2moe.model.config import TrainConfig
    from d2moe.model.train import train_tiny

    tc = from_args(TrainConfig, args)
    if tc.out:  # before minutes of training (the default, the package's own folder, exists)
        check_writable(Path(tc.out) / "config.json", field="out")
    result = train_tiny(tc)
    p = result.provenance
    print(f"wrote {result.out_dir} ({tc.steps} steps in {result.train_seconds:.0f} s)")
    print(f"held-out perplexity per byte: {result.heldout_ppl:.3f} "
          f"({p['heldout_bits_per_byte']:.3f} bits/byte) vs unigram byte model: "
          f"{result.unigram_ppl:.3f}  [measured]")
    return 0


def _info(args: argparse.Namespace) -> int:
    from d2moe.core.sizes import fmt_bytes
    from d2moe.model.load import checkpoint_dir, load_model, tiny_provenance

    cfg = from_args(InfoConfig, args)
    model, spec = load_model(cfg.model)
    counts = model.param_counts()
    total = sum(counts.values())
    print(f"model {spec.name}: {spec.layers} layers, {spec.experts} experts (top-{spec.top_k}), "
          f"hidden {spec.hidden}, expert ffn {spec.ffn}, heads {spec.heads}/{spec.kv_heads} kv, "
          f"head_dim {spec.dim_head}, vocab {spec.vocab}"
          + (f", shared ffn {spec.shared_ffn}" if spec.shared_ffn else ""))
    print(f"router: {'softmax over top-k (Mixtral)' if model.cfg.renormalize_topk else 'top-k of softmax, not renormalised (OLMoE/Qwen)'}")  # noqa: E501
    for part, n in counts.items():
        if n:
            print(f"  {part:15s} {n:>14,d} params  {100 * n / total:5.1f}%")
    print(f"  {'total':15s} {total:>14,d} params")
    per_expert = spec.expert_params
    print(f"one expert: {per_expert:,d} params = {fmt_bytes(per_expert * 2)} at fp16; all "
          f"{spec.layers * spec.experts} experts: {fmt_bytes(per_expert * 2 * spec.layers * spec.experts)}"  # noqa: E501
          f" at fp16; non-expert: {fmt_bytes(spec.non_expert_bytes)} at fp16")
    where = checkpoint_dir(cfg.model)
    size = sum(f.stat().st_size for f in where.glob("*.safetensors"))
    print(f"checkpoint: {where} ({fmt_bytes(size)} of safetensors)")
    if cfg.model == "tiny":
        p = tiny_provenance()
        print(f"trained: {p['command']} on {p['date_utc']}, {p['training_steps']} steps in "
              f"{p['train_seconds']} s; held-out ppl/byte {p['heldout_ppl_per_byte']} vs "
              f"unigram {p['unigram_ppl_per_byte']} [{p['source']}]")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from d2moe.model.generate import generate
    from d2moe.model.load import load_model
    from d2moe.model.tokenizer import continuation, model_codec

    cfg = from_args(GenerateConfig, args)
    encode, decode = model_codec(cfg.model)  # (a missing tokenizer.json before the load)
    model, spec = load_model(cfg.model, dtype=getattr(torch, cfg.dtype))
    gen = generate(model, encode(cfg.prompt), cfg.max_new_tokens, progress=cfg.progress)
    sys.stdout.write(cfg.prompt + continuation(decode, gen.prompt_ids, gen.new_ids) + "\n")
    print(f"[{len(gen.prompt_ids)} prompt tokens, prefill {gen.prefill_s * 1e3:.1f} ms; "
          f"{len(gen.new_ids)} new tokens, decode {gen.decode_tokens_per_s:.1f} tokens/s; "
          f"all experts resident (DenseExperts), greedy]", file=sys.stderr)
    return 0
