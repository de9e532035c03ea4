/* Fused nested dequant + product on the CPU: y = x @ W^T, W at b bits, read straight from
 * the bit planes; the dequantized matrix never exists in memory.
 *
 * Every nested weight is an offset plus a sum of its set bits' weights: for row r, group g
 * and plane p (code plane j: s 2^(nbase-1-j), code plane 0 the top bit; MWQ residual plane
 * q: w += +a_q where the bit is set, -a_q where not)
 *     w_i = zeff_g + sum_p c_pg bit_pi,   c_pg = s_g 2^(nbase-1-p) | 2 a_qg,
 *                                         zeff_g = z_g - sum_q a_qg
 * and the product is computed in one of two forms, both in 16-column chunks:
 * - bit-serial (FORM_BITSERIAL): sum_i w_i x_i = sum_p c_pg S_pg + zeff_g X_g, with S_pg the
 *   sum of x over g's columns whose bit in plane p is set and X_g over all of them: one
 *   masked multiply-add per plane, token and chunk. Cheapest at 1-3 tokens and 2-3 bits.
 * - dequantize in registers (FORM_REGISTER): w of 16 columns built in a register (one masked
 *   add per plane), then one multiply-add per token: planes + tokens operations a chunk
 *   against planes x tokens, so it wins from a few tokens on.
 * - table lookups (FORM_LUT, groups of whole words): for one token, the 16 sums of the
 *   subsets of each 4 columns of x are tabulated once (`lut`, 64 bytes a chunk); a plane's
 *   4 bits of a chunk then pick one entry, and 16 rows take it in one permute (AVX2: 8 rows
 *   in two and a blend; their words loaded and transposed), so a 512-bit instruction covers
 *   4 columns of 16 rows where a masked multiply-add covers 16 columns of one row and reads
 *   16 floats of x to do it (the idea of T-MAC, arXiv:2407.00088, in float32). Up to
 *   LUT_TOKENS tokens share a pass over the planes (each its own tables).
 * Tokens are taken in blocks whose accumulators stay in registers (a compile-time count per
 * specialisation).
 *
 * Built by d2moe/kernels/cpu_native.py (cc -O3 -march=native) and called through ctypes,
 * which releases the interpreter lock for the call. The floats are summed in another order
 * than x @ W^T: equal within float32 rounding, not bit for bit.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#else
#error "the nested CPU kernel needs AVX2 or AVX-512 (elsewhere d2moe runs its numpy path)"
#endif

#define MAX_PLANES 16
#define FORM_BITSERIAL 1
#define FORM_REGISTER 2
#define FORM_LUT 3
#define LUT_TOKENS 4 /* FORM_LUT: tokens a pass, sharing the planes' words and shifts */
#ifndef PREFETCH_WORDS
#define PREFETCH_WORDS 32 /* FORM_LUT: how far ahead a row's plane words are prefetched */
#endif

/* Field for field the ctypes Structure `NestedArgs` in cpu_native.py. */
typedef struct {
    /* geometry: group % 16 == 0 (the wrapper checks) */
    int64_t rows, cols, words, group, groups, tokens;
    int64_t nbase, nres;                  /* code planes, then MWQ residual planes */
    int64_t form;                         /* FORM_BITSERIAL, FORM_REGISTER or FORM_LUT */
    /* the matrix: planes [rows, words] uint32 each (bit t of word w: column 32w + t) */
    const uint32_t *planes[MAX_PLANES];   /* nbase code planes, top bit first; then nres */
    const float *scale, *zero;            /* [rows, groups] float32 at this bit-width */
    const float *plane_scale[MAX_PLANES]; /* [rows, groups] per residual plane (a_q) */
    const float *x;                       /* [tokens, cols] float32 */
    float *y;                             /* [tokens, rows] float32 */
} NestedArgs;

