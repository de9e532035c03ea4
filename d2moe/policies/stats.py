"""Offline knowledge about experts that some policies use: importance and similarity.

Computed once, before serving (`d2moe experts stats`, or from a trace in the simulator), and
handed to a policy at construction. Plain numbers only, so policies stay pure.
- `importance[layer][e]`: how much expert e matters in its layer, in [0, 1] with the
  layer's most important expert at 1 (EdgeMoE-style static bit-widths rank by it).
- `similarity[layer][e][f]`: how well expert f stands in for expert e, in [-1, 1], 1 on the
  diagonal (System 2 substitutes a missing expert with its most similar resident one).
`source` says how they were computed (weights, outputs on calibration text, or a trace).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from d2moe.core.jobs import ExpertKey


@dataclass(frozen=True)
class ExpertStats:
    """Per-layer expert importance and pairwise similarity (see the module docstring)."""

    importance: tuple[tuple[float, ...], ...]  # [L][E]
    similarity: tuple[tuple[tuple[float, ...], ...], ...]  # [L][E][E]
    source: str = ""
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.importance) != len(self.similarity):
            raise ValueError(f"importance has {len(self.importance)} layers, similarity "
                             f"{len(self.similarity)}")
        for layer, (imp, sim) in enumerate(zip(self.importance, self.similarity, strict=True)):
            if len(sim) != len(imp) or any(len(row) != len(imp) for row in sim):
                raise ValueError(f"layer {layer}: similarity is not {len(imp)}x{len(imp)}")

    @property
    def layers(self) -> int:
        return len(self.importance)

    @property
    def experts(self) -> int:
        return len(self.importance[0]) if self.importance else 0

    def ranked_substitutes(self, key: ExpertKey) -> list[tuple[float, int]]:
        """Other experts of `key`'s layer as (similarity, expert), most similar first."""
        row = self.similarity[key.layer][key.expert]
        return sorted(((s, f) for f, s in enumerate(row) if f != key.expert),
                      key=lambda t: (-t[0], t[1]))

    @classmethod
    def from_lists(cls, importance: Sequence[Sequence[float]],
                   similarity: Sequence[Sequence[Sequence[float]]], source: str = "",
                   meta: dict | None = None) -> ExpertStats:
        """Build from nested lists or numpy arrays (converted to plain floats)."""
        imp = tuple(tuple(float(v) for v in row) for row in importance)
        sim = tuple(tuple(tuple(float(v) for v in row) for row in layer) for layer in similarity)
        return cls(imp, sim, source, dict(meta or {}))
