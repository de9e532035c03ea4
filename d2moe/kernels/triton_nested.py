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
A third kernel runs an expert's gate and up projections in one launch (GEMV path) and
writes silu(gate) * up. Style follows the Triton matmul tutorial: grouped, commented kernel
arguments; the wrappers that check, allocate and launch are in `triton_launch.py`.
"""

from __future__ import annotations

import triton
import triton.language as tl

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
def _tile_product(acc, x_ptr, M, stride_xm, K, w_hi, offs_m, offs_n, n_ok, offs_w, magic,
                  planes_ptr, scale_ptr, zero_ptr, pscale_ptr, N, plane_offs, pscale_offs,
                  KIND: tl.constexpr, BITS: tl.constexpr, B1: tl.constexpr, BK: tl.constexpr,
                  NB: tl.constexpr, WPG: tl.constexpr, EVEN: tl.constexpr,
                  EVEN_M: tl.constexpr, ASM: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, FLAT: tl.constexpr):
    """acc + the products of the tile at words `offs_w`: its loads, then `_decode_tile`."""
    p0, p1, p2, p3, p4, p5, p6, p7, s, z = _load_tile(
        planes_ptr, scale_ptr, zero_ptr, offs_w, offs_n, n_ok, w_hi, N, plane_offs, NB, WPG,
        EVEN)
    return _decode_tile(acc, x_ptr, M, stride_xm, K, w_hi, offs_m, offs_n, n_ok, offs_w,
                        p0, p1, p2, p3, p4, p5, p6, p7, s, z, magic,
                        planes_ptr, pscale_ptr, N, plane_offs, pscale_offs,
                        KIND, BITS, B1, BK, NB, WPG, EVEN, EVEN_M, ASM,
                        BLOCK_M, BLOCK_W, BLOCK_N, FLAT)


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
            acc = _tile_product(acc, x_ptr, M, stride_xm, K, w_hi, offs_m, offs_n, n_ok,
                                w0 + arange_w, magic, planes_ptr, scale_ptr, zero_ptr,
                                pscale_ptr, N, plane_offs, pscale_offs,
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


@triton.jit
def _silu_mul(gate, up):
    """silu(gate) * up in float32 (Mixtral's SwiGLU: silu(g) = g sigmoid(g))."""
    return gate * tl.sigmoid(gate) * up


@triton.jit
def _gate_up_gemv_kernel(
    # Activations x [M, K] and output h [M, N] = silu(x W1^T) * (x W3^T)
    x_ptr, h_ptr, M, stride_xm, stride_hm,
    # Split-K workspace: fp32 gate sums [M, N], then up sums [M, N], and one arrival counter
    # per output tile, all zero between calls (the last program to arrive cleans them)
    ws_ptr, count_ptr,
    # w1 (gate) and w3 (up), word-major, each as _nested_gemv_kernel's matrix: one shape and
    # format, their own plane offsets (the pool lays each level's parts one after another)
    g_planes_ptr, g_scale_ptr, g_zero_ptr, g_pscale_ptr, g_plane_offs, g_pscale_offs,
    u_planes_ptr, u_scale_ptr, u_zero_ptr, u_pscale_ptr, u_plane_offs, u_pscale_offs,
    # Sizes, format and tiling: as _nested_gemv_kernel's (PIPELINE >= 1: tl.range stages)
    N, K, KW, words_per_split,
    KIND: tl.constexpr, BITS: tl.constexpr, B1: tl.constexpr, BK: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN: tl.constexpr, EVEN_M: tl.constexpr,
    PIPELINE: tl.constexpr, FLAT: tl.constexpr, ASM: tl.constexpr, magic_bits,
):
    """One program: the same rows and K slice of w1 and w3, two load streams in flight; the
    SiLU product is taken where the two sums are whole (here, or in the tile's last program
    to arrive), so an expert's first half is one launch and no [M, N] product is stored.

    The prologue and the split-K meeting repeat _nested_gemv_kernel's: moved into shared
    helpers, they changed the timed kernel's SASS in 6 of 24 variants (2026-11-23)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    NB: tl.constexpr = BITS if KIND == 1 else B1
    WPG: tl.constexpr = GROUP // 32
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n[None, :] < N
    w_lo = pid_k * words_per_split
    w_hi = tl.minimum(w_lo + words_per_split, KW)
    arange_w = tl.arange(0, BLOCK_W)

    magic = tl.zeros([BLOCK_W, BLOCK_N], tl.int32) + magic_bits
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for w0 in tl.range(w_lo, w_hi, BLOCK_W, num_stages=PIPELINE):
        gate = _tile_product(gate, x_ptr, M, stride_xm, K, w_hi, offs_m, offs_n, n_ok,
                             w0 + arange_w, magic, g_planes_ptr, g_scale_ptr, g_zero_ptr,
                             g_pscale_ptr, N, g_plane_offs, g_pscale_offs,
                             KIND, BITS, B1, BK, NB, WPG, EVEN, EVEN_M, ASM,
                             BLOCK_M, BLOCK_W, BLOCK_N, FLAT)
        up = _tile_product(up, x_ptr, M, stride_xm, K, w_hi, offs_m, offs_n, n_ok,
                           w0 + arange_w, magic, u_planes_ptr, u_scale_ptr, u_zero_ptr,
                           u_pscale_ptr, N, u_plane_offs, u_pscale_offs,
                           KIND, BITS, B1, BK, NB, WPG, EVEN, EVEN_M, ASM,
                           BLOCK_M, BLOCK_W, BLOCK_N, FLAT)
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_n[None, :]
    h_mask = (offs_m[:, None] < M) & n_ok
    if SPLIT_K == 1:
        tl.store(h_ptrs, _silu_mul(gate, up).to(h_ptr.dtype.element_ty), mask=h_mask)
    else:
        g_ws = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        u_ws = g_ws + M * N
        tl.atomic_add(g_ws, gate, mask=h_mask, sem="relaxed")
        tl.atomic_add(u_ws, up, mask=h_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partials are added before the release below
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # .cg: read the sums from L2, where the atomics landed
            gate = tl.load(g_ws, mask=h_mask, other=0.0, cache_modifier=".cg")
            up = tl.load(u_ws, mask=h_mask, other=0.0, cache_modifier=".cg")
            tl.store(h_ptrs, _silu_mul(gate, up).to(h_ptr.dtype.element_ty), mask=h_mask)
            tl.store(g_ws, tl.zeros_like(gate), mask=h_mask)  # clean for the next call
            tl.store(u_ws, tl.zeros_like(up), mask=h_mask)
            tl.atomic_xchg(count_ptr + tile, 0)
