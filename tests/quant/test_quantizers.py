"""MWQ and bitplane quantizers: nesting, error falling per plane, sizes, reference agreement."""

from __future__ import annotations

import numpy as np
import pytest

from d2moe.core.errors import UserError
from d2moe.core.sizes import QuantLayout, _matrix_bytes
from d2moe.quant.nested import (
    decode_levels,
    encode_level,
    level_nbytes,
    quantize_matrix,
)
from d2moe.quant.rtn import dequantize_rtn, quantize_rtn

torch = pytest.importorskip("torch")
from d2moe.quant.reference import dequantize  # noqa: E402


def _rng() -> np.random.Generator:
    return np.random.default_rng()  # fresh inputs every run


@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
@pytest.mark.parametrize("shape,group", [((24, 200), 64), ((7, 96), 32), ((5, 45), 16)])
def test_error_falls_with_every_plane(kind, shape, group):
    w = _rng().standard_normal(shape).astype(np.float32)
    m = quantize_matrix(w, QuantLayout(kind=kind, b1=2, bK=8, group=group))
    errs = [float(np.linalg.norm(dequantize(m, b).numpy() - w)) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] / np.linalg.norm(w) < 0.03


@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
def test_truncated_prefix_equals_full(kind):
    w = _rng().standard_normal((9, 70)).astype(np.float32)
    m = quantize_matrix(w, QuantLayout(kind=kind, b1=3, bK=7, group=32))
    for b in range(3, 8):
        assert torch.equal(dequantize(m.truncated(b), b), dequantize(m, b))


def test_bitplane_at_bk_is_rtn():
    w = _rng().standard_normal((6, 128)).astype(np.float32)
    m = quantize_matrix(w, QuantLayout(kind="bitplane", b1=2, bK=8, group=64))
    rtn = dequantize_rtn(quantize_rtn(w, bits=8, group=64))
    np.testing.assert_allclose(dequantize(m, 8).numpy(), rtn, rtol=0, atol=1e-6)


def test_mwq_plane_scale_is_mean_abs_residual():
    w = _rng().standard_normal((4, 64)).astype(np.float32)
    m = quantize_matrix(w, QuantLayout(kind="mwq", b1=2, bK=3, group=64))
    resid = w - dequantize(m, 2).numpy()
    np.testing.assert_allclose(m.plane_scale[0, :, 0].astype(np.float32),
                               np.abs(resid).mean(1), rtol=1e-3)


@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
@pytest.mark.parametrize("shape,group", [((16, 128), 64), ((3, 13), 4), ((5, 45), 16)])
def test_level_bytes_match_core_sizes_and_round_trip(kind, shape, group):
    layout = QuantLayout(kind=kind, b1=2, bK=6, group=group)
    w = _rng().standard_normal(shape).astype(np.float32)
    m = quantize_matrix(w, layout)
    levels = [encode_level(m, b) for b in range(2, 7)]
    for b, data in zip(range(2, 7), levels, strict=True):
        assert len(data) == level_nbytes(layout, *shape, b)
    for b in range(2, 7):
        assert sum(len(d) for d in levels[:b - 1]) == _matrix_bytes(*shape, b, layout, 2)
    back = decode_levels(layout, *shape, levels)
    for b in range(2, 7):
        assert torch.equal(dequantize(back, b), dequantize(m, b))


