"""Grouped-query attention with a preallocated KV cache (prefill, then decode steps)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from d2moe.core.errors import UserError
from d2moe.core.spec import ModelSpec
from d2moe.model.config import ModelConfig
from d2moe.model.norm import RMSNorm
from d2moe.model.rope import apply_rope


@dataclass
class KVCache:
    """Keys and values of every layer for `batch` sequences that advance together.

    Invariant: positions [0, length) of every layer are filled; a forward over T new
    tokens writes [length, length + T) and then advances `length` by T.
    """

    k: list[torch.Tensor]  # per layer [B, Hkv, max_len, hd]
    v: list[torch.Tensor]
    length: int = 0

    @classmethod
    def create(cls, spec: ModelSpec, *, batch: int = 1, max_len: int = 2048,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
               ) -> KVCache:
        """An empty cache for `max_len` positions."""
        shape = (batch, spec.kv_heads, max_len, spec.dim_head)
        return cls(k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.layers)],
                   v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(spec.layers)])

    @property
    def max_len(self) -> int:
        """Positions the cache can hold."""
        return self.k[0].shape[2]


class Attention(nn.Module):
    """Multi-head attention with `kv_heads` <= `heads` key/value heads (GQA)."""

    def __init__(self, spec: ModelSpec, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        d, hd = spec.hidden, spec.dim_head
        self.layer, self.heads, self.kv_heads, self.head_dim = layer, spec.heads, spec.kv_heads, hd
        self.q_proj = nn.Linear(d, spec.heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, spec.kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, spec.kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(spec.heads * hd, d, bias=False)
        self.q_norm = RMSNorm(spec.heads * hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(spec.kv_heads * hd, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None) -> torch.Tensor:
        """x [B, T, D] at positions start..start+T-1 (start = cache.length or 0) -> [B, T, D]."""
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, H*hd], [B, T, Hkv*hd]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.length
            if start + t > cache.max_len:
                raise UserError(f"{start + t} positions exceed the KV cache's {cache.max_len}",
                                field="max_len", fix="create the cache with a larger max_len")
            cache.k[self.layer][:b, :, start:start + t] = k
            cache.v[self.layer][:b, :, start:start + t] = v
            k = cache.k[self.layer][:b, :, :start + t]  # [B, Hkv, S, hd], S = start + T
            v = cache.v[self.layer][:b, :, :start + t]
        mask = None
        if t > 1 and start > 0:  # causal with an offset: query i sees keys j <= start + i
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           is_causal=t > 1 and start == 0,
                                           enable_gqa=self.kv_heads != self.heads)  # [B, H, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