/* ---- 16 float lanes: the only ISA-specific code ---------------------------------------- */
#if defined(__AVX512F__)
#define VECTOR_BITS 512
#define BLOCK_BITSERIAL 8 /* tokens a block */
#define BLOCK_REGISTER 8
#define CHAINS_ONE 4      /* bit-serial chains for one token (FMA latency 4, two a cycle) */
typedef __m512 v16;
static inline v16 v_zero(void) { return _mm512_setzero_ps(); }
static inline v16 v_set1(float f) { return _mm512_set1_ps(f); }
static inline v16 v_load(const float *p) { return _mm512_loadu_ps(p); }
/* the first n < 16 floats at p, zeros after */
static inline v16 v_load_part(const float *p, int n) {
    return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
}
static inline v16 v_add(v16 a, v16 b) { return _mm512_add_ps(a, b); }
static inline v16 v_fma(v16 a, v16 b, v16 acc) { return _mm512_fmadd_ps(a, b, acc); }
/* w + c in the lanes whose bit of k is set */
static inline v16 v_mask_add(v16 w, uint32_t k, v16 c) {
    return _mm512_mask_add_ps(w, (__mmask16)k, w, c);
}
/* acc + x c in the lanes whose bit of k is set */
static inline v16 v_mask_fma(v16 x, v16 c, v16 acc, uint32_t k) {
    return _mm512_mask3_fmadd_ps(x, c, acc, (__mmask16)k);
}
static inline float v_sum(v16 a) { return _mm512_reduce_add_ps(a); }

#else /* AVX2: two 8-lane halves; a byte of a plane selects its 8 lanes through a table of
       * the 256 lane masks (8 KiB, stays in L1) */
#define VECTOR_BITS 256
#define BLOCK_BITSERIAL 8
#define BLOCK_REGISTER 6 /* 16 registers of 8 lanes */
#define CHAINS_ONE 2
typedef struct { __m256 lo, hi; } v16;
static float LANES[256][8] __attribute__((aligned(32)));

__attribute__((constructor)) static void fill_lanes(void) {
    for (int v = 0; v < 256; v++)
        for (int i = 0; i < 8; i++) {
            const uint32_t bits = (v >> i) & 1u ? 0xFFFFFFFFu : 0u;
            memcpy(&LANES[v][i], &bits, sizeof bits);
        }
}

