/* Paged decode attention for the CPU: one query token per sequence against its live context in
 * a paged K/V cache, each K and V row read once, straight from its block (no gathered copy).
 *
 * Built on first use by runtime/native_build.py (cc -O3 -march=native) and called through ctypes
 * by runtime/decode_native.py, which splits the sequences over threads (this code is single-
 * threaded per call; ctypes releases the GIL). No torch or Python headers: plain C99.
 *
 * Layouts (all contiguous, C order):
 *   q       float  [num_seqs, heads, d]
 *   k_cache [num_blocks, block_size, kv_heads, d]   float, or uint8 codes (fp8) with a 256-entry
 *   v_cache  same                                    table `lut` giving each code's value
 *   tables  int32  [num_seqs, table_stride]         block ids; only entries holding positions
 *                                                    [starts[s], lens[s]) are read
 *   out     float  [num_seqs, heads, d]
 *   work    float  [heads * max(lens - starts)]     scratch for one sequence
 * A query head i of kv head h is head h * group + i (grouped-query attention). `scale` already
 * includes the K dequantization scale; a positive `soft_cap` c turns each scaled score s into
 * c * tanh(s / c) (Gemma 2); `v_scale` multiplies the output.
 *
 * Returns 0, or -1 - s when sequence s names a block outside [0, num_blocks) (nothing is read
 * from such a block; its output rows are left as they were).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_HEADS 256

static inline const float *row_f32(const void *cache, int64_t row, int64_t d) {
    return (const float *)cache + row * d;
}

/* The K or V row as floats: a pointer into the cache, or `buf` filled from fp8 codes. */
static inline const float *load_row(const void *cache, const float *lut, int64_t row, int64_t d, float *buf) {
    if (lut == NULL)
        return row_f32(cache, row, d);
    const uint8_t *codes = (const uint8_t *)cache + row * d;
    for (int64_t j = 0; j < d; j++)
        buf[j] = lut[codes[j]];
    return buf;
}

int kgen_paged_decode(const float *q, const void *k_cache, const void *v_cache, const float *lut,
                      const int32_t *tables, int64_t table_stride, const int32_t *starts,
                      const int32_t *lens, int64_t seq_begin, int64_t seq_end, int64_t heads,
                      int64_t kv_heads, int64_t d, int64_t block_size, int64_t num_blocks,
                      float scale, float soft_cap, float v_scale, float *out, float *work) {
    float buf[1024];
    if (heads > MAX_HEADS || d > 1024 || heads % kv_heads)
        return -1 - seq_begin;
    const int64_t group = heads / kv_heads;
    for (int64_t s = seq_begin; s < seq_end; s++) {
        const int64_t start = starts[s], n = lens[s] - starts[s];
        const int32_t *table = tables + s * table_stride;
        for (int64_t p = start / block_size; p * block_size < start + n; p++)
            if (table[p] < 0 || table[p] >= num_blocks)
                return -1 - s;
        const float *qs = q + s * heads * d;
        float mx[MAX_HEADS], sum[MAX_HEADS];
        for (int64_t i = 0; i < heads; i++)
            mx[i] = -FLT_MAX;  /* scores are finite: no infinities under -ffast-math */
        /* scores: position by position, all KV heads of a slot (contiguous) at once; K read once */
        for (int64_t t = 0; t < n; t++) {
            const int64_t pos = start + t;
            const int64_t slot = (int64_t)table[pos / block_size] * block_size + pos % block_size;
            for (int64_t h = 0; h < kv_heads; h++) {
                const float *k = load_row(k_cache, lut, slot * kv_heads + h, d, buf);
                for (int64_t i = h * group; i < (h + 1) * group; i++) {
                    const float *qi = qs + i * d;
                    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                    for (int64_t j = 0; j < d; j++)
                        acc += qi[j] * k[j];
                    acc *= scale;
                    if (soft_cap > 0.0f)
                        acc = soft_cap * tanhf(acc / soft_cap);
                    work[i * n + t] = acc;
                    mx[i] = acc > mx[i] ? acc : mx[i];
                }
            }
        }
        for (int64_t i = 0; i < heads; i++) {  /* softmax numerators and their sums */
            float *w = work + i * n, m = mx[i], tot = 0.0f;
#pragma omp simd reduction(+ : tot)
            for (int64_t t = 0; t < n; t++) {
                w[t] = expf(w[t] - m);
                tot += w[t];
            }
            sum[i] = tot;
        }
        float *o = out + s * heads * d;
        memset(o, 0, sizeof(float) * (size_t)(heads * d));
        for (int64_t t = 0; t < n; t++) {  /* weighted values; V read once */
            const int64_t pos = start + t;
            const int64_t slot = (int64_t)table[pos / block_size] * block_size + pos % block_size;
            for (int64_t h = 0; h < kv_heads; h++) {
                const float *v = load_row(v_cache, lut, slot * kv_heads + h, d, buf);
                for (int64_t i = h * group; i < (h + 1) * group; i++) {
                    const float pr = work[i * n + t];
                    float *oi = o + i * d;
#pragma omp simd
                    for (int64_t j = 0; j < d; j++)
                        oi[j] += pr * v[j];
                }
            }
        }
        for (int64_t i = 0; i < heads; i++) {
            const float r = v_scale / sum[i];
            for (int64_t j = 0; j < d; j++)
                o[i * d + j] *= r;
        }
    }
    return 0;
}
