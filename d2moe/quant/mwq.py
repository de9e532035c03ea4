"""Matryoshka weight quantization (method.md, part 2): asymmetric base + binary residual planes.

Base: asymmetric round-to-nearest to b1 bits per group of `group` weights along the input
dimension (fp16 scale and zero per group). Plane p (bit b1+p): sign of what base and planes
1..p-1 left, times one fp16 scale per group. For a fixed sign pattern s = sign(r) the scale
alpha minimising sum (r - alpha*s)^2 is mean(r*s) = mean |r| over the group (the closed form
of binary residual quantization), which is what each plane stores by default (`fit="mean"`,
the paper's). Since the lower widths' bytes are fixed once written, that greedy fit is already
the least-squares optimum of each plane given the earlier ones; other fits can only trade this
plane's error for later planes' (docs/results/mwq.md measures them; the decoder is the same):
  "halve"     alpha = max |r| / 2: halves the largest residual per plane (a binary expansion)
  "lookahead" per group, the one of {mean |r|, max |r| / 2, their average} that minimises the
              summed squared error of this and every later width (later planes by "halve")

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


PLANE_FITS = ("mean", "halve", "lookahead")  # "mean" (the paper's) first: the default


def _signed(resid: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """+alpha where resid >= 0, else -alpha (alpha per group, float32). As +-1 times alpha:
    the same floats as choosing alpha or -alpha (signed zeros too), 10x faster than
    np.where's broadcast of alpha over the group."""
    out = (resid >= 0).astype(np.float32)
    out *= 2
    out -= 1
    out *= alpha[..., None].astype(np.float32)
    return out


def _halve(resid: np.ndarray) -> np.ndarray:
    return (np.abs(resid).max(-1) / 2).astype(np.float16)


def plane_scale(resid: np.ndarray, valid: np.ndarray, fit: str, later: int) -> np.ndarray:
    """fp16 scale per group of the next plane for residuals [rows, groups, group] (padding 0).

    `valid` [groups, group] masks the padding of a partial last group; `later` is the number
    of planes that will follow this one (used by "lookahead").
    """
    count = valid.sum(-1).astype(np.float32)  # real weights per group (last may be partial)
    mean = (np.abs(resid).sum(-1) / count).astype(np.float16)
    if fit == "mean":
        return mean
    half = _halve(resid)
    if fit == "halve":
        return half
    blend = ((mean.astype(np.float32) + half.astype(np.float32)) / 2).astype(np.float16)
    best, best_sse = mean, None
    for cand in (mean, half, blend):
        r = np.where(valid, resid - _signed(resid, cand), 0.0)
        sse = (r ** 2).sum(-1)
        for _ in range(later):
            r = np.where(valid, r - _signed(r, _halve(r)), 0.0)
            sse = sse + (r ** 2).sum(-1)
        if best_sse is None:
            best_sse = sse
        else:
            better = sse < best_sse
            best, best_sse = np.where(better, cand, best), np.where(better, sse, best_sse)
    return best


def quantize_mwq(w: np.ndarray, *, b1: int = 2, bK: int = 8, group: int = 64,
                 fit: str = "mean") -> NestedMatrix:
    """MWQ-quantize a [rows, cols] matrix into a b1-bit base and bK - b1 residual planes."""
    check_bits_range(b1, bK, group)
    if fit not in PLANE_FITS:
        raise UserError(f"unknown plane-scale fit {fit!r}", field="fit",
                        fix=f"use one of {', '.join(PLANE_FITS)}")
    w = check_matrix(w)
    rows, cols = w.shape
    wg, valid = grouped(w, group)
    scale, zero = asym_params(wg, valid, b1)
    codes = asym_codes(wg, scale, zero, b1)
    # Same evaluation order as d2moe.quant.reference: code*scale + zero, then +-alpha per plane.
    recon = codes.astype(np.float32) * scale[..., None].astype(np.float32) \
        + zero[..., None].astype(np.float32)
    planes = [pack_bits(ungrouped((codes >> (b1 - 1 - j)) & 1, cols)) for j in range(b1)]
    pscales = []
    for p in range(bK - b1):
        resid = np.where(valid, wg - recon, 0.0)
        alpha = plane_scale(resid, valid, fit, later=bK - b1 - p - 1)
        recon = recon + _signed(resid, alpha)
        planes.append(pack_bits(ungrouped(resid >= 0, cols)))
        pscales.append(alpha)
    groups = scale.shape[1]
    pscale = np.stack(pscales) if pscales else np.zeros((0, rows, groups), np.float16)
    return NestedMatrix(kind="mwq", b1=b1, bK=bK, group=group, rows=rows, cols=cols,
                        planes=np.stack(planes), scale=scale, zero=zero, plane_scale=pscale)