static inline v16 v_zero(void) { return (v16){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline v16 v_set1(float f) { return (v16){_mm256_set1_ps(f), _mm256_set1_ps(f)}; }
static inline v16 v_load(const float *p) {
    return (v16){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
}
static inline v16 v_load_part(const float *p, int n) {
    float part[16] = {0};
    memcpy(part, p, sizeof(float) * (size_t)n);
    return v_load(part);
}
static inline v16 v_add(v16 a, v16 b) {
    return (v16){_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
}
static inline v16 v_fma(v16 a, v16 b, v16 acc) {
    return (v16){_mm256_fmadd_ps(a.lo, b.lo, acc.lo), _mm256_fmadd_ps(a.hi, b.hi, acc.hi)};
}
static inline v16 v_mask_add(v16 w, uint32_t k, v16 c) {
    return (v16){_mm256_add_ps(w.lo, _mm256_and_ps(_mm256_load_ps(LANES[k & 0xFF]), c.lo)),
                 _mm256_add_ps(w.hi, _mm256_and_ps(_mm256_load_ps(LANES[k >> 8]), c.hi))};
}
static inline v16 v_mask_fma(v16 x, v16 c, v16 acc, uint32_t k) {
    return (v16){_mm256_fmadd_ps(_mm256_and_ps(_mm256_load_ps(LANES[k & 0xFF]), x.lo), c.lo,
                                 acc.lo),
                 _mm256_fmadd_ps(_mm256_and_ps(_mm256_load_ps(LANES[k >> 8]), x.hi), c.hi,
                                 acc.hi)};
}
static inline float v_sum(v16 a) {
    const __m256 s = _mm256_add_ps(a.lo, a.hi);
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}
#endif

/* ---- one row of the matrix -------------------------------------------------------------- */

/* Plane p of row r: its bits, its per-group scales, and the power of 2 they take in the
 * sum (exact in float): a code plane j weighs s 2^(nbase-1-j), a residual plane 2 a. */
typedef struct {
    const uint32_t *bits;
    const float *scale;
    float mult;
} PlaneRow;

static inline PlaneRow plane_row(const NestedArgs *a, int64_t r, int64_t p) {
    const int code = p < a->nbase;
    const PlaneRow pr = {a->planes[p] + r * a->words,
                         (code ? a->scale : a->plane_scale[p - a->nbase]) + r * a->groups,
                         code ? (float)(1u << (a->nbase - 1 - p)) : 2.0f};
    return pr;
}

/* zeff of row r, group g: z - sum_q a_q (the weight of a chunk whose bits are all clear) */
static inline float zeff(const NestedArgs *a, int64_t r, int64_t g) {
    float z = a->zero[r * a->groups + g];
    for (int64_t q = 0; q < a->nres; q++) z -= a->plane_scale[q][r * a->groups + g];
    return z;
}

/* The 16 bits of column c's chunk in a plane row: its c/16-th 16-bit half-word (16 | group;
 * the planes are little-endian words, column 32w + t at bit t of word w). Past the last
 * column x is loaded as zeros, so those bits add nothing. One load, no shifts. */
static inline uint32_t chunk_bits(const uint32_t *prow, int64_t c) {
    uint16_t k;
    memcpy(&k, (const unsigned char *)prow + (c >> 3), sizeof k);
    return k;
}

/* Bit-serial, T tokens of x from `x`: acc[t][u] += c_pg (x[t] where p's bit is set), U
 * chains a token; out[t] = the row's dot product without the zeff X term. */
static inline __attribute__((always_inline)) void row_bitserial(const NestedArgs *a, int64_t r,
                                                                const float *x, const int T,
                                                                const int U, float *out) {
    const int64_t ng = a->groups, G = a->group, cols = a->cols;
    v16 acc[BLOCK_BITSERIAL][4];
    for (int t = 0; t < T; t++)
        for (int u = 0; u < U; u++) acc[t][u] = v_zero();
    for (int64_t p = 0; p < a->nbase + a->nres; p++) {
        const PlaneRow pr = plane_row(a, r, p);
        for (int64_t g = 0; g < ng; g++) {
            const v16 cv = v_set1(pr.scale[g] * pr.mult);
            const int64_t end = (g + 1) * G < cols ? (g + 1) * G : cols;
            int64_t c = g * G;
            for (; c + 16 * U <= end; c += 16 * U)  /* whole chunks, U chains */
                for (int u = 0; u < U; u++) {
                    const uint32_t k = chunk_bits(pr.bits, c + 16 * u);
                    for (int t = 0; t < T; t++)
                        acc[t][u] = v_mask_fma(v_load(x + t * cols + c + 16 * u), cv,
                                               acc[t][u], k);
                }
            for (; c < end; c += 16) {  /* the rest, the last one partial at cols */
                const uint32_t k = chunk_bits(pr.bits, c);
                const int n = end - c >= 16 ? 16 : (int)(end - c);
                for (int t = 0; t < T; t++) {
                    const float *xt = x + t * cols + c;
                    acc[t][0] = v_mask_fma(n == 16 ? v_load(xt) : v_load_part(xt, n), cv,
                                           acc[t][0], k);
                }
            }
        }
    }
    for (int t = 0; t < T; t++) {
        v16 s = acc[t][0];
        for (int u = 1; u < U; u++) s = v_add(s, acc[t][u]);
        out[t] = v_sum(s);
    }
}

/* w of the 16 columns from c of a row: zeff + the masked adds of its planes' c_pg. */
static inline v16 dequant16(const PlaneRow *pr, const v16 *cv, int64_t P, v16 z, int64_t c) {
    v16 w = z;
    for (int64_t p = 0; p < P; p++) w = v_mask_add(w, chunk_bits(pr[p].bits, c), cv[p]);
    return w;
}

/* Dequantize in registers, T tokens of x from `x`: each chunk's w (dequant16), then
 * acc[t] += w x[t]; out[t] = the row's dot product. One accumulator a token: four chains
 * at one token, as the bit-serial form has, ran slower while this form was developed (8.0
 * against 6.8 ms, a 2-bit Mixtral w1, 2026-11-24 scratch timing). */
static inline __attribute__((always_inline)) void row_register(const NestedArgs *a, int64_t r,
                                                               const float *x, const int T,
                                                               float *out) {
    const int64_t G = a->group, cols = a->cols, P = a->nbase + a->nres;
    PlaneRow pr[MAX_PLANES];
    for (int64_t p = 0; p < P; p++) pr[p] = plane_row(a, r, p);
    v16 acc[BLOCK_REGISTER];
    for (int t = 0; t < T; t++) acc[t] = v_zero();
    for (int64_t g = 0; g < a->groups; g++) {
        v16 cv[MAX_PLANES];
        for (int64_t p = 0; p < P; p++) cv[p] = v_set1(pr[p].scale[g] * pr[p].mult);
        const v16 z = v_set1(zeff(a, r, g));
        const int64_t end = (g + 1) * G < cols ? (g + 1) * G : cols;
        int64_t c = g * G;
        for (; c + 16 <= end; c += 16) {  /* whole chunks */
            const v16 w = dequant16(pr, cv, P, z, c);
            for (int t = 0; t < T; t++) acc[t] = v_fma(w, v_load(x + t * cols + c), acc[t]);
        }
        if (c < end) {  /* the last chunk, partial at cols: x is zero past it */
            const v16 w = dequant16(pr, cv, P, z, c);
            for (int t = 0; t < T; t++)
                acc[t] = v_fma(w, v_load_part(x + t * cols + c, (int)(end - c)), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) out[t] = v_sum(acc[t]);
}

/* ---- table lookups: per ISA, a block of LUT_ROWS rows, a lane each ---------------------- */
#if defined(__AVX512F__)
#define LUT_ROWS 16
typedef __m512 lv;   /* LUT_ROWS floats */
typedef __m512i lvi; /* LUT_ROWS 32-bit words */
static inline lv lv_zero(void) { return _mm512_setzero_ps(); }
static inline lv lv_add(lv a, lv b) { return _mm512_add_ps(a, b); }
static inline lv lv_mul(lv a, lv b) { return _mm512_mul_ps(a, b); }
static inline lv lv_fma(lv a, lv b, lv acc) { return _mm512_fmadd_ps(a, b, acc); }
static inline lv lv_set1(float f) { return _mm512_set1_ps(f); }
static inline lv lv_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void lv_store(float *p, lv a) { _mm512_storeu_ps(p, a); }
static inline lv lv_of(lvi a) { return _mm512_castsi512_ps(a); }
static inline lvi lvi_zero(void) { return _mm512_setzero_si512(); }
static inline lvi lvi_srl(lvi a, int n) { return _mm512_srli_epi32(a, n); }

/* Entry m of chunk k: the sum of x[4k + i] over the bits i set in m; zero past cols (the
 * planes' bits there then add nothing). `chunks` = 8 words. */
static void build_lut(const float *x, int64_t cols, int64_t chunks, float *lut) {
    static const __mmask16 with_bit[4] = {0xAAAA, 0xCCCC, 0xF0F0, 0xFF00};
    for (int64_t k = 0; k < chunks; k++) {
        __m512 t = _mm512_setzero_ps();
        for (int i = 0; i < 4; i++) {
            const int64_t c = 4 * k + i;
            t = _mm512_mask_add_ps(t, with_bit[i], t, _mm512_set1_ps(c < cols ? x[c] : 0.0f));
        }
        _mm512_storeu_ps(lut + 16 * k, t);
    }
}

/* The entry each lane's low 4 bits pick from the 16-float table at `table` (one vpermps). */
static inline lv lookup(lvi idx, const float *table) {
    return _mm512_permutexvar_ps(idx, _mm512_loadu_ps(table));
}

/* 16x16 32-bit transpose: lane j of r[i] becomes lane i of r[j]. */
static inline void transpose(lvi r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xDD);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xDD);
    }
}

/* The first m <= LUT_ROWS 32-bit values at p, zeros after (nothing past them is read). */
static inline lvi load_row(const uint32_t *p, int64_t m) {
    return _mm512_maskz_loadu_epi32((__mmask16)((1u << m) - 1u), p);
}

#else /* AVX2: 8 rows a block; a 16-entry table as two 8-entry halves, index bit 3 choosing */
#define LUT_ROWS 8
typedef __m256 lv;
typedef __m256i lvi;
static inline lv lv_zero(void) { return _mm256_setzero_ps(); }
static inline lv lv_add(lv a, lv b) { return _mm256_add_ps(a, b); }
static inline lv lv_mul(lv a, lv b) { return _mm256_mul_ps(a, b); }
static inline lv lv_fma(lv a, lv b, lv acc) { return _mm256_fmadd_ps(a, b, acc); }
static inline lv lv_set1(float f) { return _mm256_set1_ps(f); }
static inline lv lv_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void lv_store(float *p, lv a) { _mm256_storeu_ps(p, a); }
static inline lv lv_of(lvi a) { return _mm256_castsi256_ps(a); }
static inline lvi lvi_zero(void) { return _mm256_setzero_si256(); }
static inline lvi lvi_srl(lvi a, int n) { return _mm256_srli_epi32(a, n); }

/* Entry m of chunk k: the sum of x[4k + i] over the bits i set in m (m's lowest set bit
 * added to the entry without it); zero past cols. `chunks` = 8 words. */
static void build_lut(const float *x, int64_t cols, int64_t chunks, float *lut) {
    for (int64_t k = 0; k < chunks; k++) {
        float *t = lut + 16 * k;
        t[0] = 0.0f;
        for (int m = 1; m < 16; m++) {
            const int i = __builtin_ctz((unsigned)m);
            t[m] = t[m & (m - 1)] + (4 * k + i < cols ? x[4 * k + i] : 0.0f);
        }
    }
}

/* The entry each lane's low 4 bits pick from the 16-float table at `table` (two vpermps,
 * a blend on bit 3). */
static inline lv lookup(lvi idx, const float *table) {
    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), idx);
    const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(table + 8), idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/* 8x8 32-bit transpose: lane j of r[i] becomes lane i of r[j]. */
static inline void transpose(lvi r[8]) {
    __m256i t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
    }
}

static inline lvi load_row(const uint32_t *p, int64_t m) {
    const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)m),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_maskload_epi32((const int *)p, live);
}
#endif

