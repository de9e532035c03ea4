/* Fused nested dequant + product for a few tokens on the CPU: y = x @ W^T, W at b bits,
 * read straight from the bit planes; the dequantized matrix never exists.
 *
 * Bit-serial form (the planes are 0/1 masks, so the product needs no codes): for row r,
 * group g and token t, with S_p the sum of x[t, i] over g's columns i whose bit in plane p
 * is set, and X the sum of x[t, i] over all of g's columns,
 *     sum_i w_i x_i = s sum_j 2^(nbase-1-j) S_j + z X       (base: w = code s + z,
 *                                                             code plane 0 the top bit)
 *                   + sum_q a_q (2 S_q - X)                  (MWQ: w += +-a_q per plane)
 * so y[t, r] = sum_{p, g} c_pg S_pg + sum_g (z_g - sum_q a_qg) X_g, with c = s 2^k for a
 * code plane and 2 a for a residual plane: one masked multiply-add per plane, token and 16
 * columns, into accumulators that stay in registers (the token count is a compile-time
 * constant in each specialisation below).
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
#define MAX_TOKENS 8

/* Field for field the ctypes Structure `NestedArgs` in cpu_native.py. */
typedef struct {
    /* geometry: group % 16 == 0 (the wrapper checks) */
    int64_t rows, cols, words, group, groups, tokens;
    int64_t nbase, nres;                  /* code planes, then MWQ residual planes */
    /* the matrix: planes [rows, words] uint32 each (bit t of word w: column 32w + t) */
    const uint32_t *planes[MAX_PLANES];   /* nbase code planes, top bit first; then nres */
    const float *scale, *zero;            /* [rows, groups] float32 at this bit-width */
    const float *plane_scale[MAX_PLANES]; /* [rows, groups] per residual plane (a_q) */
    const float *x;                       /* [tokens, cols] float32 */
    float *y;                             /* [tokens, rows] float32 */
} NestedArgs;

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

/* Column c's 16-bit mask in plane row `prow`, without columns at or past `cols`. */
static inline uint32_t mask16(const uint32_t *prow, int64_t c, int64_t cols) {
    uint32_t k = (prow[c >> 5] >> (c & 16)) & 0xFFFFu;
    return cols - c >= 16 ? k : k & ((1u << (cols - c)) - 1u);
}

#if defined(__AVX512F__)
/* One row for T tokens: acc[t][u] += c_pg * (x[t] where plane p's bit is set), U chains a
 * token so the multiply-adds overlap (latency 4, two a cycle). */
static inline __attribute__((always_inline)) void row_avx512(const NestedArgs *a, int64_t r,
                                                             const int T, const int U,
                                                             float *out) {
    const int64_t ng = a->groups, G = a->group, cols = a->cols;
    __m512 acc[MAX_TOKENS][4];
    for (int t = 0; t < T; t++)
        for (int u = 0; u < U; u++) acc[t][u] = _mm512_setzero_ps();
    for (int64_t p = 0; p < a->nbase + a->nres; p++) {
        const PlaneRow pr = plane_row(a, r, p);
        const uint32_t *prow = pr.bits;
        for (int64_t g = 0; g < ng; g++) {
            const __m512 cv = _mm512_set1_ps(pr.scale[g] * pr.mult);
            const int64_t end = (g + 1) * G < cols ? (g + 1) * G : cols;
            int64_t c = g * G;
            for (; c + 16 * U <= end; c += 16 * U)  /* whole chunks, U chains */
                for (int u = 0; u < U; u++) {
                    const __mmask16 k = (__mmask16)(prow[(c + 16 * u) >> 5] >> ((c + 16 * u) & 16));
                    for (int t = 0; t < T; t++) {
                        const __m512 xv = _mm512_loadu_ps(a->x + t * cols + c + 16 * u);
                        acc[t][u] = _mm512_mask3_fmadd_ps(xv, cv, acc[t][u], k);
                    }
                }
            for (; c < end; c += 16) {  /* the rest: partial chunks masked at cols */
                const __mmask16 k = (__mmask16)mask16(prow, c, cols);
                const __mmask16 in = cols - c >= 16 ? 0xFFFF : (__mmask16)((1u << (cols - c)) - 1u);
                for (int t = 0; t < T; t++) {
                    const __m512 xv = _mm512_maskz_loadu_ps(in, a->x + t * cols + c);
                    acc[t][0] = _mm512_mask3_fmadd_ps(xv, cv, acc[t][0], k);
                }
            }
        }
    }
    for (int t = 0; t < T; t++) {
        __m512 s = acc[t][0];
        for (int u = 1; u < U; u++) s = _mm512_add_ps(s, acc[t][u]);
        out[t] = _mm512_reduce_add_ps(s);
    }
}
#endif

#if !defined(__AVX512F__)
/* AVX2: 8 lanes and no mask registers, so a byte of a plane selects its 8 columns through
 * a table of the 256 lane masks (8 KiB, stays in L1): one load and one AND per 8 columns. */
static float LANES[256][8] __attribute__((aligned(32)));

__attribute__((constructor)) static void fill_lanes(void) {
    for (int v = 0; v < 256; v++)
        for (int i = 0; i < 8; i++) {
            const uint32_t bits = (v >> i) & 1u ? 0xFFFFFFFFu : 0u;
            memcpy(&LANES[v][i], &bits, sizeof bits);
        }
}

