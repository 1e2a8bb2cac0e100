/* The decoder's elementwise steps for float32 on the CPU, each one pass over its rows instead of
 * the several tensor ops (and temporaries) torch runs for them: RMSNorm with the residual add in
 * front, SiLU(gate) * up, and rotate-half RoPE in place. Built with paged_decode.c into one
 * library by runtime/native_build.py and called from runtime/model/native_ops.py.
 *
 * Rows are split over the process's OpenMP threads (torch's pool, see paged_decode.c) once a call
 * has enough work to pay for waking them; the math per row is the same either way. Statistics are
 * fp32, as in torch and transformers; only the order of a row's sums differs.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define PARALLEL_MIN 32768 /* elements: below this one thread finishes before others would wake */

/* x [rows, dim] (row stride x_stride) += delta (if not NULL, row stride delta_stride); then, if
 * w is not NULL, out [rows, dim] (contiguous) = x / sqrt(mean(x^2) + eps) * w. */
void kgen_add_rms_norm(float *x, int64_t x_stride, const float *delta, int64_t delta_stride,
                       const float *w, float *out, int64_t rows, int64_t dim, float eps, int64_t threads) {
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) if (rows * dim >= PARALLEL_MIN) schedule(static)
#endif
    for (int64_t r = 0; r < rows; r++) {
        float *restrict xr = x + r * x_stride;
        if (delta != NULL) {
            const float *restrict dr = delta + r * delta_stride;
#pragma omp simd
            for (int64_t j = 0; j < dim; j++)
                xr[j] += dr[j];
        }
        if (w == NULL)
            continue;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < dim; j++)
            ss += xr[j] * xr[j];
        const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        float *restrict o = out + r * dim;
#pragma omp simd
        for (int64_t j = 0; j < dim; j++)
            o[j] = xr[j] * inv * w[j];
    }
}

/* out [rows, inter] = silu(g) * u, where each row of gate_up [rows, 2 * inter] is [g | u] and
 * silu(g) = g / (1 + exp(-g)). exp's argument is capped at 80 (e^80 ~ 5.5e34, finite): under
 * -ffast-math the division is a multiply by an approximate reciprocal, and g * (1 / inf) for a
 * gate below about -88 would come out NaN instead of (almost) zero. */
void kgen_silu_mul(const float *gate_up, float *out, int64_t rows, int64_t inter, int64_t threads) {
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) if (rows * inter >= PARALLEL_MIN) schedule(static)
#endif
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict g = gate_up + r * 2 * inter, *restrict u = g + inter;
        float *restrict o = out + r * inter;
#pragma omp simd
        for (int64_t j = 0; j < inter; j++)
            o[j] = g[j] / (1.0f + expf(fminf(-g[j], 80.0f))) * u[j];
    }
}

/* Rotate-half RoPE in place on heads [0, heads) of each row of x (row stride x_stride, heads of d
 * contiguous floats): with x = [x1 | x2] and the row's cos, sin [d] (each the same half twice),
 *   x1' = x1 * cos1 - x2 * sin1,   x2' = x2 * cos2 + x1 * sin2. */
void kgen_rope(float *x, int64_t x_stride, const float *cos_, const float *sin_, int64_t rows, int64_t heads,
               int64_t d, int64_t threads) {
    const int64_t half = d / 2;
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) if (rows * heads * d >= PARALLEL_MIN) schedule(static)
#endif
    for (int64_t r = 0; r < rows; r++) {
        const float *restrict c = cos_ + r * d, *restrict s = sin_ + r * d;
        for (int64_t h = 0; h < heads; h++) {
            float *restrict x1 = x + r * x_stride + h * d, *restrict x2 = x1 + half;
#pragma omp simd
            for (int64_t j = 0; j < half; j++) {
                const float a = x1[j], b = x2[j];
                x1[j] = a * c[j] - b * s[j];
                x2[j] = b * c[half + j] + a * s[half + j];
            }
        }
    }
}