/* ---- table lookups: the block, on the layer above --------------------------------------- */

/* For T tokens, the 8 lookups of one word of the block's rows (each lane its row's word of
 * a plane) added to sum[t]: the sum over the word's 8 chunks of the entry its 4 bits pick
 * (tab: the word's 8 tables of token 0; token t's `stride` floats further). The shifted
 * words serve every token. */
static inline __attribute__((always_inline)) void word_lookups(lvi word, const float *tab,
                                                               int64_t stride, const int T,
                                                               lv *sum) {
    lv s[LUT_TOKENS][4];
    for (int j = 0; j < 4; j++) {
        const lvi lo = lvi_srl(word, 8 * j), hi = lvi_srl(word, 8 * j + 4);
        for (int t = 0; t < T; t++)
            s[t][j] = lv_add(lookup(lo, tab + t * stride + 32 * j),
                             lookup(hi, tab + t * stride + 32 * j + 16));
    }
    for (int t = 0; t < T; t++)
        sum[t] = lv_add(sum[t], lv_add(lv_add(s[t][0], s[t][1]), lv_add(s[t][2], s[t][3])));
}

/* LUT_ROWS consecutive 32-bit values from column c0 of n <= LUT_ROWS rows `stride` apart,
 * transposed: out[k] lane i = row i's value c0 + k; zero past `width` columns and n rows.
 * (Loads and a transpose: a gather of the same values took twice as long, 2026-11-25.) */
