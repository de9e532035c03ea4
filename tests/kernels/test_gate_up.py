"""An expert's gate and up projections in one launch (`triton_launch.gate_up`) against the
separate products it replaces (interpreter on CPU; CUDA if any)."""

from __future__ import annotations

import pytest

from d2moe.core.errors import UserError
from tests.kernels.test_kernels import GEMV_TOL, _packed, _rel, _scattered, needs_triton_device

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
from d2moe.kernels.dispatch import expert_swiglu  # noqa: E402
from d2moe.kernels.packed import PackedExpertMatrix  # noqa: E402
from d2moe.quant.reference import dequantize  # noqa: E402


def _pair(kind: str, rows: int, cols: int, group: int):
    (m1, w1), (m3, w3) = _packed(kind, rows, cols, group), _packed(kind, rows, cols, group)
    return (m1, m3), (w1, w3)


def _reference(x: torch.Tensor, m1, m3, bits: int) -> torch.Tensor:
    g = x.double() @ dequantize(m1, bits, device=x.device).double().t()
    u = x.double() @ dequantize(m3, bits, device=x.device).double().t()
    return torch.nn.functional.silu(g) * u


@needs_triton_device
@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
@pytest.mark.parametrize("rows,cols,group,tokens,bits,split_k", [
    (21, 136, 64, 1, 2, 1),   # ragged rows and columns, no split: the product in the program
    (21, 136, 64, 1, 5, 3),   # split-K: the product in each tile's last program to arrive
    (16, 128, 32, 2, 8, 2),   # whole tiles (no masks), two tokens per program
    (20, 96, 32, 3, 3, 0),    # three tokens in a program of four; the automatic split
    (16, 64, 64, 6, 4, 0),    # beyond the GEMV path: two dot launches
])
def test_gate_up_matches_the_separate_products(kind, rows, cols, group, tokens, bits,
                                               split_k):
    from d2moe.kernels.triton_launch import KernelConfig, gate_up

    (m1, m3), (w1, w3) = _pair(kind, rows, cols, group)
    cfg = KernelConfig(block_n=16, block_w=1, block_m=4, split_k=split_k, pipeline=2)
    x = torch.randn(tokens, cols)
    out = torch.full((tokens, rows), float("nan"))
    h = gate_up(x, w1, w3, bits, out=out, config=cfg)
    assert h.data_ptr() == out.data_ptr() and not torch.isnan(h).any()
    assert _rel(h, _reference(x, m1, m3, bits)) < GEMV_TOL


@needs_triton_device
def test_gate_up_with_planes_where_the_pool_puts_them_and_a_clean_workspace():
    """w1 and w3 with every plane in its own shuffled slot (their offsets differ, as in the
    pool's level blocks); the split-K workspace (both halves) and counters end at zero."""
    from d2moe.kernels import triton_launch as tn

    (m1, m3), (w1, w3) = _pair("bitplane", 24, 128, 64)
    w1s, w3s = _scattered(w1), _scattered(w3)
    cfg = tn.KernelConfig(block_n=16, block_w=1, split_k=2, pipeline=2)
    bits = 6  # the base's two planes and four later ones, each in its own slot
    x = torch.randn(1, 128)
    h = tn.gate_up(x, w1s, w3s, bits, config=cfg)
    assert torch.equal(h, tn.gate_up(x, w1, w3, bits, config=cfg))
    assert _rel(h, _reference(x, m1, m3, bits)) < GEMV_TOL
    ws, counts = tn._workspace(x.device, 0, 0)
    assert int(counts.abs().sum()) == 0 and float(ws.abs().sum()) == 0.0


@needs_triton_device
@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
def test_fused_expert_equals_the_three_launches(kind):
    hidden, ffn = 64, 48
    w1, w3, w2 = (_packed(kind, o, i, 32)[1]
                  for o, i in ((ffn, hidden), (ffn, hidden), (hidden, ffn)))
    for tokens in (1, 3):  # mwq at 3 tokens: the separate launches (> 4: test above)
        x = torch.randn(tokens, hidden)
        a = expert_swiglu(x, w1, w3, w2, 4, backend="triton", fused=False)
        b = expert_swiglu(x, w1, w3, w2, 4, backend="triton", fused=True)
        assert _rel(b, a) < GEMV_TOL, tokens


