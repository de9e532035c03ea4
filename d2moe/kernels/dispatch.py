"""One entry point for the executor: `expert_matmul` (and `expert_swiglu`) by device.

CUDA tensors go to the Triton kernels, everything else to the torch fallback.
`TRITON_INTERPRET=1` lets tests run the Triton path on CPU tensors (backend="triton").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from d2moe.core.errors import UserError

if TYPE_CHECKING:
    import torch

    from d2moe.kernels.packed import PackedExpertMatrix
    from d2moe.kernels.torch_fallback import PlaneViews

BACKENDS = ("auto", "triton", "torch")


def _triton_usable(packed: PackedExpertMatrix) -> bool:
    g = packed.group
    return g >= 32 and not g & (g - 1)


def expert_matmul(x: torch.Tensor, packed: PackedExpertMatrix | PlaneViews, bits: int,
                  backend: str = "auto") -> torch.Tensor:
    """y = x @ W^T, W = `packed` at `bits` bits; Triton on CUDA, torch elsewhere (always for
    `PlaneViews`, the CPU pool's per-plane views)."""
    if backend not in BACKENDS:
        raise UserError(f"unknown kernel backend {backend!r}", field="backend",
                        fix=f"use one of {', '.join(BACKENDS)}")
    from d2moe.kernels.packed import PackedExpertMatrix

    if not isinstance(packed, PackedExpertMatrix):
        backend = "torch"  # PlaneViews: CPU numpy views, the fallback's own input
    elif backend == "auto":
        backend = "triton" if x.is_cuda and _triton_usable(packed) else "torch"
    if backend == "triton":
        from d2moe.kernels.triton_nested import nested_matmul

        return nested_matmul(x, packed, bits)
    from d2moe.kernels.torch_fallback import dequant_matmul

    packed.check_bits(bits)
    return dequant_matmul(x, packed, bits)


def expert_swiglu(x: torch.Tensor, w1: PackedExpertMatrix | PlaneViews,
                  w3: PackedExpertMatrix | PlaneViews, w2: PackedExpertMatrix | PlaneViews,
                  bits: int, backend: str = "auto") -> torch.Tensor:
    """One SwiGLU expert (Mixtral): w2 @ (silu(w1 @ x) * (w3 @ x)), all at `bits` bits."""
    import torch.nn.functional as F

    h = F.silu(expert_matmul(x, w1, bits, backend)) * expert_matmul(x, w3, bits, backend)
    return expert_matmul(h, w2, bits, backend)