static inline void load_columns(const void *base, int64_t stride, int64_t width, int64_t c0,
                                int n, lvi out[LUT_ROWS]) {
    const int64_t m = width - c0 < LUT_ROWS ? width - c0 : LUT_ROWS;
    const uint32_t *p = (const uint32_t *)base + c0;
    for (int i = 0; i < LUT_ROWS; i++)
        out[i] = i < n ? load_row(p + i * stride, m) : lvi_zero();
    transpose(out);
}

/* Rows [r, r + n) (n <= LUT_ROWS, a lane each) of T tokens' y without the zeff X term,
 * into out[t * LUT_ROWS + i]: LUT_ROWS words of every plane's rows at a time
 * (load_columns); per word, each plane's word looked up in every token's 8 tables (lut:
 * token t's from t * stride), summed over the group, then times the plane's c_pg
 * (transposed once a block into `cs`, [P][groups][LUT_ROWS]). Needs group % 32 == 0: a
 * group is whole words. */
static inline __attribute__((always_inline)) void block_lut(
        const NestedArgs *a, const float *lut, int64_t stride, float *cs, int64_t r, int n,
        const int T, float *out) {
    const int64_t P = a->nbase + a->nres, ng = a->groups, words = a->words;
    const int64_t per_group = a->group / 32;
    for (int64_t p = 0; p < P; p++) {  /* c_pg of the block's rows, group by group */
        const PlaneRow pr = plane_row(a, r, p);
        const lv mult = lv_set1(pr.mult);
        for (int64_t g0 = 0; g0 < ng; g0 += LUT_ROWS) {
            lvi c[LUT_ROWS];
            load_columns(pr.scale, ng, ng, g0, n, c);
            for (int64_t k = 0; k < LUT_ROWS && g0 + k < ng; k++)
                lv_store(cs + LUT_ROWS * (p * ng + g0 + k), lv_mul(lv_of(c[k]), mult));
        }
    }
    const uint32_t *bits[MAX_PLANES];
    lv acc[MAX_PLANES][LUT_TOKENS], total[LUT_TOKENS];
    for (int64_t p = 0; p < P; p++) {
        bits[p] = plane_row(a, r, p).bits;
        for (int t = 0; t < T; t++) acc[p][t] = lv_zero();
    }
    for (int t = 0; t < T; t++) total[t] = lv_zero();
    lvi word[MAX_PLANES][LUT_ROWS];
    int64_t g = 0, left = per_group;  /* the group and its words still to come (no division) */
    for (int64_t w0 = 0; w0 < words; w0 += LUT_ROWS) {
        for (int64_t p = 0; p < P; p++) {
            load_columns(bits[p], words, words, w0, n, word[p]);
            if (w0 + PREFETCH_WORDS < words)  /* rows x planes streams: beyond prefetchers */
                for (int i = 0; i < n; i++)
                    _mm_prefetch((const char *)(bits[p] + i * words + w0 + PREFETCH_WORDS),
                                 _MM_HINT_T0);
        }
        for (int64_t k = 0; k < LUT_ROWS && w0 + k < words; k++) {
            const int64_t w = w0 + k;
            for (int64_t p = 0; p < P; p++)
                word_lookups(word[p][k], lut + 16 * 8 * w, stride, T, acc[p]);
            if (--left == 0 || w + 1 == words) {  /* the group's last word */
                const float *c = cs + LUT_ROWS * g;
                for (int64_t p = 0; p < P; p++) {
                    const lv cp = lv_load(c + LUT_ROWS * p * ng);
                    for (int t = 0; t < T; t++) {
                        total[t] = lv_fma(cp, acc[p][t], total[t]);
                        acc[p][t] = lv_zero();
                    }
                }
                g++, left = per_group;
            }
        }
    }
    for (int t = 0; t < T; t++) lv_store(out + t * LUT_ROWS, total[t]);
}

