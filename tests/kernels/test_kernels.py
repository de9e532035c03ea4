"""Fused dequant + matmul kernels against the torch reference (interpreter on CPU; CUDA if any)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from d2moe.core.errors import UserError
from d2moe.core.sizes import QuantLayout
from d2moe.quant.nested import quantize_matrix

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from d2moe.kernels.dispatch import expert_matmul, expert_swiglu  # noqa: E402
from d2moe.kernels.packed import PackedExpertMatrix  # noqa: E402
from d2moe.quant.reference import dequantize, dequantize_packed  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# these run the Triton kernels on CPU tensors: the interpreter only (a GPU machine with
# TRITON_INTERPRET=0 runs the `gpu`-marked tests instead)
needs_triton_device = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")


# The GEMV decodes codes of <= 7 bits as 0.5 + q/256 (triton_nested.py), which leaves ~17
# bits for the sum over a word: up to ~6e-5 relative with fp32 activations in a 36-case check
# (MWQ at 8 bits worst: its base and six residual sums), below the fp16 rounding of a real
# run's output (5e-4). A wrong plane, shift or scale errs by > 1e-2.
GEMV_TOL = 5e-4


def _packed(kind: str, rows: int, cols: int, group: int, bK: int = 8, device: str = "cpu"):
    w = np.random.default_rng().standard_normal((rows, cols)).astype(np.float32)
    m = quantize_matrix(w, QuantLayout(kind=kind, b1=2, bK=bK, group=group))
    return m, PackedExpertMatrix.from_nested(m, device=device)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
def test_packed_layout_matches_reference(kind):
    for rows, cols, group in [(5, 96, 32), (3, 45, 16), (4, 200, 64)]:
        m, p = _packed(kind, rows, cols, group)
        for b in (2, 5, 8):
            assert torch.equal(dequantize_packed(p, b), dequantize(m, b))


@needs_triton_device
@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
@pytest.mark.parametrize("rows,cols,group,tokens,bits", [
    (37, 200, 64, 1, 2),   # rows and cols off the block; last group partial; cols % 32 != 0
    (20, 96, 32, 3, 5),
    (33, 130, 64, 4, 8),   # several tokens per GEMV program, partial tiles everywhere
    (16, 64, 64, 17, 3),   # the tl.dot path
])
def test_triton_matches_reference(kind, rows, cols, group, tokens, bits):
    from d2moe.kernels.triton_launch import nested_matmul

    m, p = _packed(kind, rows, cols, group)
    x = torch.randn(tokens, cols)
    out = torch.full((tokens, rows), float("nan"))
    y = nested_matmul(x, p, bits, out=out)
    assert y.data_ptr() == out.data_ptr() and not torch.isnan(y).any()
    ref = x.double() @ dequantize(m, bits).double().t()
    assert _rel(y, ref) < GEMV_TOL


def _scattered(p: PackedExpertMatrix) -> PackedExpertMatrix:
    """p with every plane and plane scale copied to its own slot of one buffer, in shuffled
    order (some before plane 0), as the CUDA pool's level blocks hold them."""
    def scatter(parts, dtype):
        n = parts[0].numel() if parts else 0
        slot = -(-n // 64) * 64 + 64  # aligned slots with a gap between them
        buf = torch.full((slot * (len(parts) + 1),), -1, dtype=dtype)
        order = np.random.default_rng().permutation(len(parts) + 1)[:len(parts)]
        views = []
        for part, k in zip(parts, order, strict=True):
            v = buf[k * slot:k * slot + n].view(part.shape)
            v.copy_(part)
            views.append(v)
        return tuple(views)

    return PackedExpertMatrix(
        kind=p.kind, b1=p.b1, bK=p.bK, group=p.group, rows=p.rows, cols=p.cols,
        planes=scatter([p.planes[j] for j in range(p.bits_held)], torch.int32),
        scale=p.scale, zero=p.zero,
        plane_scale=scatter([a for a in p.plane_scale], torch.float16))


@needs_triton_device
@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
def test_separate_planes_give_the_stacked_result(kind):
    from d2moe.kernels.triton_launch import KernelConfig, nested_matmul

    m, p = _packed(kind, 37, 200, 64)
    q = _scattered(p)
    assert q.bits_held == p.bits_held and torch.equal(dequantize_packed(q, 6),
                                                      dequantize_packed(p, 6))
    # the defaults (pipelined, one-word tiles); hand prefetch, 3-D tiles and split-K; tl.dot
    for tokens, bits, cfg in ((1, 3, None),
                              (2, 8, KernelConfig(block_n=64, block_w=2, split_k=2)),
                              (17, 6, None)):
        x = torch.randn(tokens, 200)
        want = nested_matmul(x, p, bits, config=cfg)
        got = nested_matmul(x, q, bits, out=torch.full_like(want, float("nan")), config=cfg)
        assert torch.equal(got, want), (tokens, bits)
        ref = x.double() @ dequantize(m, bits).double().t()
        assert _rel(got, ref) < GEMV_TOL
    with pytest.raises(UserError, match="plane 0"):  # checked once, when built
        PackedExpertMatrix(kind=q.kind, b1=q.b1, bK=q.bK, group=q.group, rows=q.rows,
                           cols=q.cols, planes=(q.planes[0].t(), *q.planes[1:]),
                           scale=q.scale, zero=q.zero, plane_scale=q.plane_scale)


@needs_triton_device
def test_split_k_and_block_configs():
    from d2moe.kernels.triton_launch import KernelConfig, nested_matmul

    m, p = _packed("bitplane", 24, 320, 64)
    x = torch.randn(2, 320)
    ref = x.double() @ dequantize(m, 6).double().t()
    for cfg, path in ((KernelConfig(block_n=16, block_w=2, split_k=3), "gemv"),
                      (KernelConfig(block_n=32, block_w=4, block_m=2, split_k=1), "gemv"),
                      (KernelConfig(block_n=16, block_w=2, split_k=0), "gemv"),
                      (KernelConfig(block_n=16, block_w=1, split_k=3, pipeline=3), "gemv"),
                      (KernelConfig(block_n=32, block_w=2, block_m=2, pipeline=2), "gemv"),
                      (KernelConfig(block_n=16, block_w=1, block_m=16), "dot")):
        out = torch.full((2, 24), float("nan"))
        assert _rel(nested_matmul(x, p, 6, out=out, config=cfg, path=path), ref) < GEMV_TOL


@needs_triton_device
@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
def test_gemv_one_word_tiles_without_masks(kind):
    # the GEMV on tiles one word wide (kept 2-D) over whole tiles (no masks on the planes):
    # one token per program, two (no mask on M either), four for three tokens (masked M);
    # split-K 2, by hand and under the pipeliner, and in the earlier 3-D form
    from d2moe.kernels.triton_launch import KernelConfig, nested_matmul

    m, p = _packed(kind, 16, 128, 64)
    # (tokens per program, tokens, bits, pipeline stages, flat); flat=False: the 3-D tiles
    cases = [(1, 2, 3, 0, True), (1, 2, 3, 2, True), (1, 2, 3, 2, False), (1, 2, 8, 2, True),
             (2, 2, 5, 0, True), (4, 3, 4, 2, True)]
    for block_m, tokens, bits, stages, flat in cases:
        x = torch.randn(tokens, 128)
        ref = x.double() @ dequantize(m, bits).double().t()
        cfg = KernelConfig(block_n=16, block_w=1, block_m=block_m, split_k=2, pipeline=stages,
                           flat=flat)
        out = torch.full((tokens, 16), float("nan"))
        y = nested_matmul(x, p, bits, out=out, config=cfg, path="gemv")
        assert _rel(y, ref) < GEMV_TOL, (block_m, bits, stages, flat)


@needs_triton_device
def test_split_k_reduction_leaves_counters_at_zero():
    """The last program of each tile writes the sum and cleans the workspace, so the next
    call (and a graph replay) starts clean: run twice with fresh inputs, check both."""
    from d2moe.kernels import triton_launch as tn

    cfg = tn.KernelConfig(block_n=16, block_w=1, split_k=4)
    for rows in (40, 32, 32):  # ragged tiles, then whole tiles (the unmasked EVEN variant)
        m, p = _packed("bitplane", rows, 256, 64)
        x = torch.randn(1, 256)
        out = torch.full((1, rows), float("nan"))
        y = tn.nested_matmul(x, p, 3, out=out, config=cfg, path="gemv")
        assert _rel(y, x.double() @ dequantize(m, 3).double().t()) < GEMV_TOL
        ws, counts = tn._workspace(x.device, 0, 0)
        assert int(counts.abs().sum()) == 0 and float(ws.abs().sum()) == 0.0


def test_dispatch_cpu_uses_torch_and_agrees():
    m, p = _packed("mwq", 12, 64, 32)
    x = torch.randn(2, 64)
    ref = x.double() @ dequantize(m, 4).double().t()
    assert _rel(expert_matmul(x, p, 4), ref) < 1e-5
    with pytest.raises(UserError, match="backend"):
        expert_matmul(x, p, 4, backend="cuda")
    with pytest.raises(UserError, match="outside"):
        expert_matmul(x, p, 9)


@needs_triton_device
def test_swiglu_backends_agree():
    hidden, ffn = 64, 48
    w1, w3, w2 = (_packed("bitplane", o, i, 32)[1]
                  for o, i in ((ffn, hidden), (ffn, hidden), (hidden, ffn)))
    x = torch.randn(3, hidden)
    a = expert_swiglu(x, w1, w3, w2, 4, backend="torch")
    b = expert_swiglu(x, w1, w3, w2, 4, backend="triton")
    assert _rel(b, a) < GEMV_TOL


def test_bad_inputs_are_user_errors():
    from d2moe.kernels.triton_launch import nested_matmul

    _, p = _packed("bitplane", 8, 64, 64)
    with pytest.raises(UserError, match="shape"):
        nested_matmul(torch.randn(2, 63), p, 4)
    _, p48 = _packed("bitplane", 8, 96, 48)
    with pytest.raises(UserError, match="power-of-two group"):
        nested_matmul(torch.randn(1, 96), p48, 4)
    # the dispatcher sends such a group to the torch path instead
    assert expert_matmul(torch.randn(1, 96), p48, 4, backend="auto").shape == (1, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
def test_cuda_fp16(kind):
    m, p = _packed(kind, 300, 512, 64, device="cuda")
    for tokens in (1, 4, 16):
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.float16)
        for bits in (2, 5, 8):
            y = expert_matmul(x, p, bits)
            ref = x.double() @ dequantize(m, bits, device="cuda").double().t()
            assert not torch.isnan(y).any() and _rel(y, ref) < 3e-3
            if tokens <= 4:  # the GEMV path under Triton's pipeliner
                from d2moe.kernels.triton_launch import KernelConfig, nested_matmul
                cfg = KernelConfig(block_n=256, block_w=1, block_m=tokens, pipeline=3)
                y = nested_matmul(x, p, bits, config=cfg, path="gemv")
                assert not torch.isnan(y).any() and _rel(y, ref) < 3e-3


@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
@pytest.mark.parametrize("rows,cols,group", [(5, 96, 32), (3, 45, 16), (4, 200, 64),
                                             (2, 40, 128)])
def test_fast_cpu_dequant_equals_reference(kind, rows, cols, group):
    from d2moe.kernels.torch_fallback import dequantize_fast

    _, p = _packed(kind, rows, cols, group, bK=6)
    for b in range(2, 7):
        assert torch.equal(dequantize_fast(p, b), dequantize_packed(p, b))
