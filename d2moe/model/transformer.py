"""A compact Mixtral-family MoE transformer in plain torch (after gpt-fast's model.py).

Pre-norm blocks: x += Attn(RMSNorm(x)); x += MoE(RMSNorm(x)). The routed experts run in an
`ExpertBackend` (default: the model's own `DenseExperts`), so the executor can swap in
streamed, quantized experts without touching this file.
"""

from __future__ import annotations

import torch
from torch import nn

from d2moe.core.errors import UserError
from d2moe.core.spec import ModelSpec
from d2moe.model.attention import Attention, KVCache
from d2moe.model.config import ModelConfig
from d2moe.model.moe import DenseExperts, ExpertBackend, MoELayer, RouterObserver
from d2moe.model.norm import RMSNorm
from d2moe.model.rope import rope_tables


class Block(nn.Module):
    """One transformer layer: attention then MoE, each pre-normed with a residual."""

    def __init__(self, spec: ModelSpec, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden, cfg.norm_eps)
        self.self_attn = Attention(spec, cfg, layer)
        self.post_attention_layernorm = RMSNorm(spec.hidden, cfg.norm_eps)
        self.moe = MoELayer(spec, cfg, layer)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, backend: ExpertBackend,
                observer: RouterObserver | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> (x [B, T, D], router logits [B*T, E])."""
        b, t, d = x.shape
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)  # [B, T, D]
        y, logits = self.moe(self.post_attention_layernorm(h).reshape(b * t, d), backend,
                             observer)  # [B*T, D], [B*T, E]
        return h + y.view(b, t, d), logits


class Transformer(nn.Module):
    """Token ids [B, T] -> next-token logits [B, T, V]."""

    def __init__(self, spec: ModelSpec, cfg: ModelConfig | None = None, *,
                 with_experts: bool = True) -> None:
        super().__init__()
        if spec.dense_layers:
            raise UserError("leading dense layers (DeepSeek) are not supported",
                            path=spec.name, field="dense_layers", fix="use a Mixtral, OLMoE "
                            "or Qwen-MoE model")
        self.spec, self.cfg = spec, cfg or ModelConfig()
        self.embed_tokens = nn.Embedding(spec.vocab, spec.hidden)
        self.layers = nn.ModuleList(Block(spec, self.cfg, i) for i in range(spec.layers))
        self.norm = RMSNorm(spec.hidden, self.cfg.norm_eps)
        self.lm_head = nn.Linear(spec.hidden, spec.vocab, bias=False)
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Routed expert weights; None when a streaming backend supplies them.
        self.experts = DenseExperts(spec) if with_experts else None

    def new_cache(self, *, batch: int = 1, max_len: int = 2048) -> KVCache:
        """An empty KV cache in this model's dtype and device."""
        p = self.embed_tokens.weight
        return KVCache.create(self.spec, batch=batch, max_len=max_len, dtype=p.dtype,
                              device=p.device)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, *,
                backend: ExpertBackend | None = None,
                observer: RouterObserver | None = None, last_only: bool = False
                ) -> torch.Tensor:
        """Logits [B, T, V] ([B, 1, V] with `last_only`); with a cache, tokens continue at
        position cache.length."""
        return self.forward_with_router(tokens, cache, backend=backend, observer=observer,
                                        last_only=last_only)[0]

    def forward_with_router(self, tokens: torch.Tensor, cache: KVCache | None = None, *,
                            backend: ExpertBackend | None = None,
                            observer: RouterObserver | None = None, last_only: bool = False
                            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits [B, T, V], router logits [B*T, E] per layer): the whole forward pass.
        `last_only`: the LM head on the last position only ([B, 1, V]), what generation
        reads; on a prompt of T tokens the head is otherwise T rows of the vocabulary's
        matrix product (measured: the first decode step of a 1-layer Mixtral-shaped model on
        this project's CPU took 140-164 ms after an 8-token prompt, the next ones 36-40)."""
        backend = backend if backend is not None else self.experts
        if backend is None:
            raise UserError("this model was built without expert weights",
                            field="backend", fix="pass an ExpertBackend")
        start = cache.length if cache is not None else 0
        t = tokens.shape[1]
        x = self.embed_tokens(tokens)  # [B, T, D]
        positions = torch.arange(start, start + t, device=tokens.device)
        cos, sin = rope_tables(positions, self.spec.dim_head, self.cfg.rope_theta,
                               x.dtype)  # [T, hd]
        router_logits = []
        for block in self.layers:
            x, logits = block(x, cos, sin, cache, backend, observer)
            router_logits.append(logits)
        if cache is not None:
            cache.length = start + t
        if last_only:
            x = x[:, -1:]  # [B, 1, D]
        return self.lm_head(self.norm(x)), router_logits  # [B, T or 1, V]

    def forward_ragged(self, seqs: list[torch.Tensor], caches: list[KVCache], *,
                       backend: ExpertBackend | None = None,
                       observer: RouterObserver | None = None, last_only: bool = False
                       ) -> list[torch.Tensor]:
        """Continuous batching of sequences of different lengths and positions: per layer,
        attention for each sequence on its own cache, then one MoE call over all their tokens
        concatenated (so the experts are shared across sequences). seqs[i]: token ids [T_i],
        continuing at caches[i].length -> logits [T_i, V] per sequence ([1, V] with
        `last_only`)."""
        backend = backend if backend is not None else self.experts
        if backend is None:
            raise UserError("this model was built without expert weights",
                            field="backend", fix="pass an ExpertBackend")
        if len(seqs) != len(caches) or not seqs:
            raise ValueError("need one cache per sequence, and at least one sequence")
        lens = [int(s.shape[0]) for s in seqs]
        starts = [c.length for c in caches]
        tables = [rope_tables(torch.arange(p, p + t, device=s.device), self.spec.dim_head,
                              self.cfg.rope_theta, self.embed_tokens.weight.dtype)
                  for s, p, t in zip(seqs, starts, lens, strict=True)]
        xs = [self.embed_tokens(s)[None] for s in seqs]  # [1, T_i, D] each
        for block in self.layers:
            hs = [x + block.self_attn(block.input_layernorm(x), cos, sin, c)
                  for x, (cos, sin), c in zip(xs, tables, caches, strict=True)]
            h = torch.cat([x[0] for x in hs])  # [ΣT, D]
            y, _ = block.moe(block.post_attention_layernorm(h), backend, observer)
            xs = [part[None] for part in torch.split(h + y, lens)]
        for c, p, t in zip(caches, starts, lens, strict=True):
            c.length = p + t
        return [self.lm_head(self.norm(x[0, -1:] if last_only else x[0]))
                for x in xs]  # [T_i or 1, V] each

    def init_weights(self, seed: int, std: float = 0.02) -> None:
        """Normal(0, std) weights (output projections scaled by 1/sqrt(2L), GPT-2), unit norms."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    scale = std / (2 * self.spec.layers) ** 0.5 if (
                        "o_proj" in name or name.endswith("w2") or "down_proj" in name) else std
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)

    def param_counts(self) -> dict[str, int]:
        """Parameters by part: experts, attention, router, shared, embeddings, norms."""
        counts = {"experts": 0, "attention": 0, "router": 0, "shared_experts": 0,
                  "embeddings": 0, "norms": 0}
        for name, p in self.named_parameters():  # tied weights are listed once
            if name.startswith("experts."):
                counts["experts"] += p.numel()
            elif ".self_attn." in name and "norm" not in name:
                counts["attention"] += p.numel()
            elif ".moe.gate." in name:
                counts["router"] += p.numel()
            elif ".moe.shared." in name:
                counts["shared_experts"] += p.numel()
            elif "embed_tokens" in name or "lm_head" in name:
                counts["embeddings"] += p.numel()
            else:
                counts["norms"] += p.numel()
        return counts