/* Rows [r0, r1) of y, LUT_TOKENS tokens at a time, by table lookups (scratch of the
 * caller: lut, 16 floats a chunk of x for each of LUT_TOKENS tokens; xsum, X of each token
 * and group; cs, block_lut's c_pg). */
static void rows_lut(const NestedArgs *a, float *lut, float *xsum, float *cs, int64_t r0,
                     int64_t r1) {
    const int64_t ng = a->groups, G = a->group, cols = a->cols, stride = 16 * 8 * a->words;
    for (int64_t t0 = 0; t0 < a->tokens; t0 += LUT_TOKENS) {
        const int T = a->tokens - t0 < LUT_TOKENS ? (int)(a->tokens - t0) : LUT_TOKENS;
        for (int t = 0; t < T; t++) {
            const float *x = a->x + (t0 + t) * cols;
            build_lut(x, cols, 8 * a->words, lut + t * stride);
            for (int64_t g = 0; g < ng; g++) {
                float s = 0.0f;
                const int64_t end = (g + 1) * G < cols ? (g + 1) * G : cols;
                for (int64_t c = g * G; c < end; c++) s += x[c];
                xsum[t * ng + g] = s;
            }
        }
        for (int64_t r = r0; r < r1; r += LUT_ROWS) {
            const int n = r1 - r < LUT_ROWS ? (int)(r1 - r) : LUT_ROWS;
            float out[LUT_TOKENS * LUT_ROWS];
            switch (T) {  /* constant T: the accumulators stay in registers */
                case 1: block_lut(a, lut, stride, cs, r, n, 1, out); break;
                case 2: block_lut(a, lut, stride, cs, r, n, 2, out); break;
                case 3: block_lut(a, lut, stride, cs, r, n, 3, out); break;
                default: block_lut(a, lut, stride, cs, r, n, LUT_TOKENS, out); break;
            }
            for (int i = 0; i < n; i++) {  /* + sum_g zeff_g X_g */
                for (int t = 0; t < T; t++) {
                    float lin = 0.0f;
                    for (int64_t g = 0; g < ng; g++) lin += zeff(a, r + i, g) * xsum[t * ng + g];
                    a->y[(t0 + t) * a->rows + r + i] = out[t * LUT_ROWS + i] + lin;
                }
            }
        }
    }
}

