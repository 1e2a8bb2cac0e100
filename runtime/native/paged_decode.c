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
#define MAX_DIM 1024

/* The K or V row `row` as floats: a pointer into a float cache, or `buf` filled from fp8 codes. */
static inline __attribute__((always_inline)) const float *load_row(const void *restrict cache, const float *restrict lut,
                                                                   int64_t row, const int64_t d, float *restrict buf) {
    if (lut == NULL)
        return (const float *)cache + row * d;
    const uint8_t *codes = (const uint8_t *)cache + row * d;
    for (int64_t j = 0; j < d; j++)
        buf[j] = lut[codes[j]];
    return buf;
}

/* Walks a sequence's slots position by position, block by block (no division per position). */
typedef struct {
    const int32_t *table;
    int64_t block_size, blk, off, slot;
} SlotCursor;

static inline SlotCursor cursor_at(const int32_t *table, int64_t block_size, int64_t pos) {
    SlotCursor c = {table, block_size, pos / block_size, pos % block_size, 0};
    c.slot = (int64_t)table[c.blk] * block_size + c.off;
    return c;
}

/* The slot of the cursor's position, then one position on. */
static inline int64_t cursor_next(SlotCursor *c) {
    if (c->off == c->block_size) {
        c->off = 0;
        c->slot = (int64_t)c->table[++c->blk] * c->block_size;
    }
    c->off++;
    return c->slot++;
}

/* One sequence (all its heads). `d` is a compile-time constant in the specialized callers
 * below, so that the row loops unroll into whole vector registers. */
static inline __attribute__((always_inline)) void decode_seq(
        const float *restrict qs, const void *restrict k_cache, const void *restrict v_cache,
        const float *restrict lut, const int32_t *restrict table, const int64_t start, const int64_t n,
        const int64_t heads, const int64_t kv_heads, const int64_t d, const int64_t block_size,
        const float scale, const float soft_cap, const float v_scale, float *restrict o, float *restrict work) {
    const int64_t group = heads / kv_heads;
    float mx[MAX_HEADS], sum[MAX_HEADS], buf[MAX_DIM];
    for (int64_t i = 0; i < heads; i++)
        mx[i] = -FLT_MAX;  /* scores are finite: no infinities under -ffast-math */
    /* scores: all KV heads of a slot (contiguous) at once; K read once */
    SlotCursor cur = cursor_at(table, block_size, start);
    for (int64_t t = 0; t < n; t++) {
        const int64_t slot = cursor_next(&cur);
        for (int64_t h = 0; h < kv_heads; h++) {
            const float *restrict k = load_row(k_cache, lut, slot * kv_heads + h, d, buf);
            for (int64_t i = h * group; i < (h + 1) * group; i++) {
                const float *restrict qi = qs + i * d;
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
        float *restrict w = work + i * n;
        const float m = mx[i];
        float tot = 0.0f;
#pragma omp simd reduction(+ : tot)
        for (int64_t t = 0; t < n; t++) {
            w[t] = expf(w[t] - m);
            tot += w[t];
        }
        sum[i] = tot;
    }
    /* weighted values, one query head at a time so that its output row stays in registers; a KV
     * head's V rows (at most a few hundred KB) come from the cache the first time, then from L2 */
    for (int64_t h = 0; h < kv_heads; h++) {
        for (int64_t i = h * group; i < (h + 1) * group; i++) {
            float acc[MAX_DIM];
            const float *restrict p = work + i * n;
#pragma omp simd
            for (int64_t j = 0; j < d; j++)
                acc[j] = 0.0f;
            SlotCursor vcur = cursor_at(table, block_size, start);
            for (int64_t t = 0; t < n; t++) {
                const float *restrict v = load_row(v_cache, lut, cursor_next(&vcur) * kv_heads + h, d, buf);
                const float pr = p[t];
#pragma omp simd
                for (int64_t j = 0; j < d; j++)
                    acc[j] += pr * v[j];
            }
#pragma omp simd
            for (int64_t j = 0; j < d; j++)
                o[i * d + j] = acc[j];
        }
    }
    for (int64_t i = 0; i < heads; i++) {
        const float r = v_scale / sum[i];
#pragma omp simd
        for (int64_t j = 0; j < d; j++)
            o[i * d + j] *= r;
    }
}

int kgen_paged_decode(const float *q, const void *k_cache, const void *v_cache, const float *lut,
                      const int32_t *tables, int64_t table_stride, const int32_t *starts,
                      const int32_t *lens, int64_t seq_begin, int64_t seq_end, int64_t heads,
                      int64_t kv_heads, int64_t d, int64_t block_size, int64_t num_blocks,
                      float scale, float soft_cap, float v_scale, float *out, float *work) {
    if (heads > MAX_HEADS || d > MAX_DIM || heads % kv_heads)
        return -1 - seq_begin;
    for (int64_t s = seq_begin; s < seq_end; s++) {
        const int64_t start = starts[s], n = lens[s] - starts[s];
        const int32_t *table = tables + s * table_stride;
        for (int64_t p = start / block_size; p * block_size < start + n; p++)
            if (table[p] < 0 || table[p] >= num_blocks)
                return -1 - s;
        const float *qs = q + s * heads * d;
        float *o = out + s * heads * d;
        if (d == 64)  /* the common head sizes get loops specialized on their width */
            decode_seq(qs, k_cache, v_cache, lut, table, start, n, heads, kv_heads, 64, block_size, scale, soft_cap,
                       v_scale, o, work);
        else if (d == 128)
            decode_seq(qs, k_cache, v_cache, lut, table, start, n, heads, kv_heads, 128, block_size, scale, soft_cap,
                       v_scale, o, work);
        else
            decode_seq(qs, k_cache, v_cache, lut, table, start, n, heads, kv_heads, d, block_size, scale, soft_cap,
                       v_scale, o, work);
    }
    return 0;
}
