/* The decoder's elementwise steps on the CPU, each one pass over its rows instead of the several
 * tensor ops (and temporaries) torch runs for them: RMSNorm with the residual add in front,
 * SiLU(gate) * up, and rotate-half RoPE in place. Built with paged_decode.c into one library by
 * runtime/native_build.py and called from runtime/model/native_ops.py.
 *
 * Element types: float32, bfloat16 or float16 (elem.h), one type code per call. The math is
 * float32, 16 lanes at a time, and a bfloat16/float16 result is rounded exactly where torch's ops
 * (and so transformers) round theirs: after every op of the formula, e.g. RoPE's q * cos, then
 * rotate_half(q) * sin, then their sum. So these ops give torch's bits, except for the order of
 * RMSNorm's float32 sum of squares.
 *
 * Rows are split over the process's OpenMP threads (torch's pool, see paged_decode.c) once a call
 * has enough work to pay for waking them; the math per row is the same either way. OpenMP
 * outlines a parallel loop's body into a function of its own, so each element type gets its own
 * copy of each loop (the DEFINE_* macros), with the type a literal inside it.
 */
#include <stddef.h>
#include <stdint.h>

#include "elem.h"

/* Elements below which a call runs on the calling thread: at a decode step's 64 rows of the e2e
 * model RMSNorm (32K elements) and RoPE (41K) took as long on 2 threads as on 1
 * (bench/results/cpu_kernels.md), so waking a second thread only added a barrier, and a barrier
 * costs a whole time slice when another process holds the partner's core; SiLU x up (88K) still
 * gained (0.042 -> 0.024 ms) and still splits. */
#define PARALLEL_MIN 65536

/* One row: x += delta, then (w != NULL) out = norm(x) * w. A weight of the row's type T is
 * Llama's w * round(norm(x)) (two roundings); a float32 weight WT with a lower-precision T is
 * Gemma's round(norm(x) * w) (one). */
INLINE void add_norm_row(void *x, const void *delta, const void *w, void *out, int64_t dim, float eps, const int T,
                         const int WT) {
    f32x16 sq = {0};
    for (int64_t j = 0; j < dim; j += LANES) {
        const int64_t c = CHUNK(dim, j);
        f32x16 v = vload(x, j, c, T);
        if (delta != NULL) {
            v = vround(v + vload(delta, j, c, T), T);
            vstore(x, j, v, c, T);
        }
        sq += v * v;
    }
    if (w == NULL)
        return;
    const float inv = 1.0f / sqrtf(hsum(sq) / (float)dim + eps);
    for (int64_t j = 0; j < dim; j += LANES) {
        const int64_t c = CHUNK(dim, j);
        const f32x16 normed = vload(x, j, c, T) * inv, wj = vload(w, j, c, WT);
        vstore(out, j, WT == T ? wj * vround(normed, T) : normed * wj, c, T);
    }
}

#define DEFINE_ADD_NORM(NAME, T, WT)                                                                         \
    static void NAME(char *x, int64_t x_stride, const char *delta, int64_t delta_stride, const void *w,     \
                     char *out, int64_t rows, int64_t dim, float eps, int64_t threads) {                     \
        const int64_t es = (int64_t)type_size(T);                                                            \
        (void)threads;                                                                                       \
        _Pragma("omp parallel for num_threads(threads) if (rows * dim >= PARALLEL_MIN) schedule(static)")   \
        for (int64_t r = 0; r < rows; r++)                                                                   \
            add_norm_row(x + r * x_stride * es, delta == NULL ? NULL : delta + r * delta_stride * es, w,     \
                         out == NULL ? NULL : out + r * dim * es, dim, eps, T, WT);                          \
    }
DEFINE_ADD_NORM(add_norm_f32, T_F32, T_F32)
DEFINE_ADD_NORM(add_norm_bf16, T_BF16, T_BF16)
DEFINE_ADD_NORM(add_norm_bf16_w32, T_BF16, T_F32)
DEFINE_ADD_NORM(add_norm_f16, T_F16, T_F16)
DEFINE_ADD_NORM(add_norm_f16_w32, T_F16, T_F32)

typedef void (*add_norm_fn)(char *, int64_t, const char *, int64_t, const void *, char *, int64_t, int64_t, float,
                            int64_t);

/* x [rows, dim] (row stride x_stride elements) += delta (if not NULL, row stride delta_stride);
 * then, if w is not NULL, out [rows, dim] (contiguous) = x / sqrt(mean(x^2) + eps) * w. `types`:
 * the type of x, delta and out, plus 16 x the weight's (the same, or float32). Returns 0, or -1
 * for a type pair it has no loop for. */
int kgen_add_rms_norm(void *x, int64_t x_stride, const void *delta, int64_t delta_stride, const void *w, void *out,
                      int64_t rows, int64_t dim, float eps, int64_t threads, int64_t types) {
    const int T = (int)(types & 15), WT = (int)(types >> 4);
    const add_norm_fn fn = T == T_F32 && WT == T_F32     ? add_norm_f32
                           : T == T_BF16 && WT == T_BF16 ? add_norm_bf16
                           : T == T_BF16 && WT == T_F32  ? add_norm_bf16_w32
                           : T == T_F16 && WT == T_F16   ? add_norm_f16
                           : T == T_F16 && WT == T_F32   ? add_norm_f16_w32
                                                         : NULL;
    if (fn == NULL)
        return -1;
    fn(x, x_stride, delta, delta_stride, w, out, rows, dim, eps, threads);
    return 0;
}