def test_bad_input_is_user_error():
    with pytest.raises(UserError, match="NaN"):
        quantize_matrix(np.full((2, 64), np.nan), QuantLayout(kind="mwq"))
    for bad, what in ((np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
                      (-np.inf, "NaN or infinite"), (7e4, "fp16 range"), (-7e4, "fp16 range")):
        w = np.zeros((3, 70), np.float32)
        w[2, 69] = bad  # one weight, in the last partial group of the last row
        with pytest.raises(UserError, match=what):
            quantize_matrix(w, QuantLayout(kind="bitplane"))
    with pytest.raises(UserError, match="2-D"):
        quantize_matrix(np.ones(64), QuantLayout(kind="bitplane"))
    with pytest.raises(UserError, match="not a nested"):
        quantize_matrix(np.ones((2, 64)), QuantLayout(kind="copies"))
    m = quantize_matrix(np.ones((2, 64)), QuantLayout(kind="bitplane", bK=4))
    with pytest.raises(UserError, match="outside"):
        dequantize(m, 5)


def test_constant_rows_are_exact():
    w = np.full((3, 64), 0.5, np.float32)
    for kind in ("mwq", "bitplane"):
        m = quantize_matrix(w, QuantLayout(kind=kind))
        for b in (2, 5, 8):
            assert np.array_equal(dequantize(m, b).numpy(), w)


def test_core_sizes_bitplane_layout():
    from d2moe.core.sizes import expert_bytes, load_bytes
    from d2moe.core.spec import ModelSpec

    spec = ModelSpec(name="s", layers=1, experts=2, top_k=1, hidden=64, ffn=96, heads=1,
                     kv_heads=1, vocab=8)
    mwq, bp = QuantLayout(kind="mwq"), QuantLayout(kind="bitplane")
    assert bp.nested and mwq.nested and not QuantLayout(kind="copies").nested
    assert expert_bytes(spec, 2, bp) == expert_bytes(spec, 2, mwq)  # same base
    plane = 3 * 64 * 96 // 8
    assert load_bytes(spec, 2, 5, bp) == 3 * plane
    groups = 96 * 1 + 96 * 1 + 64 * 2  # w1, w3 [96, 64]; w2 [64, 96] -> 2 groups per row
    assert load_bytes(spec, 2, 5, mwq) == 3 * (plane + 2 * groups)


@pytest.mark.parametrize("kind,fit", [("bitplane", "mean"), ("mwq", "mean"), ("mwq", "halve"),
                                      ("mwq", "lookahead")])
@pytest.mark.parametrize("rows,cols,group", [(37, 70, 32), (64, 128, 64), (9, 3, 16)])
def test_row_blocks_give_the_whole_matrix_bit_for_bit(monkeypatch, kind, fit, rows, cols,
                                                      group):
    """quantize_matrix works a block of rows at a time: the result must be the one-piece
    quantization's, packed planes included (blocks of 8 rows; 37 x 70: a partial last
    group, a partial last block, planes of 70 bytes per block)."""
    from d2moe.quant import nested
    from d2moe.quant.bitplane import quantize_bitplane
    from d2moe.quant.mwq import quantize_mwq

    w = _rng().standard_normal((rows, cols)).astype(np.float32)
    w[1, :group] = 0.25  # a constant group: scale 0
    layout = QuantLayout(kind=kind, b1=2, bK=7, group=group)
    whole = (quantize_mwq(w, b1=2, bK=7, group=group, fit=fit) if kind == "mwq"
             else quantize_bitplane(w, b1=2, bK=7, group=group))
    monkeypatch.setattr(nested, "BLOCK_BYTES", 8 * 4 * cols)  # 8 rows a block
    blocks = quantize_matrix(w, layout, fit=fit)
    for name in ("planes", "scale", "zero", "plane_scale"):
        assert np.array_equal(getattr(blocks, name), getattr(whole, name)), name
    assert (blocks.rows, blocks.cols, blocks.kind) == (rows, cols, kind)
    for b in range(2, 8):
        assert encode_level(blocks, b) == encode_level(whole, b)
    w[-1, -1] = np.inf  # in the last block: each block's values are checked
    with pytest.raises(UserError, match="NaN or infinite"):
        quantize_matrix(w, layout, fit=fit)


def _sq_err(m, w, b) -> float:
    return float(((dequantize(m, b).numpy().astype(np.float64) - w) ** 2).sum())


def test_mwq_plane_fits_trade_as_documented():
    """`--fit` (d2moe eval ppl): 'halve' stores max |r| / 2; at b1 + 1 (same base, same
    signs) the paper's 'mean' is the least-squares plane, so no fit beats it there;
    'lookahead' picks per group the scale that, with 'halve' after it, sums the least error
    over the widths b1+1..bK, so over those widths it never loses to 'halve' itself."""
    from d2moe.quant.mwq import quantize_mwq

    w = _rng().standard_normal((24, 200)).astype(np.float32)  # a partial last group
    fits = {f: quantize_mwq(w, b1=2, bK=6, group=64, fit=f)
            for f in ("mean", "halve", "lookahead")}
    for m in fits.values():  # one base: the fits differ only in the plane scales
        assert np.array_equal(m.scale, fits["mean"].scale)
        assert torch.equal(dequantize(m, 2), dequantize(fits["mean"], 2))
    resid = (w - dequantize(fits["halve"], 2).numpy()).reshape(24, -1)
    groups = [np.abs(resid[:, g:g + 64]).max(1) / 2 for g in range(0, 200, 64)]
    np.testing.assert_allclose(fits["halve"].plane_scale[0].astype(np.float32),
                               np.stack(groups, 1), rtol=1e-3)
    first = {f: _sq_err(m, w, 3) for f, m in fits.items()}
    assert first["mean"] <= min(first["halve"], first["lookahead"]) * (1 + 1e-6), first
    total = {f: sum(_sq_err(m, w, b) for b in range(3, 7)) for f, m in fits.items()}
    assert total["lookahead"] <= total["halve"] * (1 + 1e-6), total
    assert len({round(v, 3) for v in total.values()}) == 3  # three different fits
    with pytest.raises(UserError, match="unknown plane-scale fit"):
        quantize_mwq(w, fit="best")
