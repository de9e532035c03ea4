"""Round-to-nearest baselines: one asymmetric copy per bit-width (Matryoshka-Free), INT8/INT4.

Each copy is its own object (`QuantLayout(kind="copies")` in core.sizes): b-bit codes plus
an fp16 scale and zero per group; nothing is shared between bit-widths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from d2moe.quant.mwq import check_bits_range
from d2moe.quant.nested import asym_codes, asym_params, check_matrix, grouped, ungrouped


@dataclass(frozen=True, eq=False)
class RTNMatrix:
    """A [rows, cols] matrix as `bits`-bit codes with fp16 scale/zero per group."""

    bits: int
    group: int
    codes: np.ndarray  # uint8 [rows, cols]
    scale: np.ndarray  # float16 [rows, groups]
    zero: np.ndarray  # float16 [rows, groups]


def quantize_rtn(w: np.ndarray, *, bits: int, group: int = 64) -> RTNMatrix:
    """Asymmetric RTN of a [rows, cols] matrix at `bits` bits, groups of `group` weights."""
    check_bits_range(bits, bits, group)
    w = check_matrix(w)
    wg, valid = grouped(w, group)
    scale, zero = asym_params(wg, valid, bits)
    codes = ungrouped(asym_codes(wg, scale, zero, bits), w.shape[1])
    return RTNMatrix(bits=bits, group=group, codes=codes, scale=scale, zero=zero)


def dequantize_rtn(m: RTNMatrix) -> np.ndarray:
    """float32 [rows, cols] reconstruction code * scale + zero."""
    cols = m.codes.shape[1]
    col_group = np.arange(cols) // m.group
    s = m.scale.astype(np.float32)[:, col_group]
    z = m.zero.astype(np.float32)[:, col_group]
    return m.codes.astype(np.float32) * s + z
