"""The CPU path: dequantize in torch (uint8 codes, grouped broadcasts), then one matmul.

Bit-for-bit equal to `d2moe.quant.reference.dequantize_packed` (same float32 operations in
the same order; tested), but unpacks with numpy's unpackbits on the CPU, builds codes in
uint8 and applies scales by broadcasting over [rows, groups, group] instead of gathering
per column. Also the
"dequantize-then-matmul" baseline that the kernel benchmark measures on CUDA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from d2moe.kernels.packed import PackedExpertMatrix


def _plane_bits(words: torch.Tensor, rows: int, cols_padded: int) -> torch.Tensor:
    """int32 [words, rows] plane -> uint8 0/1 [rows, cols_padded] (column 32w + t = bit t)."""
    import numpy as np
    import torch

    if words.device.type == "cpu":  # numpy's unpackbits is ~10x faster than torch ops here
        as_bytes = words.t().contiguous().view(torch.uint8).numpy()  # little endian
        bits = torch.from_numpy(np.unpackbits(as_bytes, axis=-1, bitorder="little"))
    else:
        shifts = torch.arange(32, device=words.device, dtype=torch.int32)
        bits = ((words.t().unsqueeze(-1) >> shifts) & 1).to(torch.uint8).reshape(rows, -1)
    return bits[:, :cols_padded]


def dequantize_fast(p: PackedExpertMatrix, bits: int) -> torch.Tensor:
    """float32 [rows, cols] weights at `bits` bits; equal to the reference bit for bit."""
    import torch

    p.check_bits(bits)
    rows, g, groups = p.rows, p.group, p.groups
    padded = groups * g  # whole groups; may exceed words*32 when group > 32
    nbase = bits if p.kind == "bitplane" else p.b1

    def grouped_bits(j: int) -> torch.Tensor:
        b = _plane_bits(p.planes[j], rows, min(padded, p.words * 32))
        if b.shape[1] < padded:
            b = torch.nn.functional.pad(b, (0, padded - b.shape[1]))
        return b.reshape(rows, groups, g)

    code = grouped_bits(0).clone()  # uint8 codes: at most 8 bits
    for j in range(1, nbase):
        code = (code << 1) | grouped_bits(j)
    s = p.scale.t().float().unsqueeze(-1)  # [rows, groups, 1]
    z = p.zero.t().float().unsqueeze(-1)
    if p.kind == "bitplane":
        shift = p.bK - bits
        w = code.float() * (s * float(2 ** shift)) + (z + s * float((2 ** shift - 1) / 2))
    else:
        w = code.float() * s + z
        for q in range(bits - p.b1):
            a = p.plane_scale[q].t().float().unsqueeze(-1)
            w = w + torch.where(grouped_bits(p.b1 + q) != 0, a, -a)
    return w.reshape(rows, padded)[:, :p.cols]


def dequant_matmul(x: torch.Tensor, packed: PackedExpertMatrix, bits: int) -> torch.Tensor:
    """y = x @ W^T with W materialised at `bits` bits in x.dtype; y in x.dtype."""
    import torch

    w = dequantize_fast(packed, bits)
    if x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda:
        return x @ w.to(x.dtype).t()
    return (x.float() @ w.t()).to(x.dtype)