/* ---- the entry points ------------------------------------------------------------------- */

/* Rows [r0, r1) of y for the T tokens of x from `x`, bit-serial (T <= BLOCK_BITSERIAL);
 * xsum holds X of each token and group. */
static void rows_bitserial(const NestedArgs *a, const float *x, float *y, int T,
                           float *xsum, int64_t r0, int64_t r1) {
    const int64_t ng = a->groups, G = a->group, cols = a->cols;
    for (int64_t t = 0; t < T; t++)
        for (int64_t g = 0; g < ng; g++) {
            float s = 0.0f;
            const int64_t end = (g + 1) * G < cols ? (g + 1) * G : cols;
            for (int64_t c = g * G; c < end; c++) s += x[t * cols + c];
            xsum[t * ng + g] = s;
        }
    for (int64_t r = r0; r < r1; r++) {
        float dot[BLOCK_BITSERIAL];
        switch (T) {  /* constant T and U: the accumulators stay in registers */
            case 1: row_bitserial(a, r, x, 1, CHAINS_ONE, dot); break;
            case 2: row_bitserial(a, r, x, 2, 2, dot); break;
            case 3: row_bitserial(a, r, x, 3, 2, dot); break;
            case 4: row_bitserial(a, r, x, 4, 2, dot); break;
            case 5: row_bitserial(a, r, x, 5, 1, dot); break;
            case 6: row_bitserial(a, r, x, 6, 1, dot); break;
            case 7: row_bitserial(a, r, x, 7, 1, dot); break;
            default: row_bitserial(a, r, x, 8, 1, dot); break;  /* T <= BLOCK_BITSERIAL */
        }
        for (int64_t t = 0; t < T; t++) {  /* + sum_g zeff_g X_g */
            float lin = 0.0f;
            for (int64_t g = 0; g < ng; g++) lin += zeff(a, r, g) * xsum[t * ng + g];
            y[t * a->rows + r] = dot[t] + lin;
        }
    }
}

