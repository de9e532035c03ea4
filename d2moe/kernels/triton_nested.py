"""Triton fused dequantization + matrix product over nested bit planes (method.md, part 3).

y[M, N] = x[M, K] @ W[N, K]^T where W is a `PackedExpertMatrix` (word-major planes) read at
`bits` bits, a tl.constexpr: one compiled variant per bit-width. Each program loads the
plane words of its [BLOCK_W words, BLOCK_N rows] tile, rebuilds codes in registers,
applies the per-group fp16 scale/zero and multiplies: the unpacked matrix never touches
memory. Two paths:
  * GEMV (1..4 tokens): SWAR decode. For bit t of a word, (plane >> t) & 0x01010101 puts
    the bits of columns t, t+8, t+16, t+24 in the four byte lanes; shifting in the planes
    builds four codes per int32 op. A code q becomes the float 1 + q/2^NB by moving it to
    the top of the mantissa and OR-ing the bits of 1.0 (two integer ops, no int->float
    conversion); the per-word sum of (1 + q/2^NB) x, minus sum x, times 2^NB, is sum q x,
    and the group's scale and zero are applied once per word. Per weight: ~3 ops + 0.75
    per plane, plus one FMA per token. Split-K (fp32 atomics) fills the SMs when N is small.
  * dot (> 4 tokens): the dequantized [BLOCK_W*32, BLOCK_N] tile goes to tl.dot.
GROUP must be a power of two >= 32 (a word never straddles two groups).
Style follows the Triton matmul tutorial: grouped, commented kernel arguments; a wrapper
that checks, allocates and launches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from d2moe.core.errors import UserError

if TYPE_CHECKING:
    from d2moe.kernels.packed import PackedExpertMatrix

KIND_CODES = {"mwq": 0, "bitplane": 1}


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one path (block_w counts int32 words: 32 columns each)."""

    block_n: int = 128
    block_w: int = 8
    block_m: int = 1  # tokens per program (GEMV path: 1..16; dot path: >= 16)
    split_k: int = 0  # GEMV path: programs along K (fp32 atomics); 0 = enough to fill the SMs
    num_warps: int = 4
    num_stages: int = 2


# Defaults chosen offline from ptxas reports (registers, no spills) and SASS per weight:
# more rows per thread amortise each activation load over more weights (docs/results/kernels.md).
GEMV_CONFIG = KernelConfig(block_n=512, block_w=1, block_m=1, num_warps=4)
GEMV_FEW_CONFIG = KernelConfig(block_n=256, block_w=1, block_m=4, num_warps=4)
DOT_CONFIG = KernelConfig(block_n=64, block_w=4, block_m=16, split_k=1, num_warps=4,
                          num_stages=3)
GEMV_MAX_TOKENS = 4  # up to this many tokens: decode once per tile, one FMA per token
PATHS = ("auto", "gemv", "dot")
LANES = tl.constexpr(0x01010101)  # bit 0 of each byte: columns t, t+8, t+16, t+24 of a word
ONE_F32 = tl.constexpr(0x3F800000)  # bits of 1.0f


@triton.jit
def _plane(ptrs, j: tl.constexpr, plane_stride, mask, NB: tl.constexpr):
    """Words of plane j of the tile (zeros, no load, when j >= NB)."""
    if j < NB:  # noqa: SIM108 (constexpr branches: Triton resolves them at compile time)
        r = tl.load(ptrs + j * plane_stride, mask=mask, other=0)
    else:
        r = mask.to(tl.int32) * 0
    return r


@triton.jit
def _codes_at(p0, p1, p2, p3, p4, p5, p6, p7, t: tl.constexpr, NB: tl.constexpr):
    """Byte lane l of the result holds the NB-bit code of column 8*l + t of each word."""
    c = (p0 >> t) & LANES  # plane 0 is the most significant bit
    if NB > 1:
        c = (c << 1) | ((p1 >> t) & LANES)
    if NB > 2:
        c = (c << 1) | ((p2 >> t) & LANES)
    if NB > 3:
        c = (c << 1) | ((p3 >> t) & LANES)
    if NB > 4:
        c = (c << 1) | ((p4 >> t) & LANES)
    if NB > 5:
        c = (c << 1) | ((p5 >> t) & LANES)
    if NB > 6:
        c = (c << 1) | ((p6 >> t) & LANES)
    if NB > 7:
        c = (c << 1) | ((p7 >> t) & LANES)
    return c


