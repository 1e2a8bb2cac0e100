/* float32 and bfloat16 projections for the CPU: y = x W^T (+ b) with W packed once into column
 * panels, each panel's weights prefetched into L2 while the panel before it is computed.
 *
 * Why not oneDNN here: a decoder's weights (97 MB for the e2e model in float32) do not fit the
 * last-level cache, so every decode step streams them from DRAM. oneDNN's packed GEMM is as fast
 * as this kernel when a projection's weights are already in cache, but slows down when they come
 * from DRAM, most at the few rows of a decode step; this kernel asks for the next panel while it
 * computes the current one, so the stream overlaps the arithmetic (both timed warm and cold:
 * bench/results/cpu_kernels.md).
 *
 * Layout. W [N, K] (row-major, as torch stores nn.Linear weights) is packed into P = ceil(N / 64)
 * panels of [K][64] floats: panel p holds columns [64p, 64p + 64), one row of 64 per k, so the
 * kernel reads it front to back; columns past N are zeros (their outputs are never stored).
 *
 * Micro-kernel. A tile of up to 6 rows of x by one panel keeps 6 x 4 vectors of 16 float32 sums in
 * registers; per k it loads the panel's 64 weights (4 vectors), broadcasts each row's x[r, k] and
 * does 24 fused multiply-adds. Each output is summed in float32 over blocks of KB = 256 k in order
 * (fresh sums per block, added to the output: one long running sum rounded visibly worse than MKL's
 * at k = 512-1376, blocks bring it near MKL's for a small cost; tests/test_native_gemm.py holds
 * the result to a float64 reference). The
 * bias goes in with the first block. The order does not depend on the thread count (1 and 2
 * threads give the same bits); it differs from MKL's and oneDNN's, as theirs differ from each
 * other, at float32 rounding.
 *
 * bfloat16 (where the compiler targets AVX512-BF16): panels of [ceil(K / 2)][64][2], each column's
 * weights for k = 2j and 2j + 1 side by side, so that one VDPBF16PS per 16 columns multiplies them
 * by a row's broadcast pair x[r, 2j..2j+1] and adds both products into float32 sums: 6 x 4 of them
 * per tile as above, two k a step. One running sum over k (bfloat16 outputs round to 2^-9, far
 * above its error), the bias added, then one rounding to nearest even: oneDNN's F.linear does
 * the same, so the bits agree but where the two sums' orders round apart.
 *
 * Threads (the process's OpenMP pool, torch's: see paged_decode.c): each thread takes a
 * contiguous range of panels and streams its own weights; with fewer panels than threads it takes
 * a range of row tiles instead, over every panel. While a thread computes its panel's row tiles,
 * each tile prefetches an equal share of the thread's next panel.
 *
 * Built by runtime/native_build.py with the other kernels; called from runtime/model/linear.py.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "elem.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define KGEN_GEMM_BF16 1
#else
#define KGEN_GEMM_BF16 0
#endif

#define NR 64 /* panel width: 4 vectors of 16 */
#define MR 6  /* rows per tile: 6 x 4 sums + 4 weight vectors + 1 broadcast of 32 registers */
#ifndef KB
#define KB 256 /* k per block of sums (see the top of the file) */
#endif

enum { G_SHAPE = 1, G_UNBUILT = 2 };

/* w [n, k] row-major -> packed [ceil(n / 64)][k][64], zeros past column n. */
void kgen_gemm_f32_pack(const float *restrict w, int64_t n, int64_t k, float *restrict packed) {
    const int64_t panels = (n + NR - 1) / NR;
    for (int64_t p = 0; p < panels; p++)
        for (int64_t c = 0; c < NR; c++) {
            const int64_t col = p * NR + c;
            float *dst = packed + p * k * NR + c;
            if (col < n)
                for (int64_t j = 0; j < k; j++)
                    dst[j * NR] = w[col * k + j];
            else
                for (int64_t j = 0; j < k; j++)
                    dst[j * NR] = 0.0f;
        }
}

/* Prefetch requests that run alongside a tile: lines [lo, hi) of the next panel, `per_k` a step. */
typedef struct {
    const char *lo, *hi;
    int per_k;
} Ahead;

/* The tile's prefetch requests for one step of its k loop. */
INLINE void ahead_step(Ahead *ahead) {
    for (int q = 0; q < ahead->per_k; q++)
        if (ahead->lo < ahead->hi) {
            __builtin_prefetch(ahead->lo, 0, 2); /* into L2: the panel is read from there R rows at a time */
            ahead->lo += 64;
        }
}

/* y[r, c] = sum_k x[r, k] w[c, k] (+ bias[c]) for the tile's R rows and the panel's columns;
 * `cols` of them are stored (64 but in the last panel). */
