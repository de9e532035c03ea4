"""`train-tiny`: train the built-in tiny model on the Python standard library's sources.

Seeded and CPU-sized: random windows of the training split, AdamW with warmup and cosine
decay, cross-entropy plus the Switch-Transformer load-balancing loss so every expert is used.
At the end it measures held-out perplexity against a unigram byte model and writes an HF
Mixtral checkpoint (fp16) with a provenance record beside it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from d2moe.core.errors import UserError
from d2moe.core.fileio import atomic_write
from d2moe.core.spec import ModelSpec, load_spec
from d2moe.model.config import ModelConfig, TrainConfig
from d2moe.model.corpus import HELDOUT_EVERY, load_corpus
from d2moe.model.hf import save_hf
from d2moe.model.load import tiny_dir
from d2moe.model.perplexity import perplexity, unigram_perplexity
from d2moe.model.transformer import Transformer

TINY_CONFIG = ModelConfig(rope_theta=10000.0, norm_eps=1e-5, renormalize_topk=True,
                          arch="mixtral", max_positions=4096)


@dataclass(frozen=True)
class TrainResult:
    """What a training run measured."""

    out_dir: Path
    losses: tuple[float, ...]  # cross-entropy (nats/byte) per step
    heldout_ppl: float
    unigram_ppl: float
    train_seconds: float
    provenance: dict[str, Any]


def balance_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4): E * sum_e f_e P_e.

    f_e: fraction of routed (token, slot) pairs sent to e; P_e: mean router probability of e.
    Equals 1 at perfect balance.
    """
    probs = F.softmax(router_logits.float(), dim=-1)  # [T, E]
    ids = probs.topk(top_k, dim=-1).indices  # [T, k]
    n_exp = probs.shape[-1]
    frac = torch.bincount(ids.flatten(), minlength=n_exp).float() / ids.numel()  # [E]
    return n_exp * (frac * probs.mean(dim=0)).sum()


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup to tc.lr, then cosine decay to tc.lr * tc.min_lr_frac."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    frac = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.lr * (tc.min_lr_frac + (1 - tc.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def _command(tc: TrainConfig) -> str:
    defaults = TrainConfig()
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in asdict(tc).items()
             if v != getattr(defaults, k) and k != "progress"]
    return " ".join(["d2moe model train-tiny", *flags])


def train_tiny(tc: TrainConfig, spec: ModelSpec | None = None) -> TrainResult:
    """Train the tiny model per `tc`, measure held-out and unigram perplexity, save it."""
    spec = spec or load_spec("tiny")
    if spec.vocab != 256:
        raise UserError(f"the tiny model is byte-level (vocab 256), got vocab {spec.vocab}",
                        path="d2moe/core/specs/tiny.yaml", field="vocab", fix="set vocab: 256")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    corpus = load_corpus(tc.train_kb * 1024, tc.heldout_kb * 1024)
    data = torch.frombuffer(bytearray(corpus.train), dtype=torch.uint8)
    if len(data) <= tc.ctx_len + 1:
        raise UserError("training text shorter than one window", field="train-kb",
                        fix="raise --train-kb or lower --ctx-len")
    model = Transformer(spec, TINY_CONFIG)
    model.init_weights(tc.seed)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tc.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(tc.seed)
    offsets = torch.arange(tc.ctx_len + 1)
    steps = range(tc.steps)
    bar = None
    if tc.progress:
        from tqdm import tqdm

        steps = bar = tqdm(steps, desc="train-tiny", unit="step")
    losses = []
    t0 = time.perf_counter()
    for step in steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc)
        starts = torch.randint(0, len(data) - tc.ctx_len - 1, (tc.batch_size,), generator=gen)
        batch = data[starts[:, None] + offsets].long()  # [B, ctx+1]
        logits, router_logits = model.forward_with_router(batch[:, :-1])  # [B, ctx, V]
        ce = F.cross_entropy(logits.reshape(-1, spec.vocab), batch[:, 1:].reshape(-1))
        aux = sum(balance_loss(r, spec.top_k) for r in router_logits) / spec.layers
        opt.zero_grad(set_to_none=True)
        (ce + tc.balance_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(ce.item())
        if bar is not None:
            bar.set_postfix(loss=f"{ce.item():.3f}", balance=f"{float(aux):.3f}")
    train_seconds = time.perf_counter() - t0
    held = perplexity(model, corpus.heldout, ctx=tc.ctx_len, progress=tc.progress)
    uni = unigram_perplexity(corpus.train, corpus.heldout)
    out_dir = Path(tc.out) if tc.out else tiny_dir()
    provenance = {
        "source": "measured",
        "command": _command(tc),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": sys.version.split()[0], "torch": torch.__version__},
        "train_config": asdict(tc),
        "spec": asdict(spec),
        "corpus": {"what": "Python standard library *.py files (sysconfig stdlib path), "
                           "ordered by sha256 of relative path; 1 file in "
                           f"{HELDOUT_EVERY} held out",
                   "python_version": sys.version.split()[0],
                   "train_files": len(corpus.train_files), "train_bytes": len(corpus.train),
                   "train_sha256": hashlib.sha256(corpus.train).hexdigest(),
                   "heldout_files": len(corpus.heldout_files),
                   "heldout_bytes": len(corpus.heldout),
                   "heldout_sha256": hashlib.sha256(corpus.heldout).hexdigest()},
        "training_steps": tc.steps,
        "tokens_seen": tc.steps * tc.batch_size * tc.ctx_len,
        "train_seconds": round(train_seconds, 1),
        "final_train_loss_nats_per_byte": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "heldout_ppl_per_byte": round(held.ppl, 4),
        "heldout_bits_per_byte": round(held.bits_per_token, 4),
        "heldout_tokens_scored": held.tokens_scored,
        "unigram_ppl_per_byte": round(uni.ppl, 4),
        "note": "heldout and unigram perplexities measured on the same held-out bytes; the "
                "unigram model counts byte frequencies of the training split (add-one)",
    }
    model.spec = spec
    save_hf(model, out_dir, extra_config={"d2moe": {"trained_by": "d2moe model train-tiny"}})
    with atomic_write(out_dir / "provenance.json") as f:
        json.dump(provenance, f, indent=2)
        f.write("\n")
    return TrainResult(out_dir=out_dir, losses=tuple(losses), heldout_ppl=held.ppl,
                       unigram_ppl=uni.ppl, train_seconds=train_seconds, provenance=provenance)
