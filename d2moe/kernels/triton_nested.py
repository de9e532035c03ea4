"""Triton fused dequantization + matrix product over nested bit planes (method.md, part 3).

y[M, N] = x[M, K] @ W[N, K]^T where W is a `PackedExpertMatrix` (word-major planes) read at
`bits` bits, a tl.constexpr: one compiled variant per bit-width. Each program loads the
plane words of its [BLOCK_W words, BLOCK_N rows] tile, rebuilds codes in registers,
applies the per-group fp16 scale/zero and multiplies: the unpacked matrix never touches
memory. Two paths:
  * GEMV (1..4 tokens): SWAR decode. For bit t of a word, shifting plane j so that bits
    t, t+8, t+16, t+24 land on bit NB-1-j of the four byte lanes and and-or-ing it in (one
    shift + one LOP3 per plane) builds four codes per int32. One PRMT per weight then moves
    a code byte into the mantissa of a constant (no int->float conversion): 0.5 + q/256 for
    codes of <= 7 bits, 2^23 + q (minus 2^23) at 8; sums over a word are rescaled and the
    group's scale and zero applied once per word, one FMA per weight and token. The K loop
    runs under Triton's software pipeliner (or, `pipeline=0`, prefetches one tile by hand).
    Split-K puts about 16 programs on each SM (the GEMV is latency-bound); partials meet in
    a self-cleaning fp32 accumulator (one launch).
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
    split_k: int = 0  # GEMV path: programs along K; 0 = auto_split (about 16 per SM)
    num_warps: int = 4
    num_stages: int = 2
    pipeline: int = 0  # GEMV path: 0 = prefetch one tile by hand; >= 2 = tl.range stages
    flat: bool = True  # GEMV path, one-word tiles: 2-D tensors (False: the earlier 3-D form)


# GEMV defaults: from SASS counts per weight (benchmarks/kernels_sass.py) and H100 sweeps
# (docs/results/kernels.md): 512 rows x 1 word x 4 warps was among the three fastest in five
# of the six Mixtral (shape, 2/4/8-bit) cases; Triton's pipeliner at 2 stages with the
# split of auto_split beat the one-tile prefetch by hand, 1.39x geomean at 1 token and
# 1.28x at 4 over 12 cases each (0.95x at worst: Mixtral w2 at 4 bits). Those timings came
# before `_decode_w1`, which removed layout conversions from both variants' loops (compiler
# output; the choice between them is to be re-timed with `--tune-set pipeline`).
GEMV_CONFIG = KernelConfig(block_n=512, block_w=1, block_m=1, num_warps=4, pipeline=2)
GEMV_FEW_CONFIG = KernelConfig(block_n=256, block_w=1, block_m=4, num_warps=4, pipeline=2)
DOT_CONFIG = KernelConfig(block_n=64, block_w=4, block_m=16, split_k=1, num_warps=4,
                          num_stages=3)
GEMV_MAX_TOKENS = 4  # up to this many tokens: decode once per tile, one FMA per token
PATHS = ("auto", "gemv", "dot")
LANES = tl.constexpr(0x01010101)  # bit 0 of each byte: columns t, t+8, t+16, t+24 of a word
# Codes become floats without int-to-float conversion (a quarter of the integer rate): the
# code byte is moved into the mantissa of a constant. NB <= 7: the byte becomes bits 16..23
# of 0x3F000000, giving 0.5 + q/256 (the code sits in the top mantissa bits, so the sum
# over a word stays accurate; the kernel subtracts 0.5 sum x once per word). NB = 8 needs
# bit 23 too: the byte becomes bits 0..7 of 2^23, and 2^23 is subtracted per weight.
HALF = tl.constexpr(0x3F000000)  # bits of 0.5
ONE = tl.constexpr(0x3F800000)  # bits of 1.0
MAGIC = tl.constexpr(0x4B000000)  # bits of 2^23
MAGIC_F = tl.constexpr(8388608.0)  # 2^23


@triton.jit
def _load_plane(ptrs, j: tl.constexpr, plane_offs, mask, NB: tl.constexpr,
                EVEN: tl.constexpr):
    """Words of plane j of the tile (zeros, no load, when j >= NB)."""
    if j >= NB:
        r = tl.zeros(ptrs.shape, tl.int32)
    elif EVEN:
        r = tl.load(ptrs + plane_offs[j])
    else:
        r = tl.load(ptrs + plane_offs[j], mask=mask, other=0)
    return r


@triton.jit
def _load_tile(planes_ptr, scale_ptr, zero_ptr, offs_w, offs_n, n_ok, w_hi, N, plane_offs,
               NB: tl.constexpr, WPG: tl.constexpr, EVEN: tl.constexpr):
    """Plane words (8, zeros past NB), scales and zeros of the tile at words `offs_w`."""
    mask = (offs_w[:, None] < w_hi) & n_ok
    ptrs = planes_ptr + offs_w[:, None] * N + offs_n[None, :]
    g_off = (offs_w // WPG)[:, None] * N + offs_n[None, :]
    return (_load_plane(ptrs, 0, plane_offs, mask, NB, EVEN),
            _load_plane(ptrs, 1, plane_offs, mask, NB, EVEN),
            _load_plane(ptrs, 2, plane_offs, mask, NB, EVEN),
            _load_plane(ptrs, 3, plane_offs, mask, NB, EVEN),
            _load_plane(ptrs, 4, plane_offs, mask, NB, EVEN),
            _load_plane(ptrs, 5, plane_offs, mask, NB, EVEN),
            _load_plane(ptrs, 6, plane_offs, mask, NB, EVEN),
            _load_plane(ptrs, 7, plane_offs, mask, NB, EVEN),
            tl.load(scale_ptr + g_off, mask=mask, other=0.0),
            tl.load(zero_ptr + g_off, mask=mask, other=0.0))


@triton.jit
def _gather(c, p, j: tl.constexpr, t: tl.constexpr, NB: tl.constexpr):
    """OR bit 8l + t of plane word p into bit 8l + (NB-1-j) of c, for the 4 byte lanes l.

    One shift and one and-or (LOP3) per plane for 4 weights. Plane 0 is the most
    significant bit. An arithmetic right shift fills bits >= 32 - D with the sign; the
    mask keeps bits <= 24 + 7 - D only, so the fill never reaches the result."""
    D: tl.constexpr = t - (NB - 1 - j)
    if j >= NB:
        r = c
    else:
        if D > 0:
            v = p >> D
        elif D < 0:
            v = p << (-D)
        else:
            v = p
        M: tl.constexpr = (((LANES << (NB - 1 - j)) ^ 0x80000000) - 0x80000000)  # as int32
        r = c | (v & M)
    return r


@triton.jit
def _codes(p0, p1, p2, p3, p4, p5, p6, p7, t: tl.constexpr, NB: tl.constexpr):
    """Byte lane l of the result holds the NB-bit code of column 8l + t of each word."""
    c = _gather(p0 & 0, p0, 0, t, NB)
    c = _gather(c, p1, 1, t, NB)
    c = _gather(c, p2, 2, t, NB)
    c = _gather(c, p3, 3, t, NB)
    c = _gather(c, p4, 4, t, NB)
    c = _gather(c, p5, 5, t, NB)
    c = _gather(c, p6, 6, t, NB)
    c = _gather(c, p7, 7, t, NB)
    return c


@triton.jit
def _lane_code(c, magic, lane: tl.constexpr, NB: tl.constexpr, ASM: tl.constexpr):
    """The code q in byte `lane` of c as a float: 0.5 + q/256 when NB <= 7, else q exactly.

    On CUDA one PRMT moves the byte into `magic` (HALF or MAGIC, a register); ptxas
    otherwise emits up to three integer ops per weight for the shifts and masks. The
    interpreter takes the shift-and-mask form of the same bits."""
    if NB <= 7:
        if ASM:
            SEL: tl.constexpr = 0x7054 | (lane << 8)  # bytes: 0, 0, c.byte[lane], 0x3F
            v = tl.inline_asm_elementwise(
                asm=f"prmt.b32 $0, $1, $2, {SEL};", constraints="=r,r,r", args=[c, magic],
                dtype=tl.int32, is_pure=True, pack=1)
        else:
            if lane < 2:
                v = c << (16 - 8 * lane)
            elif lane > 2:
                v = c >> 8
            else:
                v = c
            v = (v & 0x00FF0000) | HALF
        f = v.to(tl.float32, bitcast=True)
    else:
        if ASM:
            SEL8: tl.constexpr = 0x7650 | lane  # bytes: c.byte[lane], then 2^23's bytes 1..3
            v = tl.inline_asm_elementwise(
                asm=f"prmt.b32 $0, $1, $2, {SEL8};", constraints="=r,r,r", args=[c, magic],
                dtype=tl.int32, is_pure=True, pack=1)
        else:
            if lane > 0:  # noqa: SIM108 (constexpr branches: Triton resolves them at compile time)
                v = c >> (8 * lane)
            else:
                v = c
            v = (v & 0xFF) | MAGIC
        f = v.to(tl.float32, bitcast=True) - MAGIC_F
    return f


@triton.jit
def _lane_bit(c, lane: tl.constexpr):
    """1 + b/2 for the bit b at bit 8 * lane of c: the bit becomes the top mantissa bit of 1.0,
    exact in the sum over a word (MWQ's residual planes, one scale each: their products
    are summed per plane, so the byte-move form's lost precision would add up per plane)."""
    SH: tl.constexpr = 22 - 8 * lane
    if SH >= 0:  # noqa: SIM108 (constexpr branch; a shift count must be non-negative)
        v = c << SH
    else:
        v = c >> (-SH)
    v = (v & (1 << 22)) | ONE
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _x_column(ptrs, m_ok, ok, EVEN: tl.constexpr, EVEN_M: tl.constexpr):
    """One column of x per word of the tile, as float32: no mask on whole tiles, the token
    mask `m_ok` when only M is ragged, else `ok` (tokens, words and K)."""
    if EVEN and EVEN_M:
        xv = tl.load(ptrs)
    elif EVEN:
        xv = tl.load(ptrs, mask=m_ok, other=0.0)
    else:
        xv = tl.load(ptrs, mask=ok, other=0.0)
    return xv.to(tl.float32)


@triton.jit
def _residual_plane(planes_ptr, pscale_ptr, offs_w, offs_n, n_ok, w_hi, N, plane_offs,
                    pscale_offs, j: tl.constexpr, pl: tl.constexpr, WPG: tl.constexpr):
    """MWQ: the tile's words of plane j (residual plane pl) and that plane's float32 scales."""
    tile_mask = (offs_w[:, None] < w_hi) & n_ok
    q = tl.load(planes_ptr + offs_w[:, None] * N + offs_n[None, :] + plane_offs[j],
                mask=tile_mask, other=0)
    a = tl.load(pscale_ptr + pscale_offs[pl] + (offs_w // WPG)[:, None] * N
                + offs_n[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    return q, a


@triton.jit
def _word_scale_zero(s, z, KIND: tl.constexpr, BITS: tl.constexpr, BK: tl.constexpr,
                     NB: tl.constexpr):
    """The group's float32 scale and zero applied to a word's sums (sum q x, sum x)."""
    sf = s.to(tl.float32)
    zf = z.to(tl.float32)
    if KIND == 1:  # bitplane.py: s_b = s 2^(BK-BITS), z_b = z + s (2^(BK-BITS) - 1) / 2
        zf = zf + sf * (((1 << (BK - BITS)) - 1) * 0.5)
        sf = sf * (1 << (BK - BITS))
    if NB <= 7:  # part = sum (0.5 + q/256) x  =>  sum q x = 256 part - 128 sum x
        zf = zf - 128.0 * sf
        sf = 256.0 * sf
    return sf, zf


@triton.jit
def _decode_w1(acc, x_ptr, M, stride_xm, K, w_hi, offs_m, offs_n, n_ok, offs_w,
               p0, p1, p2, p3, p4, p5, p6, p7, s, z, magic,
               planes_ptr, pscale_ptr, N, plane_offs, pscale_offs,
               KIND: tl.constexpr, BITS: tl.constexpr, B1: tl.constexpr, BK: tl.constexpr,
               NB: tl.constexpr, WPG: tl.constexpr, EVEN: tl.constexpr, EVEN_M: tl.constexpr,
               ASM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """`_decode_tile` for tiles one word wide: acc and every product [BLOCK_M, BLOCK_N], the
    tile's words, scales and zeros [1, BLOCK_N]."""
    xk = tl.sum(offs_w, axis=0) * 32  # the word's first column (BLOCK_W == 1)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + xk  # [BLOCK_M, 1]
    m_ok = offs_m[:, None] < M
    part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    xsum = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    for t in tl.static_range(8):
        c = _codes(p0, p1, p2, p3, p4, p5, p6, p7, t, NB)
        for lane in tl.static_range(4):
            col = 8 * lane + t
            xv = _x_column(x_ptrs + col, m_ok, m_ok & (xk + col < K) & (xk < w_hi * 32),
                           EVEN, EVEN_M)  # [BLOCK_M, 1]
            xsum += xv
            part += _lane_code(c, magic, lane, NB, ASM) * xv
    sf, zf = _word_scale_zero(s, z, KIND, BITS, BK, NB)
    acc += sf * part + zf * xsum
    if KIND == 0:  # mwq.py: + sum_p alpha_p (2 sum bit_p x - sum x)
        for pl in tl.static_range(BITS - B1):
            q, a = _residual_plane(planes_ptr, pscale_ptr, offs_w, offs_n, n_ok, w_hi, N,
                                   plane_offs, pscale_offs, B1 + pl, pl, WPG)
            part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for t in tl.static_range(8):
                c = (q >> t) & LANES
                for lane in tl.static_range(4):
                    col = 8 * lane + t
                    xv = tl.load(x_ptrs + col, mask=m_ok & (xk + col < K) & (xk < w_hi * 32),
                                 other=0.0)
                    part += _lane_bit(c, lane) * xv.to(tl.float32)
            # alpha (2 sum bit x - sum x) = alpha (4 part - 5 sum x), as in _decode_tile
            acc += a * (4.0 * part - 5.0 * xsum)
    return acc


@triton.jit
def _decode_tile(acc, x_ptr, M, stride_xm, K, w_hi, offs_m, offs_n, n_ok, offs_w,
                 p0, p1, p2, p3, p4, p5, p6, p7, s, z, magic,
                 planes_ptr, pscale_ptr, N, plane_offs, pscale_offs,
                 KIND: tl.constexpr, BITS: tl.constexpr, B1: tl.constexpr, BK: tl.constexpr,
                 NB: tl.constexpr, WPG: tl.constexpr, EVEN: tl.constexpr,
                 EVEN_M: tl.constexpr, ASM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, FLAT: tl.constexpr):
    """acc + this tile's products: sum_k q x per (token, word, row), then scale and zero.

    Tiles one word wide (BLOCK_W == 1, every default) keep every tensor 2-D (FLAT): with the
    [BLOCK_M, 1, BLOCK_N] product the compiler converted each of the 32 decoded columns of a
    word between layouts through shared memory, a barrier each (benchmarks/kernels_sass.py:
    0.5 barriers per weight at 1 token from 4 bits up, 1 at 4 tokens). FLAT = False keeps
    the 3-D form, the baseline to time the 2-D one against."""
    if FLAT and BLOCK_W == 1:
        acc = _decode_w1(acc, x_ptr, M, stride_xm, K, w_hi, offs_m, offs_n, n_ok, offs_w,
                         p0, p1, p2, p3, p4, p5, p6, p7, s, z, magic,
                         planes_ptr, pscale_ptr, N, plane_offs, pscale_offs,
                         KIND, BITS, B1, BK, NB, WPG, EVEN, EVEN_M, ASM, BLOCK_M, BLOCK_N)
    else:
        xk = (offs_w * 32)[None, :]  # first column of each word, [1, BLOCK_W]
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + xk
        x_mask = (offs_m[:, None] < M) & (offs_w[None, :] < w_hi)
        part = tl.zeros([BLOCK_M, BLOCK_W, BLOCK_N], dtype=tl.float32)
        xsum = tl.zeros([BLOCK_M, BLOCK_W], dtype=tl.float32)
        for t in tl.static_range(8):
            c = _codes(p0, p1, p2, p3, p4, p5, p6, p7, t, NB)
            for lane in tl.static_range(4):
                col = 8 * lane + t
                xv = _x_column(x_ptrs + col, offs_m[:, None] < M, x_mask & (xk + col < K),
                               EVEN, EVEN_M)  # [BLOCK_M, BLOCK_W]
                xsum += xv
                part += _lane_code(c, magic, lane, NB, ASM)[None, :, :] * xv[:, :, None]
        sf, zf = _word_scale_zero(s, z, KIND, BITS, BK, NB)
        acc += tl.sum(sf[None, :, :] * part + zf[None, :, :] * xsum[:, :, None], axis=1)
        if KIND == 0:  # mwq.py: + sum_p alpha_p (2 sum bit_p x - sum x)
            for pl in tl.static_range(BITS - B1):
                q, a = _residual_plane(planes_ptr, pscale_ptr, offs_w, offs_n, n_ok, w_hi, N,
                                       plane_offs, pscale_offs, B1 + pl, pl, WPG)
                part = tl.zeros([BLOCK_M, BLOCK_W, BLOCK_N], dtype=tl.float32)
                for t in tl.static_range(8):
                    c = (q >> t) & LANES
                    for lane in tl.static_range(4):
                        col = 8 * lane + t
                        xv = tl.load(x_ptrs + col, mask=x_mask & (xk + col < K), other=0.0)
                        part += _lane_bit(c, lane)[None, :, :] * xv.to(tl.float32)[:, :, None]
                # part = sum (1 + bit/2) x  =>  sum bit x = 2 (part - sum x), so
                # alpha (2 sum bit x - sum x) = alpha (4 part - 5 sum x)
                acc += tl.sum(a[None, :, :] * (4.0 * part - 5.0 * xsum[:, :, None]), axis=1)
    return acc


@triton.jit
def _nested_gemv_kernel(
    # Activations x [M, K] and output y [M, N]
    x_ptr, y_ptr, M, stride_xm, stride_ym,
    # Split-K workspace: an fp32 accumulator [M, N] and one arrival counter per output tile,
    # both zero between calls (the last program to arrive cleans them)
    ws_ptr, count_ptr,
    # Packed matrix, word-major (PackedExpertMatrix fields): planes_ptr is plane 0 and
    # pscale_ptr MWQ's first plane scale; plane_offs[j] / pscale_offs[p] are the element
    # offsets of plane j / plane scale p from them (stacked tensors: multiples of their
    # stride; the CUDA pool's level blocks: wherever the arena placed them)
    planes_ptr, scale_ptr, zero_ptr, pscale_ptr, plane_offs, pscale_offs,
    # Sizes: rows, columns, words per row; words per K slice
    N, K, KW, words_per_split,
    # Format: KIND 0 = mwq, 1 = bitplane; BITS read; B1 base bits; BK code bits
    KIND: tl.constexpr, BITS: tl.constexpr, B1: tl.constexpr, BK: tl.constexpr,
    GROUP: tl.constexpr,
    # Tiling; EVEN: every tile is whole (no masks): N % BLOCK_N == 0, K % 32 == 0, and every
    # K slice holds a whole number of BLOCK_W tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN: tl.constexpr, EVEN_M: tl.constexpr,  # M % BLOCK_M == 0
    # Loads in flight: 0 = the next tile, issued by hand; >= 2: Triton's pipeliner stages.
    # FLAT: one-word tiles as 2-D tensors (`_decode_tile`)
    PIPELINE: tl.constexpr, FLAT: tl.constexpr,
    # ASM: PTX inline assembly allowed (CUDA; off under the interpreter). magic_bits is
    # MAGIC, passed at run time: a constant would be folded into PRMT's immediate slot by
    # ptxas, pushing the four byte selectors into registers rebuilt on every use
    ASM: tl.constexpr, magic_bits,
):
    """One program: BLOCK_M tokens x BLOCK_N rows x one K slice; W decoded once per tile.

    The next tile's plane words, scales and zeros are loaded before the current tile is
    decoded (software pipelining by hand, PIPELINE = 0), so one HBM latency overlaps one tile
    of work; PIPELINE >= 2 hands the loop to Triton's pipeliner, PIPELINE - 1 tiles ahead."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    NB: tl.constexpr = BITS if KIND == 1 else B1  # bits of the integer code
    WPG: tl.constexpr = GROUP // 32  # words per scale group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n[None, :] < N
    w_lo = pid_k * words_per_split
    w_hi = tl.minimum(w_lo + words_per_split, KW)
    arange_w = tl.arange(0, BLOCK_W)

    magic = tl.zeros([BLOCK_W, BLOCK_N], tl.int32) + magic_bits
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PIPELINE == 0:  # by hand: the next tile's loads are issued before this one decodes
        p0, p1, p2, p3, p4, p5, p6, p7, s, z = _load_tile(
            planes_ptr, scale_ptr, zero_ptr, w_lo + arange_w, offs_n, n_ok, w_hi, N,
            plane_offs, NB, WPG, EVEN)
        for w0 in range(w_lo, w_hi, BLOCK_W):
            q0, q1, q2, q3, q4, q5, q6, q7, s_next, z_next = _load_tile(
                planes_ptr, scale_ptr, zero_ptr, w0 + BLOCK_W + arange_w, offs_n, n_ok, w_hi,
                N, plane_offs, NB, WPG, False)  # masked off past the slice
            acc = _decode_tile(acc, x_ptr, M, stride_xm, K, w_hi, offs_m, offs_n, n_ok,
                               w0 + arange_w, p0, p1, p2, p3, p4, p5, p6, p7, s, z, magic,
                               planes_ptr, pscale_ptr, N, plane_offs, pscale_offs,
                               KIND, BITS, B1, BK, NB, WPG, EVEN, EVEN_M, ASM,
                               BLOCK_M, BLOCK_W, BLOCK_N, FLAT)
            p0, p1, p2, p3, p4, p5, p6, p7 = q0, q1, q2, q3, q4, q5, q6, q7
            s, z = s_next, z_next
    else:  # Triton's software pipeliner keeps PIPELINE - 1 tiles of loads in flight
        for w0 in tl.range(w_lo, w_hi, BLOCK_W, num_stages=PIPELINE):
            p0, p1, p2, p3, p4, p5, p6, p7, s, z = _load_tile(
                planes_ptr, scale_ptr, zero_ptr, w0 + arange_w, offs_n, n_ok, w_hi, N,
                plane_offs, NB, WPG, EVEN)
            acc = _decode_tile(acc, x_ptr, M, stride_xm, K, w_hi, offs_m, offs_n, n_ok,
                               w0 + arange_w, p0, p1, p2, p3, p4, p5, p6, p7, s, z, magic,
                               planes_ptr, pscale_ptr, N, plane_offs, pscale_offs,
                               KIND, BITS, B1, BK, NB, WPG, EVEN, EVEN_M, ASM,
                               BLOCK_M, BLOCK_W, BLOCK_N, FLAT)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:  # partials meet in an fp32 accumulator; the tile's last program writes y (one launch)
        ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=y_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial is added before the release below
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # .cg: read the sum from L2, where the atomics landed
            total = tl.load(ws_ptrs, mask=y_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.store(ws_ptrs, tl.zeros_like(total), mask=y_mask)  # clean for the next call
            tl.atomic_xchg(count_ptr + tile, 0)


@triton.jit
def _nested_dot_kernel(
    # Activations x [M, K] and output y [M, N]
    x_ptr, y_ptr, M, stride_xm, stride_ym,
    # Packed matrix, word-major; offsets of planes and plane scales as in the GEMV kernel
    planes_ptr, scale_ptr, zero_ptr, pscale_ptr, plane_offs, pscale_offs,
    # Sizes
    N, K, KW,
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
            words = tl.load(p_ptrs + plane_offs[j], mask=tile_mask, other=0)
            code = (code << 1) | ((words[:, None, :] >> shifts) & 1)
        w = code.to(tl.float32) * s[:, None, :] + z[:, None, :]
        if KIND == 0:
            for p in tl.static_range(BITS - B1):
                words = tl.load(p_ptrs + plane_offs[B1 + p], mask=tile_mask, other=0)
                a = tl.load(pscale_ptr + pscale_offs[p] + g_off, mask=tile_mask,
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


def bits_code(packed: PackedExpertMatrix, bits: int) -> int:
    """Bits of the integer code the kernels decode: all of them for bitplane, b1 for mwq."""
    return bits if packed.kind == "bitplane" else packed.b1


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


def _cdiv(a: int, b: int) -> int:
    """Ceiling division in plain Python: `triton.cdiv` is a constexpr function whose call
    from Python costs microseconds (nine of them were half of this wrapper's host time)."""
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), in plain Python (see `_cdiv`)."""
    return 1 << (n - 1).bit_length()


def auto_split(programs: int, words: int, cfg: KernelConfig, device: torch.device,
               sms: int | None = None) -> int:
    """K slices so that about 16 programs per SM run, each keeping >= 2 tiles of work.

    Measured on an H100 (docs/results/kernels.md, `--tune-set pipeline`): against four
    programs per SM with >= 4 tiles each, 1.29x geomean over Mixtral and LLaMA-MoE shapes at
    1 token (1.39x with the pipelined loop): the GEMV is latency-bound, not issue-bound."""
    if cfg.split_k:
        return cfg.split_k
    want = _cdiv(16 * (sms or _sm_count(device)), programs)
    return max(1, min(want, words // (2 * cfg.block_w)))


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, ...]:
    """Split-K scratch for this device and stream, grown on demand: zeroed once, and the
    kernel leaves it zeroed, so calls on one stream reuse it (graph replays too)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    ws, counts = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < floats or counts.numel() < tiles:
        ws = torch.zeros(max(floats, 1 << 16), device=device, dtype=torch.float32)
        counts = torch.zeros(max(tiles, 1 << 12), device=device, dtype=torch.int32)
        _WORKSPACES[key] = ws, counts
    return ws, counts


def _plane_args(planes: torch.Tensor | tuple[torch.Tensor, ...], count: int,
                itemsize: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(the first plane, element offsets of planes 0..count-1 from it): of a stacked tensor
    its stride; of separate tensors, their addresses (one allocation: the pool's arena)."""
    if isinstance(planes, torch.Tensor):
        return planes, tuple(j * planes.stride(0) for j in range(count))
    base = planes[0].data_ptr()
    return planes[0], tuple((planes[j].data_ptr() - base) // itemsize for j in range(count))


def _pscale_args(packed: PackedExpertMatrix, bits: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """MWQ's plane scales as `_plane_args` gives planes (the scale tensor, never read, else)."""
    if packed.kind == "mwq" and bits > packed.b1:
        return _plane_args(packed.plane_scale, bits - packed.b1, 2)
    return packed.scale, (0,)


def gemv_launch(x: torch.Tensor, packed: PackedExpertMatrix, bits: int, out: torch.Tensor,
                cfg: KernelConfig, *, sms: int | None = None,
                asm: bool | None = None) -> tuple[tuple[int, int, int], tuple, dict]:
    """The GEMV kernel's (grid, positional args, keyword args) for out = x @ W^T:
    `nested_matmul` launches them, `benchmarks/kernels_sass.py` compiles them for a GPU
    without one. `sms`: the SM count the split aims at (default: x's device's); `asm`: PTX
    inline assembly (default: on CUDA)."""
    m_tokens, (n, k), kw = x.shape[0], (packed.rows, packed.cols), packed.words
    planes_arg, plane_offs = _plane_args(packed.planes, bits, 4)
    pscale_arg, pscale_offs = _pscale_args(packed, bits)
    block_m = min(_pow2(m_tokens), max(cfg.block_m, 1), GEMV_MAX_TOKENS)
    grid_nm = _cdiv(n, cfg.block_n) * _cdiv(m_tokens, block_m)
    split = auto_split(grid_nm, kw, cfg, x.device, sms)
    words_per_split = _cdiv(_cdiv(kw, split), cfg.block_w) * cfg.block_w
    split = _cdiv(kw, words_per_split)
    grid = (_cdiv(n, cfg.block_n), split, _cdiv(m_tokens, block_m))
    ws, counts = _workspace(x.device, m_tokens * n, grid[0] * grid[2])
    even = (n % cfg.block_n == 0 and k % 32 == 0 and kw % words_per_split == 0
            and words_per_split % cfg.block_w == 0)
    args = (x, out, m_tokens, x.stride(0), out.stride(0), ws, counts,
            planes_arg, packed.scale, packed.zero, pscale_arg, plane_offs, pscale_offs,
            n, k, kw, words_per_split)
    kwargs = dict(KIND=KIND_CODES[packed.kind], BITS=bits, B1=packed.b1, BK=packed.bK,
                  GROUP=packed.group, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
                  BLOCK_W=cfg.block_w, SPLIT_K=split, EVEN=even,
                  EVEN_M=m_tokens % block_m == 0, PIPELINE=cfg.pipeline, FLAT=cfg.flat,
                  ASM=x.is_cuda if asm is None else asm,
                  magic_bits=(HALF if bits_code(packed, bits) <= 7 else MAGIC).value,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return grid, args, kwargs


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
    if gemv:
        grid, args, kwargs = gemv_launch(x, packed, bits, out, cfg)
        _nested_gemv_kernel[grid](*args, **kwargs)
        return out
    planes_arg, plane_offs = _plane_args(packed.planes, bits, 4)
    pscale_arg, pscale_offs = _pscale_args(packed, bits)
    block_m = max(16, cfg.block_m)
    grid = (_cdiv(n, cfg.block_n), _cdiv(m_tokens, block_m))
    _nested_dot_kernel[grid](
        x, out, m_tokens, x.stride(0), out.stride(0),
        planes_arg, packed.scale, packed.zero, pscale_arg, plane_offs, pscale_offs,
        n, k, packed.words,
        KIND=KIND_CODES[packed.kind], BITS=bits, B1=packed.b1, BK=packed.bK,
        GROUP=packed.group, BLOCK_N=cfg.block_n, BLOCK_W=cfg.block_w, BLOCK_M=block_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