INLINE void gemm_tile(const float *restrict x, int64_t ldx, const float *restrict panel, int64_t k,
                      const float *restrict bias, float *restrict y, int64_t ldy, int64_t cols, Ahead ahead,
                      const int R) {
    for (int64_t k0 = 0; k0 < k; k0 += KB) {
        const int64_t k1 = k0 + KB < k ? k0 + KB : k;
        f32x16 acc[MR][4];
        for (int r = 0; r < R; r++)
            for (int j = 0; j < 4; j++)
                acc[r][j] = (f32x16){0};
        for (int64_t j = k0; j < k1; j++) {
            const f32x16 *wj = (const f32x16 *)(panel + j * NR);
            const f32x16 w0 = wj[0], w1 = wj[1], w2 = wj[2], w3 = wj[3];
#pragma GCC unroll 6
            for (int r = 0; r < R; r++) {
                const f32x16 xr = (f32x16){0} + x[r * ldx + j];
                acc[r][0] += xr * w0;
                acc[r][1] += xr * w1;
                acc[r][2] += xr * w2;
                acc[r][3] += xr * w3;
            }
            ahead_step(&ahead);
        }
        for (int r = 0; r < R; r++) /* y = bias + block 0, then y += each later block's sums */
            for (int j = 0; j < 4; j++) {
                f32x16 v = acc[r][j];
                float *out = y + r * ldy + j * LANES;
                const int64_t c = cols - j * LANES < LANES ? cols - j * LANES : LANES;
                if (k0 == 0 && bias != NULL)
                    v += *(const f32x16 *)(bias + j * LANES);
                if (c == LANES)
                    *(f32x16 *)out = k0 == 0 ? v : *(const f32x16 *)out + v;
                else
                    for (int64_t l = 0; l < c; l++)
                        out[l] = k0 == 0 ? v[l] : out[l] + v[l];
            }
    }
}

#if KGEN_GEMM_BF16
/* w [n, k] bfloat16 -> packed [ceil(n / 64)][ceil(k / 2)][64][2]: per pair of k, each column's two
 * weights side by side (the operand layout of VDPBF16PS); zeros past column n and past k. */
void kgen_gemm_bf16_pack(const uint16_t *restrict w, int64_t n, int64_t k, uint16_t *restrict packed) {
    const int64_t panels = (n + NR - 1) / NR, pairs = (k + 1) / 2;
    for (int64_t p = 0; p < panels; p++)
        for (int64_t c = 0; c < NR; c++) {
            const int64_t col = p * NR + c;
            uint16_t *dst = packed + p * pairs * NR * 2 + c * 2;
            for (int64_t j = 0; j < pairs * 2; j++)
                dst[(j / 2) * NR * 2 + j % 2] = col < n && j < k ? w[col * k + j] : 0;
        }
}

/* x[r, 2j] and x[r, 2j + 1] as one 32-bit lane pattern (the second 0 past k); a pair inside the row
 * is one 4-byte load. */
INLINE __m512i pair_splat(const uint16_t *xr, int64_t j, int64_t k) {
    uint32_t two;
    if (2 * j + 1 < k)
        memcpy(&two, xr + 2 * j, 4);
    else
        two = xr[2 * j];
    return _mm512_set1_epi32((int)two);
}

/* gemm_tile for bfloat16 x and weights: VDPBF16PS multiplies each column's pair of weights by the
 * row's pair of x exactly (bfloat16 products fit float32) and adds both into the column's float32
 * sum, one long sum over k in order; the bias (float32) goes in at the end and each output is
 * rounded to bfloat16 once, to nearest even, as oneDNN's F.linear does. */
INLINE void gemm_tile_bf16(const uint16_t *restrict x, int64_t ldx, const uint16_t *restrict panel, int64_t k,
                           const float *restrict bias, uint16_t *restrict y, int64_t ldy, int64_t cols, Ahead ahead,
                           const int R) {
    const int64_t pairs = (k + 1) / 2;
    __m512 acc[MR][4];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 4; j++)
            acc[r][j] = _mm512_setzero_ps();
    for (int64_t j = 0; j < pairs; j++) {
        const __m512i *wj = (const __m512i *)(panel + j * NR * 2);
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wj), w1 = (__m512bh)_mm512_loadu_si512(wj + 1),
                       w2 = (__m512bh)_mm512_loadu_si512(wj + 2), w3 = (__m512bh)_mm512_loadu_si512(wj + 3);
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            const __m512bh xr = (__m512bh)pair_splat(x + r * ldx, j, k);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, xr);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, xr);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], w2, xr);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], w3, xr);
        }
        ahead_step(&ahead);
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 4; j++) {
            f32x16 v = (f32x16)acc[r][j];
            if (bias != NULL)
                v += *(const f32x16 *)(bias + j * LANES);
            uint16_t *out = y + r * ldy + j * LANES;
            const int64_t c = cols - j * LANES < LANES ? cols - j * LANES : LANES;
            if (c == LANES) {
                vbf16_store16(out, v);
            } else if (c > 0) {
                const u32x16 bits = vbf16_bits(v);
                for (int64_t l = 0; l < c; l++)
                    out[l] = (uint16_t)(bits[l] >> 16);
            }
        }
}
#endif

/* TILE(h) for the tile's height h = rows, each a compile-time constant (unrolled row loops). */
#define BY_HEIGHT(rows, TILE)         \
    switch (rows) {                   \
    case 6: TILE(6); break;           \
    case 5: TILE(5); break;           \
    case 4: TILE(4); break;           \
    case 3: TILE(3); break;           \
    case 2: TILE(2); break;           \
    default: TILE(1); break;          \
    }

