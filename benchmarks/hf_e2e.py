"""An engineer's path at real expert shapes: an HF safetensors checkpoint of Mixtral-8x7B's
shapes (random bf16 weights, Mixtral tensor names, one shard per layer, a word-level
tokenizer.json of its 32000 ids; written tensor by tensor), then `d2moe quantize` and
`d2moe run` as a user calls them. Prints quantize's weights/s and run's decode tok/s at each
budget, as a ratio to the run at the largest budget (the baseline, same invocation), with
the resident bytes each run reports.

Usage: python benchmarks/hf_e2e.py [--model-spec mixtral-8x7b] [--layers 2]
           [--budgets 25%,50%,100%] [--tokens 8]
           [--dir DIR (kept and reused; default: a temporary directory)]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from d2moe.core.cliargs import split_list
from d2moe.core.sizes import QuantLayout
from d2moe.core.spec import ModelSpec, load_spec
from d2moe.executor.cmd import RunConfig, run
from d2moe.model.config import ModelConfig
from d2moe.model.hf import hf_config_dict
from d2moe.quant.cmd import quantize_checkpoint

LAYOUT = QuantLayout(kind="bitplane", b1=2, bK=4)


def write_checkpoint(out: Path, spec: ModelSpec) -> None:
    """The checkpoint of `spec`'s shapes (see the module's docstring)."""
    import tokenizers

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config_dict(spec, ModelConfig())))
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    d, f, hd = spec.hidden, spec.ffn, spec.dim_head

    def ones() -> torch.Tensor:  # one tensor per name: safetensors refuses shared memory
        return torch.ones(d, dtype=torch.bfloat16)

    save_file({"model.embed_tokens.weight": rnd(spec.vocab, d),
               "lm_head.weight": rnd(spec.vocab, d), "model.norm.weight": ones()},
              str(out / "model-00.safetensors"))
    for layer in range(spec.layers):
        p = f"model.layers.{layer}."
        t = {p + "input_layernorm.weight": ones(), p + "post_attention_layernorm.weight": ones(),
             p + "self_attn.q_proj.weight": rnd(spec.heads * hd, d),
             p + "self_attn.k_proj.weight": rnd(spec.kv_heads * hd, d),
             p + "self_attn.v_proj.weight": rnd(spec.kv_heads * hd, d),
             p + "self_attn.o_proj.weight": rnd(d, spec.heads * hd),
             p + "block_sparse_moe.gate.weight": rnd(spec.experts, d, std=0.5)}
        for e in range(spec.experts):
            q = p + f"block_sparse_moe.experts.{e}."
            t |= {q + "w1.weight": rnd(f, d), q + "w3.weight": rnd(f, d),
                  q + "w2.weight": rnd(d, f)}
        save_file(t, str(out / f"model-{layer + 1:02d}.safetensors"))
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {f"w{i}": i for i in range(spec.vocab)}, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-spec", default="mixtral-8x7b",
                    help="the checkpoint's shapes (a built-in spec or a YAML file)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--budgets", default="25%,50%,100%", help="the last is the baseline")
    ap.add_argument("--tokens", type=int, default=8, help="new tokens per run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the runs")
    ap.add_argument("--dir", default="", help="keep the checkpoint and store here")
    args = ap.parse_args()
    budgets = split_list(args.budgets, "budgets", example="--budgets 25%,100%")
    print(f"machine: {platform.machine()}, {platform.node()}, {os.cpu_count()} cores; torch "
          f"{torch.__version__}; {args.layers} {args.model_spec}-shaped layers; start "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir or tmp)
        ckpt, store = root / "ckpt", root / "store"
        spec = dataclasses.replace(load_spec(args.model_spec), layers=args.layers)
        if not (ckpt / "tokenizer.json").is_file():
            t0 = time.perf_counter()
            write_checkpoint(ckpt, spec)
            print(f"checkpoint written in {time.perf_counter() - t0:.0f} s", flush=True)
        weights = spec.layers * spec.experts * 3 * spec.hidden * spec.ffn
        t0 = time.perf_counter()
        quantize_checkpoint(ckpt, store, LAYOUT, progress=False)
        seconds = time.perf_counter() - t0
        print(f"quantize: {weights / 1e6:.0f} M expert weights in {seconds:.1f} s, "
              f"{weights / seconds / 1e6:.0f} M weights/s (bitplane 2..4)", flush=True)
        rows = []
        for label in budgets:
            result = run(RunConfig(model=str(ckpt), store=str(store), budget=label,
                                   prompt="w5 w17 w300 w42", max_new_tokens=args.tokens,
                                   threads=args.threads, out=str(root / f"run-{label}"),
                                   progress=False))
            meta = result["timeline"].meta
            rows.append((label, result["generation"].decode_tokens_per_s,
                         meta["non_expert_bytes"], meta["arena_bytes"], result["text"]))
    base = rows[-1][1]
    print(f"\n{'budget':>7s} {'decode tok/s':>13s} {f'x {budgets[-1]}':>8s} "
          f"{'non-expert MiB':>15s} {'pool MiB':>9s}")
    for label, tps, non_expert, pool, _ in rows:
        print(f"{label:>7s} {tps:13.2f} {tps / base:8.3f} {non_expert / 2**20:15.1f} "
              f"{pool / 2**20:9.1f}")
    same = len({text for *_, text in rows}) == 1
    print(f"same text at every budget: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