def test_gate_up_rejects_a_mismatched_pair():
    from d2moe.kernels.triton_launch import gate_up

    _, w1 = _packed("bitplane", 16, 64, 32)
    _, w3 = _packed("bitplane", 8, 64, 32)
    with pytest.raises(UserError, match="w1 and w3 differ"):
        gate_up(torch.randn(1, 64), w1, w3, 4)
    _, w3m = _packed("mwq", 16, 64, 32)
    with pytest.raises(UserError, match="w1 and w3 differ"):
        gate_up(torch.randn(1, 64), w1, w3m, 4)
    m3, _ = _packed("bitplane", 16, 64, 32)
    w3_low = PackedExpertMatrix.from_nested(m3, bits=3)  # only 3 planes resident
    with pytest.raises(UserError, match="outside"):
        gate_up(torch.randn(1, 64), w1, w3_low, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["mwq", "bitplane"])
def test_cuda_fp16_gate_up(kind):
    from d2moe.kernels.triton_launch import gate_up

    (m1, m3), (w1, w3) = _pair(kind, 300, 512, 64)
    w1, w3 = w1.to("cuda"), w3.to("cuda")
    for tokens in (1, 4):
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.float16)
        for bits in (2, 5, 8):
            h = gate_up(x, w1, w3, bits)
            assert not torch.isnan(h).any() and _rel(h, _reference(x, m1, m3, bits)) < 3e-3


def test_bad_inputs_to_the_launch_wrappers_are_user_errors():
    """No launch happens for any of these: each fails in the wrapper's checks."""
    import numpy as np

    from d2moe.kernels.triton_launch import KernelConfig, check_inputs, gate_up, nested_matmul

    (_, _), (w1, w3) = _pair("bitplane", 16, 64, 32)
    x = torch.randn(2, 64)
    for bad_x in (x.to(torch.int32), x > 0, x.to(torch.complex64), x.double()):
        with pytest.raises(UserError, match="field 'x'"):
            gate_up(bad_x, w1, w3, 4)
    for bits in (4.0, "4", None):
        with pytest.raises(UserError, match="field 'bits'"):
            nested_matmul(x, w1, bits)
    for out in (torch.empty(2, 16, device="meta"), torch.zeros(1, 16).expand(2, 16),
                [0.0] * 32, torch.empty(2, 16, dtype=torch.float64)):
        with pytest.raises(UserError, match="field 'out'"):
            gate_up(x, w1, w3, 4, out=out)
    square = _packed("bitplane", 64, 64, 32)[1]
    with pytest.raises(UserError, match="overlaps x"):
        nested_matmul(x, square, 4, out=x)
    with pytest.raises(UserError, match="overlaps x"):  # out's rows run into x's
        both = torch.randn(3, 64)
        nested_matmul(both[:2], square, 4, out=both[1:])
    rows = torch.randn(4, 64)  # separate rows of one tensor do not overlap: allowed
    assert nested_matmul(rows[:2], square, 4, out=rows[2:]).data_ptr() == rows[2:].data_ptr()
    with pytest.raises(UserError, match="field 'out'"):
        gate_up(x, w1, w3, 4, out=torch.empty(2, 16, requires_grad=True))
    for field, value in (("block_n", 48), ("block_w", 0), ("split_k", -1), ("num_warps", 3),
                         ("block_n", 1 << 21), ("num_warps", 64), ("flat", "no")):
        with pytest.raises(UserError, match=f"field '{field}'"):
            KernelConfig(**{field: value})
    bits = check_inputs(torch.randn(1, 64), w1, np.int64(4))  # a whole number: taken
    assert bits == 4 and type(bits) is int  # as the int the kernels specialize on
