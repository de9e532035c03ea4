"""One entry point for the executor: `expert_matmul` (and `expert_swiglu`) by device.

CUDA tensors go to the Triton kernels, everything else to the torch fallback.
`TRITON_INTERPRET=1` lets tests run the Triton path on CPU tensors (backend="triton").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from d2moe.core.errors import UserError
from d2moe.kernels.torch_fallback import PlaneViews, swiglu_views

if TYPE_CHECKING:
    import torch

    from d2moe.kernels.packed import PackedExpertMatrix

BACKENDS = ("auto", "triton", "torch")


# An expert's gate and up projections in one launch (`triton_launch.gate_up`) on the Triton
# path: off until a GPU times it against the four launches it replaces (w1, w3, silu, mul)
# (benchmarks/gate_up.py; docs/results/kernels.md). MWQ at 2-4 tokens always takes the
# separate launches: compiled for sm_90 the paired kernel spills there (192-696 B of stack).
FUSED_GATE_UP = False


def _triton_usable(packed: PackedExpertMatrix) -> bool:
    g = packed.group
    return g >= 32 and not g & (g - 1)


def _backend(x: torch.Tensor, packed: PackedExpertMatrix | PlaneViews, backend: str) -> str:
    """"triton" or "torch" for this call: `backend`, checked, with "auto" resolved."""
    if backend not in BACKENDS:
        raise UserError(f"unknown kernel backend {backend!r}", field="backend",
                        fix=f"use one of {', '.join(BACKENDS)}")
    from d2moe.kernels.packed import PackedExpertMatrix

    if not isinstance(packed, PackedExpertMatrix):
        return "torch"  # PlaneViews: CPU numpy views, the fallback's own input
    if backend == "auto":
        return "triton" if x.is_cuda and _triton_usable(packed) else "torch"
    return backend


def expert_matmul(x: torch.Tensor, packed: PackedExpertMatrix | PlaneViews, bits: int,
                  backend: str = "auto") -> torch.Tensor:
    """y = x @ W^T, W = `packed` at `bits` bits; Triton on CUDA, torch elsewhere (always for
    `PlaneViews`, the CPU pool's per-plane views)."""
    if _backend(x, packed, backend) == "triton":
        from d2moe.kernels.triton_launch import nested_matmul

        return nested_matmul(x, packed, bits)
    from d2moe.kernels.torch_fallback import dequant_matmul

    packed.check_bits(bits)
    return dequant_matmul(x, packed, bits)


def expert_swiglu(x: torch.Tensor, w1: PackedExpertMatrix | PlaneViews,
                  w3: PackedExpertMatrix | PlaneViews, w2: PackedExpertMatrix | PlaneViews,
                  bits: int, backend: str = "auto",
                  fused: bool = FUSED_GATE_UP) -> torch.Tensor:
    """One SwiGLU expert (Mixtral): w2 @ (silu(w1 @ x) * (w3 @ x)), all at `bits` bits;
    `fused`: w1 and w3 in one launch where the Triton GEMV path runs (`FUSED_GATE_UP`). CPU
    views at a few tokens: the whole expert in one native call (`swiglu_views`)."""
    import torch.nn.functional as F

    if (isinstance(w1, PlaneViews) and isinstance(w3, PlaneViews) and isinstance(w2, PlaneViews)
            and _backend(x, w1, backend) == "torch"):  # (checks `backend`)
        y = swiglu_views(x, w1, w3, w2, bits)
        if y is not None:
            return y
    h = None
    if fused and _backend(x, w1, backend) == "triton":
        from d2moe.kernels.triton_launch import GEMV_MAX_TOKENS, gate_up

        tokens = x.shape[0]
        if tokens <= GEMV_MAX_TOKENS and (w1.kind == "bitplane" or tokens == 1):
            h = gate_up(x, w1, w3, bits)
    if h is None:
        h = F.silu(expert_matmul(x, w1, bits, backend)) * expert_matmul(x, w3, bits, backend)
    return expert_matmul(h, w2, bits, backend)
