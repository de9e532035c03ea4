"""Reference dequantization in torch, at any b in [b1, bits held]: the ground truth of the kernels.

Two entry points that must agree bit for bit: `dequantize` reads a `NestedMatrix` (numpy
packed streams, the store's form), `dequantize_packed` reads a `PackedExpertMatrix` (int32
words, the kernels' form; also the CPU fallback's dequantizer). Formulas: `mwq.py` and
`bitplane.py`. Arithmetic is float32, in the kernels' order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from d2moe.kernels.packed import PackedExpertMatrix
    from d2moe.quant.nested import NestedMatrix


def _combine(bit_planes: list[torch.Tensor], scale: torch.Tensor, zero: torch.Tensor,
             plane_scale: Sequence[torch.Tensor], *, kind: str, b1: int, bK: int, group: int,
             bits: int, cols: int) -> torch.Tensor:
    """Dequantize from 0/1 int32 planes [rows, cols] and fp16 per-group params."""
    import torch

    col_group = torch.arange(cols, device=scale.device) // group

    def per_col(t: torch.Tensor) -> torch.Tensor:
        return t.float()[:, col_group]

    s, z = per_col(scale), per_col(zero)
    nbase = bits if kind == "bitplane" else b1
    code = torch.zeros_like(bit_planes[0])
    for j in range(nbase):
        code = (code << 1) | bit_planes[j]
    if kind == "bitplane":
        shift = bK - bits
        s_b = s * float(2 ** shift)
        z_b = z + s * float((2 ** shift - 1) / 2)
        return code.float() * s_b + z_b
    w = code.float() * s + z
    for p in range(bits - b1):
        a = per_col(plane_scale[p])
        w = w + torch.where(bit_planes[b1 + p] != 0, a, -a)
    return w


def dequantize(m: NestedMatrix, bits: int, device: str = "cpu") -> torch.Tensor:
    """float32 [rows, cols] weights of a NestedMatrix at `bits` bits."""
    import torch

    m.check_bits(bits)
    planes = [torch.from_numpy(m.plane_bits(j).astype(np.int32)).to(device)
              for j in range(bits)]
    return _combine(planes, torch.from_numpy(m.scale).to(device),
                    torch.from_numpy(m.zero).to(device),
                    torch.from_numpy(np.ascontiguousarray(m.plane_scale)).to(device),
                    kind=m.kind, b1=m.b1, bK=m.bK, group=m.group, bits=bits, cols=m.cols)


def unpack_words(words: torch.Tensor, cols: int) -> torch.Tensor:
    """int32 [ceil(cols/32), rows] (bit t of [w, n] = column 32w+t) -> 0/1 int32 [rows, cols]."""
    import torch

    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    bits = (words.t().unsqueeze(-1) >> shifts) & 1
    return bits.reshape(words.shape[1], -1)[:, :cols]


def dequantize_packed(p: PackedExpertMatrix, bits: int) -> torch.Tensor:
    """float32 [rows, cols] weights of a PackedExpertMatrix at `bits` bits (on its device)."""
    p.check_bits(bits)
    planes = [unpack_words(p.planes[j], p.cols) for j in range(bits)]
    return _combine(planes, p.scale.t(), p.zero.t(), [a.t() for a in p.plane_scale],
                    kind=p.kind, b1=p.b1, bK=p.bK, group=p.group, bits=bits, cols=p.cols)