/* One row for T tokens, as row_avx512: acc[t][u][h] for the half h of 16 columns. */
static inline __attribute__((always_inline)) void row_avx2(const NestedArgs *a, int64_t r,
                                                           const int T, const int U,
                                                           float *out) {
    const int64_t ng = a->groups, G = a->group, cols = a->cols;
    __m256 acc[MAX_TOKENS][2][2];
    for (int t = 0; t < T; t++)
        for (int u = 0; u < U; u++) acc[t][u][0] = acc[t][u][1] = _mm256_setzero_ps();
    for (int64_t p = 0; p < a->nbase + a->nres; p++) {
        const PlaneRow pr = plane_row(a, r, p);
        const uint32_t *prow = pr.bits;
        for (int64_t g = 0; g < ng; g++) {
            const __m256 cv = _mm256_set1_ps(pr.scale[g] * pr.mult);
            const int64_t end = (g + 1) * G < cols ? (g + 1) * G : cols;
            int64_t c = g * G;
            for (; c + 16 * U <= end; c += 16 * U)  /* whole chunks, U chains */
                for (int u = 0; u < U; u++) {
                    const uint32_t k = (prow[(c + 16 * u) >> 5] >> ((c + 16 * u) & 16)) & 0xFFFFu;
                    const __m256 lo = _mm256_load_ps(LANES[k & 0xFF]);
                    const __m256 hi = _mm256_load_ps(LANES[k >> 8]);
                    for (int t = 0; t < T; t++) {
                        const float *xt = a->x + t * cols + c + 16 * u;
                        acc[t][u][0] = _mm256_fmadd_ps(_mm256_and_ps(lo, _mm256_loadu_ps(xt)),
                                                       cv, acc[t][u][0]);
                        acc[t][u][1] = _mm256_fmadd_ps(_mm256_and_ps(hi, _mm256_loadu_ps(xt + 8)),
                                                       cv, acc[t][u][1]);
                    }
                }
            for (; c < end; c += 16) {  /* the rest, one column at a time past cols */
                const uint32_t k = mask16(prow, c, cols);
                const int n = cols - c >= 16 ? 16 : (int)(cols - c);
                for (int t = 0; t < T; t++) {
                    float part[16] = {0};
                    for (int i = 0; i < n; i++) part[i] = a->x[t * cols + c + i];
                    const __m256 l = _mm256_and_ps(_mm256_load_ps(LANES[k & 0xFF]),
                                                   _mm256_loadu_ps(part));
                    const __m256 h = _mm256_and_ps(_mm256_load_ps(LANES[k >> 8]),
                                                   _mm256_loadu_ps(part + 8));
                    acc[t][0][0] = _mm256_fmadd_ps(l, cv, acc[t][0][0]);
                    acc[t][0][1] = _mm256_fmadd_ps(h, cv, acc[t][0][1]);
                }
            }
        }
    }
    for (int t = 0; t < T; t++) {
        __m256 s = _mm256_add_ps(acc[t][0][0], acc[t][0][1]);
        for (int u = 1; u < U; u++) s = _mm256_add_ps(s, _mm256_add_ps(acc[t][u][0], acc[t][u][1]));
        const __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
        out[t] = _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
    }
}
#endif

/* y for rows [r0, r1); 0, or -1 when scratch could not be allocated. */
int nested_rows(const NestedArgs *a, int64_t r0, int64_t r1) {
    const int64_t T = a->tokens, ng = a->groups, G = a->group, cols = a->cols;
    float *xsum = malloc(sizeof(float) * (size_t)(T * ng));  /* X of each token and group */
    if (xsum == NULL) return -1;
    for (int64_t t = 0; t < T; t++)
        for (int64_t g = 0; g < ng; g++) {
            float s = 0.0f;
            const int64_t end = (g + 1) * G < cols ? (g + 1) * G : cols;
            for (int64_t c = g * G; c < end; c++) s += a->x[t * cols + c];
            xsum[t * ng + g] = s;
        }
    for (int64_t r = r0; r < r1; r++) {
        float dot[MAX_TOKENS];
#if defined(__AVX512F__)
#define ROW row_avx512
#define U1 4  /* chains for one token */
#else
#define ROW row_avx2
#define U1 2  /* each of two halves: 4 chains */
#endif
        switch (T) {  /* constant T and U: the accumulators stay in registers */
            case 1: ROW(a, r, 1, U1, dot); break;
            case 2: ROW(a, r, 2, 2, dot); break;
            case 3: ROW(a, r, 3, 2, dot); break;
            case 4: ROW(a, r, 4, 2, dot); break;
            case 5: ROW(a, r, 5, 1, dot); break;
            case 6: ROW(a, r, 6, 1, dot); break;
            case 7: ROW(a, r, 7, 1, dot); break;
            default: ROW(a, r, 8, 1, dot); break;  /* T <= MAX_TOKENS */
        }
#undef ROW
#undef U1
        for (int64_t t = 0; t < T; t++) {  /* + sum_g (z_g - sum_q a_qg) X_g */
            float lin = 0.0f;
            for (int64_t g = 0; g < ng; g++) {
                float zeff = a->zero[r * ng + g];
                for (int64_t q = 0; q < a->nres; q++) zeff -= a->plane_scale[q][r * ng + g];
                lin += zeff * xsum[t * ng + g];
            }
            a->y[t * a->rows + r] = dot[t] + lin;
        }
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
