"""Random nested stores for measurements: every expert of a spec as random bit planes with
small positive scales, written through the store writer (the reader then takes the executor's
own path). Tokens computed through such experts are meaningless; their timings are real."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from d2moe.core.sizes import QuantLayout
from d2moe.core.spec import ModelSpec
from d2moe.quant.nested import NestedMatrix
from d2moe.quant.store import StoreWriter, tensor_shapes


def random_matrix(rng: np.random.Generator, rows: int, cols: int,
                  layout: QuantLayout) -> NestedMatrix:
    """A [rows, cols] nested matrix of random planes; codes map to weights of about 1e-2."""
    groups = -(-cols // layout.group)
    scale = np.full((rows, groups), 2e-3, np.float16)
    zero = (-scale.astype(np.float32) * (2 ** layout.bK - 1) / 2).astype(np.float16)
    planes = rng.integers(0, 256, (layout.bK, -(-rows * cols // 8)), dtype=np.uint8)
    n_ps = layout.bK - layout.b1 if layout.kind == "mwq" else 0
    pscale = np.full((n_ps, rows, groups), 1e-3, np.float16)
    return NestedMatrix(kind=layout.kind, b1=layout.b1, bK=layout.bK, group=layout.group,
                        rows=rows, cols=cols, planes=planes, scale=scale, zero=zero,
                        plane_scale=pscale)


def write_random_store(path: str | Path, spec: ModelSpec, layout: QuantLayout,
                       seed: int = 0) -> Path:
    """Write a nested store of random experts for every (layer, expert) of `spec`."""
    rng = np.random.default_rng(seed)
    writer = StoreWriter(path, spec, layout)
    shapes = tensor_shapes(spec)
    for layer in range(spec.layers):
        writer.write_layer(layer, ((e, {t: random_matrix(rng, *shapes[t], layout)
                                        for t in shapes}) for e in range(spec.experts)))
    writer.close()
    return Path(path)