/* One row of silu(g) * u, each op rounded to T: g / (1 + exp(-g)) (exp(-g) = inf below g ~ -88
 * gives -0, the limit: the library keeps IEEE infinities). */
INLINE void silu_mul_row(const char *g, char *o, int64_t inter, const int T) {
    const char *u = g + inter * (int64_t)type_size(T);
    for (int64_t j = 0; j < inter; j += LANES) {
        const int64_t c = CHUNK(inter, j);
        const f32x16 gj = vload(g, j, c, T);
        vstore(o, j, vround(gj / (1.0f + vexp(-gj)), T) * vload(u, j, c, T), c, T);
    }
}

#define DEFINE_SILU_MUL(NAME, T)                                                                             \
    static void NAME(const char *gate_up, char *out, int64_t rows, int64_t inter, int64_t threads) {       \
        const int64_t es = (int64_t)type_size(T);                                                          \
        (void)threads;                                                                                     \
        _Pragma("omp parallel for num_threads(threads) if (rows * inter >= PARALLEL_MIN) schedule(static)") \
        for (int64_t r = 0; r < rows; r++)                                                                 \
            silu_mul_row(gate_up + r * 2 * inter * es, out + r * inter * es, inter, T);                    \
    }
DEFINE_SILU_MUL(silu_mul_f32, T_F32)
DEFINE_SILU_MUL(silu_mul_bf16, T_BF16)
DEFINE_SILU_MUL(silu_mul_f16, T_F16)

/* out [rows, inter] = silu(g) * u, where each row of gate_up [rows, 2 * inter] is [g | u]. */
int kgen_silu_mul(const void *gate_up, void *out, int64_t rows, int64_t inter, int64_t threads, int64_t types) {
    if (types == T_F32)
        silu_mul_f32(gate_up, out, rows, inter, threads);
    else if (types == T_BF16)
        silu_mul_bf16(gate_up, out, rows, inter, threads);
    else if (types == T_F16)
        silu_mul_f16(gate_up, out, rows, inter, threads);
    else
        return -1;
    return 0;
}

/* One row of RoPE: heads [0, heads) of x, each rounded to T after every op as torch does. */
INLINE void rope_row(char *x, const char *cs, const char *sn, int64_t heads, int64_t d, const int T) {
    const int64_t half = d / 2, es = (int64_t)type_size(T);
    for (int64_t h = 0; h < heads; h++) {
        char *x1 = x + h * d * es, *x2 = x1 + half * es;
        for (int64_t j = 0; j < half; j += LANES) {
            const int64_t c = CHUNK(half, j);
            const f32x16 a = vload(x1, j, c, T), b = vload(x2, j, c, T);
            const f32x16 c1 = vload(cs, j, c, T), c2 = vload(cs, half + j, c, T);
            const f32x16 s1 = vload(sn, j, c, T), s2 = vload(sn, half + j, c, T);
            vstore(x1, j, vround(vround(a * c1, T) - vround(b * s1, T), T), c, T);
            vstore(x2, j, vround(vround(b * c2, T) + vround(a * s2, T), T), c, T);
        }
    }
}

#define DEFINE_ROPE(NAME, T)                                                                                    \
    static void NAME(char *x, int64_t x_stride, const char *cs, const char *sn, int64_t rows, int64_t heads,   \
                     int64_t d, int64_t threads) {                                                            \
        const int64_t es = (int64_t)type_size(T);                                                             \
        (void)threads;                                                                                        \
        _Pragma("omp parallel for num_threads(threads) if (rows * heads * d >= PARALLEL_MIN) schedule(static)") \
        for (int64_t r = 0; r < rows; r++)                                                                    \
            rope_row(x + r * x_stride * es, cs + r * d * es, sn + r * d * es, heads, d, T);                   \
    }
DEFINE_ROPE(rope_f32, T_F32)
DEFINE_ROPE(rope_bf16, T_BF16)
DEFINE_ROPE(rope_f16, T_F16)

/* Rotate-half RoPE in place on heads [0, heads) of each row of x (row stride x_stride elements,
 * heads of d contiguous elements): with x = [x1 | x2] and the row's cos, sin [d] (each the same
 * half twice),  x1' = x1 * cos1 - x2 * sin1,   x2' = x2 * cos2 + x1 * sin2. */
int kgen_rope(void *x, int64_t x_stride, const void *cos_, const void *sin_, int64_t rows, int64_t heads, int64_t d,
              int64_t threads, int64_t types) {
    if (types == T_F32)
        rope_f32(x, x_stride, cos_, sin_, rows, heads, d, threads);
    else if (types == T_BF16)
        rope_bf16(x, x_stride, cos_, sin_, rows, heads, d, threads);
    else if (types == T_F16)
        rope_f16(x, x_stride, cos_, sin_, rows, heads, d, threads);
    else
        return -1;
    return 0;
}
