"""The "bitplane" nested format: the top b bits of one bK-bit asymmetric code.

Each group gets one fp16 scale s and zero z for a bK-bit round-to-nearest code q
(w ~ q*s + z). Planes hold the bits of q, most significant first; an expert at b bits
keeps the top b bits t = q >> (bK - b) and reconstructs at the middle of the bin those
bits leave open: q ~ t * 2^(bK-b) + (2^(bK-b) - 1) / 2. So
    w_b = t * s_b + z_b,  s_b = s * 2^(bK-b),  z_b = z + s * (2^(bK-b) - 1) / 2,
one scale/zero pair per group for every b (the kernel derives s_b, z_b in registers), and
a plane costs exactly one bit per weight: no per-plane scale. At b = bK it is plain RTN.
"""

from __future__ import annotations

import numpy as np

from d2moe.quant.mwq import check_bits_range
from d2moe.quant.nested import (
    NestedMatrix,
    asym_codes,
    asym_params,
    check_matrix,
    grouped,
    pack_bits,
    ungrouped,
)


def quantize_bitplane(w: np.ndarray, *, b1: int = 2, bK: int = 8,
                      group: int = 64) -> NestedMatrix:
    """Quantize a [rows, cols] matrix to a bK-bit code stored as bK bit planes (MSB first)."""
    check_bits_range(b1, bK, group)
    w = check_matrix(w)
    rows, cols = w.shape
    wg, valid = grouped(w, group)
    scale, zero = asym_params(wg, valid, bK)
    codes = asym_codes(wg, scale, zero, bK)
    planes = [pack_bits(ungrouped((codes >> (bK - 1 - j)) & 1, cols)) for j in range(bK)]
    return NestedMatrix(kind="bitplane", b1=b1, bK=bK, group=group, rows=rows, cols=cols,
                        planes=np.stack(planes), scale=scale, zero=zero,
                        plane_scale=np.zeros((0, rows, scale.shape[1]), np.float16))