/* Rows [r0, r1) of y for the T tokens of x from `x`, in registers (T <= BLOCK_REGISTER). */
static void rows_register(const NestedArgs *a, const float *x, float *y, int T, int64_t r0,
                          int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        float dot[BLOCK_REGISTER];
#define CASE(n) case n: row_register(a, r, x, n, dot); break;
        switch (T) {  /* constant T: the accumulators stay in registers */
            CASE(1) CASE(2) CASE(3) CASE(4) CASE(5)
#if BLOCK_REGISTER > 6
            CASE(6) CASE(7)
#endif
            default: row_register(a, r, x, BLOCK_REGISTER, dot); break;
        }
#undef CASE
        for (int64_t t = 0; t < T; t++) y[t * a->rows + r] = dot[t];
    }
}

/* The vector width of this build, 512 (AVX-512) or 256 (AVX2): the wrapper routes by it. */
int nested_vector_bits(void) { return VECTOR_BITS; }

/* y for rows [r0, r1), any number of tokens (in blocks: each block reads the rows' planes
 * again, its x stays in cache); 0, or -1 when scratch could not be allocated. */
int nested_rows(const NestedArgs *a, int64_t r0, int64_t r1) {
    if (a->form == FORM_LUT && a->group % 32 == 0) {
        const int64_t nlut = LUT_TOKENS * 16 * 8 * a->words, P = a->nbase + a->nres;
        const int64_t nsum = LUT_TOKENS * a->groups;
        float *lut = malloc(sizeof(float) * (size_t)(nlut + nsum + LUT_ROWS * P * a->groups));
        if (lut == NULL) return -1;
        rows_lut(a, lut, lut + nlut, lut + nlut + nsum, r0, r1);
        free(lut);
        return 0;
    }
    /* (FORM_LUT on groups of part words: the bit-serial form) */
    const int serial = a->form != FORM_REGISTER;
    const int64_t block = serial ? BLOCK_BITSERIAL : BLOCK_REGISTER;
    float *xsum = NULL;
    if (serial && (xsum = malloc(sizeof(float) * (size_t)(block * a->groups))) == NULL)
        return -1;
    for (int64_t t0 = 0; t0 < a->tokens; t0 += block) {
        const int T = (int)(a->tokens - t0 < block ? a->tokens - t0 : block);
        const float *x = a->x + t0 * a->cols;
        float *y = a->y + t0 * a->rows;
        if (serial)
            rows_bitserial(a, x, y, T, xsum, r0, r1);
        else
            rows_register(a, x, y, T, r0, r1);
    }
    free(xsum);
    return 0;
}

/* One SwiGLU expert (Mixtral's): y = w2 @ (silu(w1 @ x) * (w3 @ x)), all three nested.
 * w1 and w3 read the same x and write [tokens, ffn] buffers; w2 reads w1's buffer, which
 * holds the gated product by then, and writes y. 0, or -1 as nested_rows. */
int nested_swiglu(const NestedArgs *w1, const NestedArgs *w3, const NestedArgs *w2) {
    if (nested_rows(w1, 0, w1->rows) != 0 || nested_rows(w3, 0, w3->rows) != 0) return -1;
    float *g = w1->y;
    const float *u = w3->y;
    for (int64_t i = 0; i < w1->tokens * w1->rows; i++)
        g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];  /* silu(a) = a sigmoid(a) */
    return nested_rows(w2, 0, w2->rows);
}
