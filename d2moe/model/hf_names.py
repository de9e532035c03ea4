"""HF tensor names of the routed experts, per architecture: what the loader writes into the
model and what the quantizer and the source fingerprint pick out of a checkpoint (no torch)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from d2moe.core.errors import UserError

SUPPORTED = ("mixtral", "olmoe", "qwen2_moe")
# Per architecture: (MoE module name, expert tensor names for our w1 gate, w3 up, w2 down).
MOE_NAMES = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "olmoe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}
# HF name -> (its pattern, HF tensor name -> ours), one per distinct naming in MOE_NAMES
_PATTERNS = tuple(
    (re.compile(rf"model\.layers\.(\d+)\.{re.escape(module)}\.experts\.(\d+)\."
                rf"({'|'.join(map(re.escape, names))})\.weight$"),
     dict(zip(names, ("w1", "w3", "w2"), strict=True)))
    for module, names in dict.fromkeys(MOE_NAMES.values()))


def check_model_type(cfg: Mapping[str, Any], *, path: str) -> str:
    """config.json's `model_type` if this package can run it, else the one UserError every
    reader of a checkpoint raises (the loader, and quantize, whose store would be unusable)."""
    arch = cfg.get("model_type")
    if arch not in SUPPORTED:
        raise UserError(f"model_type {arch!r} is not supported (supported: "
                        f"{', '.join(SUPPORTED)})", path=path, field="model_type",
                        fix="use a Mixtral, OLMoE or Qwen-MoE checkpoint")
    return str(arch)


def expert_key(name: str) -> tuple[int, int, str] | None:
    """(HF layer, expert, w1|w3|w2) of a routed expert's weight by its HF name, else None."""
    for pattern, ours in _PATTERNS:
        m = pattern.match(name)
        if m:
            return int(m.group(1)), int(m.group(2)), ours[m.group(3)]
    return None
