"""Matryoshka weight quantization (method.md, part 2): asymmetric base + binary residual planes.

Base: asymmetric round-to-nearest to b1 bits per group of `group` weights along the input
dimension (fp16 scale and zero per group). Plane p (bit b1+p): sign of what base and planes
1..p-1 left, times one fp16 scale per group. For a fixed sign pattern s = sign(r) the scale
alpha minimising sum (r - alpha*s)^2 is mean(r*s) = mean |r| over the group (the closed form
of binary residual quantization), which is what each plane stores.

Defaults b1=2, bK=8, g=64 are `d2moe.core.sizes.QuantLayout`'s: 2 bits is the paper's
smallest width (V1: 2..4), 8 its largest (V2: 5..8), so one store serves both variants; a
group of 64 costs 0.25 bit per weight per fp16 scale, the usual size in group-wise 2-4 bit
quantization (GPTQ/AWQ use 64-128).
"""

from __future__ import annotations

import numpy as np

from d2moe.core.errors import UserError
from d2moe.quant.nested import (
    NestedMatrix,
    asym_codes,
    asym_params,
    check_matrix,
    grouped,
    pack_bits,
    ungrouped,
)


def check_bits_range(b1: int, bK: int, group: int) -> None:
    """Raise a UserError unless 1 <= b1 <= bK <= 8 and group >= 1."""
    if not 1 <= b1 <= bK <= 8:
        raise UserError(f"need 1 <= b1 <= bK <= 8, got {b1}:{bK}", field="bits",
                        fix="e.g. --bits 2:8")
    if group < 1:
        raise UserError(f"group must be positive, got {group}", field="group",
                        fix="e.g. --group 64")


def quantize_mwq(w: np.ndarray, *, b1: int = 2, bK: int = 8, group: int = 64) -> NestedMatrix:
    """MWQ-quantize a [rows, cols] matrix into a b1-bit base and bK - b1 residual planes."""
    check_bits_range(b1, bK, group)
    w = check_matrix(w)
    rows, cols = w.shape
    wg, valid = grouped(w, group)
    scale, zero = asym_params(wg, valid, b1)
    codes = asym_codes(wg, scale, zero, b1)
    # Same evaluation order as d2moe.quant.reference: code*scale + zero, then +-alpha per plane.
    recon = codes.astype(np.float32) * scale[..., None].astype(np.float32) \
        + zero[..., None].astype(np.float32)
    planes = [pack_bits(ungrouped((codes >> (b1 - 1 - j)) & 1, cols)) for j in range(b1)]
    count = valid.sum(-1).astype(np.float32)  # real weights per group (last may be partial)
    pscales = []
    for _ in range(bK - b1):
        resid = np.where(valid, wg - recon, 0.0)
        alpha = (np.abs(resid).sum(-1) / count).astype(np.float16)
        sign = resid >= 0
        a32 = alpha[..., None].astype(np.float32)
        recon = recon + np.where(sign, a32, -a32)
        planes.append(pack_bits(ungrouped(sign, cols)))
        pscales.append(alpha)
    groups = scale.shape[1]
    pscale = np.stack(pscales) if pscales else np.zeros((0, rows, groups), np.float16)
    return NestedMatrix(kind="mwq", b1=b1, bK=bK, group=group, rows=rows, cols=cols,
                        planes=np.stack(planes), scale=scale, zero=zero, plane_scale=pscale)