/* Row tiles [t0, t1) of panels [p0, p1), prefetching each next panel of the range; BF: bfloat16
 * x, weights and y (else float32). */
INLINE void gemm_range(const void *x, int64_t ldx, int64_t m, int64_t k, const void *packed, int64_t n,
                       const float *bias, void *y, int64_t ldy, int64_t p0, int64_t p1, int64_t t0, int64_t t1,
                       const int BF) {
    const int64_t es = BF ? 2 : 4, panel_elems = (BF ? (k + 1) / 2 * 2 : k) * NR;
    const int64_t lines = panel_elems * es / 64, tiles = t1 - t0, steps = BF ? (k + 1) / 2 : k;
    const int64_t share = tiles > 0 ? (lines + tiles - 1) / tiles : 0;
    const int per_k = (int)((share + steps - 1) / steps);
    for (int64_t p = p0; p < p1; p++) {
        const char *panel = (const char *)packed + p * panel_elems * es;
        const char *next = p + 1 < p1 ? panel + panel_elems * es : NULL;
        const float *b = bias != NULL ? bias + p * NR : NULL;
        const int64_t cols = n - p * NR < NR ? n - p * NR : NR;
        for (int64_t t = t0; t < t1; t++) {
            const int64_t r0 = t * MR, rows = m - r0 < MR ? m - r0 : MR;
            const int64_t a = (t - t0) * share, e = a + share < lines ? a + share : lines;
            const int some = next != NULL && a < e;
            const Ahead ahead = {some ? next + a * 64 : NULL, some ? next + e * 64 : NULL, per_k};
            const char *xt = (const char *)x + r0 * ldx * es;
            char *yt = (char *)y + (r0 * ldy + p * NR) * es;
#if KGEN_GEMM_BF16
            if (BF) {
#define TILE(h) gemm_tile_bf16((const uint16_t *)xt, ldx, (const uint16_t *)panel, k, b, (uint16_t *)yt, ldy, cols, \
                               ahead, h)
                BY_HEIGHT(rows, TILE);
#undef TILE
                continue;
            }
#endif
#define TILE(h) gemm_tile((const float *)xt, ldx, (const float *)panel, k, b, (float *)yt, ldy, cols, ahead, h)
            BY_HEIGHT(rows, TILE);
#undef TILE
        }
    }
}

/* Both entry points: threads split the panels, or the row tiles where panels are fewer. */
INLINE int gemm_run(const void *x, int64_t ldx, int64_t m, int64_t k, const void *packed, int64_t n,
                    const float *bias, void *y, int64_t ldy, int64_t threads, const int BF) {
    if (m < 0 || k < 1 || n < 1 || ldx < k || ldy < n || threads < 1)
        return G_SHAPE;
    if (m == 0)
        return 0;
    const int64_t panels = (n + NR - 1) / NR, tiles = (m + MR - 1) / MR;
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (m * n * k >= 32768)
    {
        const int64_t nt = omp_get_num_threads(), me = omp_get_thread_num();
#else
    {
        const int64_t nt = 1, me = 0;
#endif
        if (panels >= nt)
            gemm_range(x, ldx, m, k, packed, n, bias, y, ldy, panels * me / nt, panels * (me + 1) / nt, 0, tiles, BF);
        else
            gemm_range(x, ldx, m, k, packed, n, bias, y, ldy, 0, panels, tiles * me / nt, tiles * (me + 1) / nt, BF);
    }
    return 0;
}

/* y [m, n] (row stride ldy) = x [m, k] (row stride ldx) times the packed weight's transpose, plus
 * `bias` (NULL, or ceil(n / 64) * 64 floats, zeros past n). Returns 0, or G_SHAPE before touching
 * anything when a size or stride is impossible. */
int kgen_gemm_f32(const float *x, int64_t ldx, int64_t m, int64_t k, const float *packed, int64_t n,
                  const float *bias, float *y, int64_t ldy, int64_t threads) {
    return gemm_run(x, ldx, m, k, packed, n, bias, y, ldy, threads, 0);
}

/* The same for bfloat16 x, packed weight (kgen_gemm_bf16_pack) and y, the bias float32; G_UNBUILT
 * where the library was built without AVX512-BF16 (kgen_gemm_bf16_available() says which). */
int kgen_gemm_bf16(const uint16_t *x, int64_t ldx, int64_t m, int64_t k, const uint16_t *packed, int64_t n,
                   const float *bias, uint16_t *y, int64_t ldy, int64_t threads) {
#if KGEN_GEMM_BF16
    return gemm_run(x, ldx, m, k, packed, n, bias, y, ldy, threads, 1);
#else
    (void)x, (void)ldx, (void)m, (void)k, (void)packed, (void)n, (void)bias, (void)y, (void)ldy, (void)threads;
    return G_UNBUILT;
#endif
}

int kgen_gemm_bf16_available(void) {
    return KGEN_GEMM_BF16;
}
