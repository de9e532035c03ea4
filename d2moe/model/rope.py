"""Rotary position embedding (Su et al. 2021) in the HF "rotate half" layout.

The HF checkpoints (Mixtral, OLMoE, Qwen-MoE) permute q/k weights for this layout, so it,
not the interleaved-pairs layout, is what reproduces their logits.
"""

from __future__ import annotations

import torch


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] for integer `positions` [T]."""
    # inv_freq_i = theta^(-2i/d), i < d/2 (RoFormer eq. 15); angles duplicated to d.
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                            device=positions.device) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # [T, d/2]
    emb = torch.cat((angles, angles), dim=-1)  # [T, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, d] by the angles in cos/sin [T, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # rotate_half
    return x * cos + rotated * sin