@triton.jit
def _lane_floats(c, lane: tl.constexpr, NB: tl.constexpr):
    """1 + q / 2^NB for the NB-bit code q in byte `lane` of c: two integer ops, no I2F."""
    SH: tl.constexpr = 23 - NB - 8 * lane  # move the code to the top of the mantissa
    if SH >= 0:  # noqa: SIM108 (constexpr branch; a shift count must be non-negative)
        v = c << SH
    else:
        v = c >> (-SH)
    v = (v & (((1 << NB) - 1) << (23 - NB))) | ONE_F32
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _nested_gemv_kernel(
    # Activations x [M, K] and output y [M, N] (fp32 when SPLIT_K > 1: atomics)
    x_ptr, y_ptr, M, stride_xm, stride_ym,
    # Packed matrix, word-major (PackedExpertMatrix fields)
    planes_ptr, scale_ptr, zero_ptr, pscale_ptr,
    # Sizes: rows, columns, words per row; strides between planes; words per K slice
    N, K, KW, plane_stride, pscale_stride, words_per_split,
    # Format: KIND 0 = mwq, 1 = bitplane; BITS read; B1 base bits; BK code bits
    KIND: tl.constexpr, BITS: tl.constexpr, B1: tl.constexpr, BK: tl.constexpr,
    GROUP: tl.constexpr,
    # Tiling
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """One program: BLOCK_M tokens x BLOCK_N rows x one K slice; W decoded once per tile."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    NB: tl.constexpr = BITS if KIND == 1 else B1  # bits of the integer code
    WPG: tl.constexpr = GROUP // 32  # words per scale group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_lo = pid_k * words_per_split
    w_hi = tl.minimum(w_lo + words_per_split, KW)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for w0 in range(w_lo, w_hi, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        tile_mask = (offs_w[:, None] < w_hi) & (offs_n[None, :] < N)
        p_ptrs = planes_ptr + offs_w[:, None] * N + offs_n[None, :]
        g_off = (offs_w // WPG)[:, None] * N + offs_n[None, :]
        s = tl.load(scale_ptr + g_off, mask=tile_mask, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + g_off, mask=tile_mask, other=0.0).to(tl.float32)
        if KIND == 1:  # bitplane.py: s_b = s 2^(BK-BITS), z_b = z + s (2^(BK-BITS) - 1) / 2
            z = z + s * (((1 << (BK - BITS)) - 1) * 0.5)
            s = s * (1 << (BK - BITS))
        p0 = _plane(p_ptrs, 0, plane_stride, tile_mask, NB)
        p1 = _plane(p_ptrs, 1, plane_stride, tile_mask, NB)
        p2 = _plane(p_ptrs, 2, plane_stride, tile_mask, NB)
        p3 = _plane(p_ptrs, 3, plane_stride, tile_mask, NB)
        p4 = _plane(p_ptrs, 4, plane_stride, tile_mask, NB)
        p5 = _plane(p_ptrs, 5, plane_stride, tile_mask, NB)
        p6 = _plane(p_ptrs, 6, plane_stride, tile_mask, NB)
        p7 = _plane(p_ptrs, 7, plane_stride, tile_mask, NB)
        xk = (offs_w * 32)[None, :]  # first column of each word, [1, BLOCK_W]
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + xk
        x_mask = (offs_m[:, None] < M) & (offs_w[None, :] < w_hi)
        part = tl.zeros([BLOCK_M, BLOCK_W, BLOCK_N], dtype=tl.float32)
        xsum = tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.float32)
        for t in tl.static_range(8):
            c = _codes_at(p0, p1, p2, p3, p4, p5, p6, p7, t, NB)
            for lane in tl.static_range(4):
                col = 8 * lane + t
                xv = tl.load(x_ptrs + col, mask=x_mask & (xk + col < K), other=0.0)
                xv = xv.to(tl.float32)
                xsum += xv
                part += _lane_floats(c, lane, NB)[None, :, :] * xv[:, :, None]
        # part = sum_k (1 + q/2^NB) x  =>  sum_k q x = 2^NB (part - xsum)
        sq = s * (1 << NB)
        acc += tl.sum(sq[None, :, :] * (part - xsum[:, :, None])
                      + z[None, :, :] * xsum[:, :, None], axis=1)
        if KIND == 0:  # mwq.py: + sum_p alpha_p (2 sum bit_p x - sum x)
            for p in tl.static_range(BITS - B1):
                q = tl.load(p_ptrs + (B1 + p) * plane_stride, mask=tile_mask, other=0)
                a = tl.load(pscale_ptr + p * pscale_stride + g_off, mask=tile_mask,
                            other=0.0).to(tl.float32)
                part = tl.zeros([BLOCK_M, BLOCK_W, BLOCK_N], dtype=tl.float32)
                for t in tl.static_range(8):
                    c = (q >> t) & LANES
                    for lane in tl.static_range(4):
                        col = 8 * lane + t
                        xv = tl.load(x_ptrs + col, mask=x_mask & (xk + col < K), other=0.0)
                        part += _lane_floats(c, lane, 1)[None, :, :] * \
                            xv.to(tl.float32)[:, :, None]
                # part = sum (1 + bit/2) x => sum bit x = 2 (part - xsum)
                acc += tl.sum(a[None, :, :] * (4.0 * (part - xsum[:, :, None])
                                               - xsum[:, :, None]), axis=1)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)


@triton.jit
def _nested_dot_kernel(
    # Activations x [M, K] and output y [M, N]
    x_ptr, y_ptr, M, stride_xm, stride_ym,
    # Packed matrix, word-major (PackedExpertMatrix fields)
    planes_ptr, scale_ptr, zero_ptr, pscale_ptr,
    # Sizes and strides
    N, K, KW, plane_stride, pscale_stride,
    # Format and tiling
    KIND: tl.constexpr, BITS: tl.constexpr, B1: tl.constexpr, BK: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """One program: a [BLOCK_M, BLOCK_N] output tile; dequantized W tiles go to tl.dot."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    NB: tl.constexpr = BITS if KIND == 1 else B1
    WPG: tl.constexpr = GROUP // 32
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    shifts = tl.arange(0, 32)[None, :, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for w0 in range(0, KW, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        tile_mask = (offs_w[:, None] < KW) & (offs_n[None, :] < N)
        p_ptrs = planes_ptr + offs_w[:, None] * N + offs_n[None, :]
        g_off = (offs_w // WPG)[:, None] * N + offs_n[None, :]
        s = tl.load(scale_ptr + g_off, mask=tile_mask, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + g_off, mask=tile_mask, other=0.0).to(tl.float32)
        if KIND == 1:
            z = z + s * (((1 << (BK - BITS)) - 1) * 0.5)
            s = s * (1 << (BK - BITS))
        code = tl.zeros([BLOCK_W, 32, BLOCK_N], dtype=tl.int32)
        for j in tl.static_range(NB):
            words = tl.load(p_ptrs + j * plane_stride, mask=tile_mask, other=0)
            code = (code << 1) | ((words[:, None, :] >> shifts) & 1)
        w = code.to(tl.float32) * s[:, None, :] + z[:, None, :]
        if KIND == 0:
            for p in tl.static_range(BITS - B1):
                words = tl.load(p_ptrs + (B1 + p) * plane_stride, mask=tile_mask, other=0)
                a = tl.load(pscale_ptr + p * pscale_stride + g_off, mask=tile_mask,
                            other=0.0).to(tl.float32)
                bit = (words[:, None, :] >> shifts) & 1
                w += tl.where(bit != 0, a[:, None, :], -a[:, None, :])
        w = tl.reshape(w, [BLOCK_W * 32, BLOCK_N]).to(x_ptr.dtype.element_ty)
        kk = w0 * 32 + tl.arange(0, BLOCK_W * 32)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                    mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        acc = tl.dot(x, w, acc)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _check(x: torch.Tensor, packed: PackedExpertMatrix, bits: int) -> None:
    """Shape, device and layout checks shared by both paths (UserError on bad input)."""
    packed.check_bits(bits)
    if x.dim() != 2 or x.shape[1] != packed.cols:
        raise UserError(f"x has shape {tuple(x.shape)}, expected [tokens, {packed.cols}]",
                        field="x", fix="pass a 2-D activation matching the matrix's columns")
    if x.device != packed.device:
        raise UserError(f"x on {x.device}, weights on {packed.device}", field="x",
                        fix="move both to one device")
    g = packed.group
    if g < 32 or g & (g - 1):
        raise UserError(f"the Triton kernels need a power-of-two group >= 32, got {g}",
                        field="group", fix="use --group 32, 64 or 128, or the torch backend")


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs are enough


def _auto_split(programs: int, words: int, cfg: KernelConfig, device: torch.device) -> int:
    """K slices so that about two programs per SM run, each keeping >= 4 tiles of work."""
    if cfg.split_k:
        return cfg.split_k
    want = triton.cdiv(2 * _sm_count(device), programs)
    return max(1, min(want, words // (4 * cfg.block_w)))


def nested_matmul(x: torch.Tensor, packed: PackedExpertMatrix, bits: int,
                  out: torch.Tensor | None = None, config: KernelConfig | None = None,
                  path: str = "auto") -> torch.Tensor:
    """y = x @ W^T with W read at `bits` bits; x [M, K] (fp16/bf16/fp32) -> y [M, N] x.dtype."""
    if path not in PATHS:
        raise UserError(f"unknown kernel path {path!r}", field="path",
                        fix=f"use one of {', '.join(PATHS)}")
    _check(x, packed, bits)
    m_tokens = x.shape[0]
    gemv = path == "gemv" or (path == "auto" and m_tokens <= GEMV_MAX_TOKENS)
    cfg = config or (DOT_CONFIG if not gemv else GEMV_CONFIG if m_tokens == 1
                     else GEMV_FEW_CONFIG)
    x = x.contiguous()
    n, k = packed.rows, packed.cols
    if out is None:
        out = torch.empty((m_tokens, n), device=x.device, dtype=x.dtype)
    elif out.shape != (m_tokens, n) or out.dtype != x.dtype or out.stride(1) != 1:
        raise UserError(f"out has shape {tuple(out.shape)} {out.dtype}, expected "
                        f"({m_tokens}, {n}) {x.dtype}", field="out", fix="pass a matching out")
    if m_tokens == 0:
        return out
    planes, pscale = packed.planes, packed.plane_scale
    pscale_arg = pscale if pscale.numel() else packed.scale  # never read when empty
    pscale_stride = pscale.stride(0) if pscale.numel() else 0
    common = dict(KIND=KIND_CODES[packed.kind], BITS=bits, B1=packed.b1, BK=packed.bK,
                  GROUP=packed.group, BLOCK_N=cfg.block_n, BLOCK_W=cfg.block_w,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    kw = packed.words
    if gemv:
        block_m = min(triton.next_power_of_2(m_tokens), max(cfg.block_m, 1), GEMV_MAX_TOKENS)
        grid_nm = triton.cdiv(n, cfg.block_n) * triton.cdiv(m_tokens, block_m)
        split = _auto_split(grid_nm, kw, cfg, x.device)
        words_per_split = triton.cdiv(triton.cdiv(kw, split), cfg.block_w) * cfg.block_w
        split = triton.cdiv(kw, words_per_split)
        target = out if split == 1 else torch.zeros((m_tokens, n), device=x.device,
                                                    dtype=torch.float32)
        grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m_tokens, block_m))
        _nested_gemv_kernel[grid](
            x, target, m_tokens, x.stride(0), target.stride(0),
            planes, packed.scale, packed.zero, pscale_arg,
            n, k, kw, planes.stride(0), pscale_stride, words_per_split,
            BLOCK_M=block_m, SPLIT_K=split, **common)
        if split > 1:
            out.copy_(target)
        return out
    block_m = max(16, cfg.block_m)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m_tokens, block_m))
    _nested_dot_kernel[grid](
        x, out, m_tokens, x.stride(0), out.stride(0),
        planes, packed.scale, packed.zero, pscale_arg,
        n, k, kw, planes.stride(0), pscale_stride,
        BLOCK_M=block_m, **common)
    return out
