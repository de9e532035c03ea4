"""HF tensor names of the routed experts, per architecture: what the loader writes into the
model and what the quantizer and the source fingerprint pick out of a checkpoint (no torch)."""

from __future__ import annotations

import re

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


def expert_key(name: str) -> tuple[int, int, str] | None:
    """(HF layer, expert, w1|w3|w2) of a routed expert's weight by its HF name, else None."""
    for pattern, ours in _PATTERNS:
        m = pattern.match(name)
        if m:
            return int(m.group(1)), int(m.group(2)), ours[m.group(3)]
    return None
