"""The CPU fallback (byte tables, row chunks, per-plane views) equals the torch reference bit
for bit, in one chunk or many, for both nested formats and every bit-width."""

from __future__ import annotations

import numpy as np
import pytest

from d2moe.core.errors import UserError
from d2moe.core.sizes import QuantLayout
from d2moe.quant.nested import quantize_matrix

torch = pytest.importorskip("torch")
from d2moe.kernels import torch_fallback as tf  # noqa: E402
from d2moe.kernels.dispatch import expert_matmul  # noqa: E402
from d2moe.kernels.packed import PackedExpertMatrix  # noqa: E402
from d2moe.quant.reference import dequantize, dequantize_packed  # noqa: E402

# (rows, cols, group): partial groups, partial words, groups wider than a word, group 1
SHAPES = [(5, 96, 32), (3, 45, 16), (7, 33, 12), (9, 130, 40), (2, 40, 128), (1, 1, 1),
          (17, 257, 96), (6, 64, 64)]
RANGES = [(1, 3), (2, 8), (3, 5)]


def _matrix(kind: str, rows: int, cols: int, group: int, b1: int, bK: int, seed: int = 0):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    w[0, 0] = 0.0  # a zero weight and a constant run: scales of zero, signed zeros
    return quantize_matrix(w, QuantLayout(kind=kind, b1=b1, bK=bK, group=group))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as float32 bit patterns (signed zeros included)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32),
                                              b.contiguous().view(torch.int32))


@pytest.mark.parametrize("chunk", [1 << 18, 64, 7])  # one chunk; several; one row each
@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
def test_fallback_dequant_equals_reference_bit_for_bit(kind, chunk, monkeypatch):
    monkeypatch.setattr(tf, "CHUNK_WEIGHTS", chunk)
    for i, (rows, cols, group) in enumerate(SHAPES):
        for b1, bK in RANGES:
            m = _matrix(kind, rows, cols, group, b1, bK, seed=i)
            p = PackedExpertMatrix.from_nested(m)
            for b in range(b1, bK + 1):
                ref = dequantize_packed(p, b)
                assert _same_bits(tf.dequantize_fast(p, b), ref), (rows, cols, group, b1, bK, b)
                assert _same_bits(ref, dequantize(m, b))


def _row_major_views(m) -> tf.PlaneViews:
    """PlaneViews built the way the CPU pool builds them: row-major int32 planes."""
    from d2moe.kernels.packed import plane_words

    return tf.PlaneViews(kind=m.kind, b1=m.b1, bK=m.bK, group=m.group, rows=m.rows,
                         cols=m.cols,
                         planes=tuple(plane_words(m.planes[j], m.rows, m.cols)
                                      for j in range(m.bits_stored)),
                         scale=m.scale, zero=m.zero,
                         plane_scale=tuple(m.plane_scale))


@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
def test_matmul_one_chunk_is_the_dense_product_and_many_chunks_agree(kind, monkeypatch):
    m = _matrix(kind, 37, 200, 40, 2, 6, seed=3)
    v = _row_major_views(m)
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(0))
    for b in (2, 4, 6):
        w = dequantize(m, b)
        assert _same_bits(tf.dequantize_fast(v, b), w)
        assert _same_bits(tf.matmul_views(x, v, b), x @ w.t())  # one chunk: same product
        with monkeypatch.context() as mp:
            mp.setattr(tf, "CHUNK_WEIGHTS", 5 * 200)  # 8 chunks, the last one partial
            y = tf.matmul_views(x, v, b)
        ref = x.double() @ w.double().t()
        assert float((y.double() - ref).abs().max()) < 1e-5 * float(ref.abs().max())


def test_matmul_keeps_leading_dims_and_dtype():
    m = _matrix("bitplane", 8, 64, 32, 2, 4)
    v = _row_major_views(m)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = tf.matmul_views(x, v, 3)
    assert y.shape == (2, 3, 8) and y.dtype == torch.bfloat16


def test_views_go_to_the_fallback_and_bad_inputs_are_user_errors():
    m = _matrix("mwq", 8, 64, 32, 2, 4)
    v = _row_major_views(m)
    x = torch.randn(1, 64)
    ref = x.double() @ dequantize(m, 3).double().t()
    for backend in ("auto", "torch", "triton"):  # views are CPU numpy: always the fallback
        assert torch.allclose(expert_matmul(x, v, 3, backend).double(), ref, atol=1e-5)
    with pytest.raises(UserError, match="outside"):
        tf.matmul_views(x, v, 5)
    with pytest.raises(UserError, match="columns"):
        tf.matmul_views(torch.randn(1, 63), v, 3)


def test_workspace_is_bounded_by_the_chunk_not_the_matrix():
    m = _matrix("bitplane", 4, 64, 32, 2, 4)
    small = tf.workspace_bytes(_row_major_views(m))
    big = tf.PlaneViews(kind="bitplane", b1=2, bK=4, group=64, rows=14336, cols=4096,
                        planes=(), scale=np.zeros((14336, 64), np.float16),
                        zero=np.zeros((14336, 64), np.float16), plane_scale=())
    per_chunk = tf.chunk_rows(big) * 4096 * 10
    assert tf.chunk_rows(big) < big.rows
    assert tf.workspace_bytes(big) == per_chunk + 14336 * 64 * 4 * 2
    assert tf.workspace_bytes(big) < 14336 * 4096 * 4 // 10  # far below a dense fp32 matrix
    assert 0 < small < 4 * 64 * 10 + 4 * 2 * 4 * 2 + 1


@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
def test_kept_parameters_and_shared_scratch_stay_exact_across_interleaved_calls(kind):
    # one PlaneViews called at several bit-widths, interleaved with matrices of other
    # geometries that share this thread's scratch (a wide one writes codes past a narrow
    # one's words): every call still equals the reference bit for bit
    mats = [_matrix(kind, rows, cols, group, 2, 6, seed=i)
            for i, (rows, cols, group) in enumerate([(9, 130, 40), (5, 33, 32), (17, 257, 96)])]
    views = [_row_major_views(m) for m in mats]
    rng = np.random.default_rng(1)
    for _ in range(3):
        for i in rng.permutation(len(mats)):
            for b in rng.permutation(np.arange(2, 7)):
                b = int(b)
                assert _same_bits(tf.dequantize_fast(views[i], b), dequantize(mats[i], b))
    assert all(sorted(v.prepared) == [2, 3, 4, 5, 6] for v in views)
    assert all(tf.prepared_nbytes(v, 6) == v.rows * v.groups * 4 * (6 if kind == "mwq" else 2)
               for v in views)


@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
def test_the_off_cpu_dequant_path_equals_the_reference(kind):
    """dequantize_fast and dequant_matmul send a packed matrix on a GPU to torch ops
    (`_dequantize_torch`) that only ever ran on a GPU machine; the ops run on CPU tensors
    too, so the formulas are checked here, bit for bit, on every shape and range above."""
    for i, (rows, cols, group) in enumerate(SHAPES):
        for b1, bK in RANGES:
            m = _matrix(kind, rows, cols, group, b1, bK, seed=i)
            p = PackedExpertMatrix.from_nested(m)
            for b in range(b1, bK + 1):
                got = tf._dequantize_torch(p, b)  # noqa: SLF001
                assert _same_bits(got, dequantize(m, b)), (rows, cols, group, b1, bK, b)
