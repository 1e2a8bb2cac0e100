/* Paged decode attention for the CPU: one query token per sequence against its live context in
 * a paged K/V cache, each K and V row read from memory once, straight from its block (no gathered
 * copy).
 *
 * Per sequence, two passes. Scores: slot by slot, all KV heads of a slot at once (a block is read
 * front to back), each K chunk loaded once for up to 4 query heads of its group; the K rows AHEAD
 * slots on and the slot's V rows are prefetched, since blocks sit anywhere in the pool and the
 * hardware prefetcher cannot guess the next one. Softmax per head over its row of scores. Values:
 * per KV head, up to 4 query heads x 64 output floats are held in vector registers while the V
 * rows (now in L2) stream past once. Times per layer against the torch backend:
 * bench/results/cpu_kernels.md.
 *
 * Built on first use by runtime/native_build.py (cc -O3 -march=native, with OpenMP when the
 * compiler has it) and called through ctypes by runtime/decode_native.py (ctypes releases the
 * GIL). No torch or Python headers: plain C99.
 *
 * Layouts (all contiguous, C order):
 *   q       float  [num_seqs, heads, d]
 *   k_cache [num_blocks, block_size, kv_heads, d]   float, or uint8 codes (fp8) with a 256-entry
 *   v_cache  same                                    table `lut` giving each code's value
 *   tables  int32  [num_seqs, table_stride]         block ids; only entries holding positions
 *                                                    [starts[s], lens[s]) are read
 *   out     float  [num_seqs, heads, d]
 *   work    float  [threads, work_stride]           scratch, one area per thread, each
 *                                                    at least heads * max(lens - starts)
 * d must be a multiple of 16 (runtime/decode_native.py refuses other head sizes by name).
 * A query head i of kv head h is head h * group + i (grouped-query attention). `scale` already
 * includes the K dequantization scale; a positive `soft_cap` c turns each scaled score s into
 * c * tanh(s / c) (Gemma 2); `v_scale` multiplies the output.
 *
 * Returns 0, or -1 - s when sequence s names a block outside [0, num_blocks) (every live id is
 * checked before anything is read; then `out` is left as it was).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_HEADS 256
#define MAX_DIM 1024

/* 16 floats as one value: GCC and Clang map it onto whatever vectors the target has (one zmm with
 * AVX-512, two ymm with AVX2, four xmm otherwise). aligned(4): rows are only float-aligned. */
typedef float v16 __attribute__((vector_size(64), aligned(4)));
#define LANES 16
#define AHEAD 8 /* slots; 4-32 measured within 6% of each other on the mixed benchmark's batch */

/* The sum of a vector's 16 lanes: halves added as a tree (shuffles where the compiler has them). */
static inline __attribute__((always_inline)) float hsum(v16 a) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
    typedef float v8 __attribute__((vector_size(32)));
    typedef float v4 __attribute__((vector_size(16)));
    v8 b = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
    return (c[0] + c[2]) + (c[1] + c[3]);
#else
    float s = 0.0f;
    for (int l = 0; l < LANES; l++)
        s += a[l];
    return s;
#endif
}

/* Chunk `c` (16 floats) of a K or V row: straight from a float cache, or decoded from fp8 codes. */
static inline __attribute__((always_inline)) v16 load16(const void *restrict cache, const float *restrict lut,
                                                        int64_t row, int64_t d, int64_t c) {
    if (lut == NULL)
        return *(const v16 *)((const float *)cache + row * d + c * LANES);
    const uint8_t *codes = (const uint8_t *)cache + row * d + c * LANES;
    v16 x;
    for (int l = 0; l < LANES; l++)
        x[l] = lut[codes[l]];
    return x;
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

/* Scores of every query head against the n K rows, slot by slot (a slot's K rows for all KV heads
 * are contiguous, so each block is read front to back); work[i * n + t] = scale * q_i . k_t. The
 * slot's V rows are prefetched for the values pass. */
static inline __attribute__((always_inline)) void scores_all(
        const float *restrict qs, const void *restrict k_cache, const void *restrict v_cache,
        const float *restrict lut, const int32_t *restrict table, int64_t start, int64_t n, int64_t heads,
        int64_t kv_heads, const int64_t NC, int64_t block_size, float scale, float *restrict work) {
    const int64_t d = NC * LANES, group = heads / kv_heads;
    const int64_t esize = lut == NULL ? 4 : 1, row_bytes = kv_heads * d * esize;
    SlotCursor cur = cursor_at(table, block_size, start);
    const int64_t ahead = AHEAD < n ? AHEAD : n;  /* K rows are prefetched this many slots ahead */
    SlotCursor pre = cursor_at(table, block_size, start + ahead - (ahead == n));
    for (int64_t t = 0; t < n; t++) {
        const int64_t slot = cursor_next(&cur);
        const char *vrow = (const char *)v_cache + slot * row_bytes;
        for (int64_t b = 0; b < row_bytes; b += 64)
            __builtin_prefetch(vrow + b, 0, 2);
        if (t + ahead < n) {
            const char *krow = (const char *)k_cache + cursor_next(&pre) * row_bytes;
            for (int64_t b = 0; b < row_bytes; b += 64)
                __builtin_prefetch(krow + b, 0, 3);
        }
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t row = slot * kv_heads + h;
            int64_t i = h * group;
            for (; i + 4 <= (h + 1) * group; i += 4) {
                v16 acc[4] = {0};
                for (int64_t c = 0; c < NC; c++) {
                    const v16 k = load16(k_cache, lut, row, d, c);
#pragma GCC unroll 4
                    for (int g = 0; g < 4; g++)
                        acc[g] += *(const v16 *)(qs + (i + g) * d + c * LANES) * k;
                }
#pragma GCC unroll 4
                for (int g = 0; g < 4; g++)
                    work[(i + g) * n + t] = hsum(acc[g]) * scale;
            }
            for (; i < (h + 1) * group; i++) {
                v16 acc = {0};
                for (int64_t c = 0; c < NC; c++)
                    acc += *(const v16 *)(qs + i * d + c * LANES) * load16(k_cache, lut, row, d, c);
                work[i * n + t] = hsum(acc) * scale;
            }
        }
    }
}

/* o[i] = sum_t p_i[t] v_t for query heads [i0, i0 + TG) of KV head h over V chunks [c0, c0 + CC):
 * TG x CC vector accumulators stay in registers while each V chunk is loaded once. */
static inline __attribute__((always_inline)) void values_tile(
        const void *restrict v_cache, const float *restrict lut, const int32_t *restrict table, int64_t start,
        int64_t n, int64_t kv_heads, int64_t h, int64_t i0, const int TG, int64_t c0, const int CC, int64_t d,
        int64_t block_size, const float *restrict work, float *restrict o) {
    v16 acc[4][4] = {{0}};
    SlotCursor cur = cursor_at(table, block_size, start);
    for (int64_t t = 0; t < n; t++) {
        const int64_t row = cursor_next(&cur) * kv_heads + h;
#pragma GCC unroll 4
        for (int c = 0; c < CC; c++) {
            const v16 v = load16(v_cache, lut, row, d, c0 + c);
#pragma GCC unroll 4
            for (int g = 0; g < TG; g++)
                acc[g][c] += work[(i0 + g) * n + t] * v;
        }
    }
    for (int g = 0; g < TG; g++)
        for (int c = 0; c < CC; c++)
            *(v16 *)(o + (i0 + g) * d + (c0 + c) * LANES) = acc[g][c];
}

/* One sequence, all its heads, d = NC * 16: scores, softmax, values (see the top of the file). */
static inline __attribute__((always_inline)) void decode_seq(
        const float *restrict qs, const void *restrict k_cache, const void *restrict v_cache,
        const float *restrict lut, const int32_t *restrict table, const int64_t start, const int64_t n,
        const int64_t heads, const int64_t kv_heads, const int64_t NC, const int64_t block_size,
        const float scale, const float soft_cap, const float v_scale, float *restrict o, float *restrict work) {
    const int64_t group = heads / kv_heads, d = NC * LANES;
    if (n < 1) {  /* nothing to attend to (never a decode row): zeros, not a division by zero */
        memset(o, 0, (size_t)(heads * d) * sizeof(float));
        return;
    }
    scores_all(qs, k_cache, v_cache, lut, table, start, n, heads, kv_heads, NC, block_size, scale, work);
    float sum[MAX_HEADS];
    for (int64_t i = 0; i < heads; i++) {  /* soft-cap, then softmax numerators and their sums */
        float *restrict w = work + i * n;
        if (soft_cap > 0.0f) {
            const float inv = 1.0f / soft_cap;
#pragma omp simd
            for (int64_t t = 0; t < n; t++)
                w[t] = soft_cap * tanhf(w[t] * inv);
        }
        float m = -FLT_MAX;  /* scores are finite: no infinities under -ffast-math */
#pragma omp simd reduction(max : m)
        for (int64_t t = 0; t < n; t++)
            m = w[t] > m ? w[t] : m;
        float tot = 0.0f;
#pragma omp simd reduction(+ : tot)
        for (int64_t t = 0; t < n; t++) {
            w[t] = expf(w[t] - m);
            tot += w[t];
        }
        sum[i] = tot;
    }
    for (int64_t h = 0; h < kv_heads; h++)
        for (int64_t c0 = 0; c0 < NC; c0 += 4) {
            const int CC = NC - c0 >= 4 ? 4 : (int)(NC - c0);
            int64_t i = h * group;
            if (CC == 4) {  /* tiles of 4, 2, then 1 query heads (compile-time tile shapes) */
                for (; i + 4 <= (h + 1) * group; i += 4)
                    values_tile(v_cache, lut, table, start, n, kv_heads, h, i, 4, c0, 4, d, block_size, work, o);
                for (; i + 2 <= (h + 1) * group; i += 2)
                    values_tile(v_cache, lut, table, start, n, kv_heads, h, i, 2, c0, 4, d, block_size, work, o);
                for (; i < (h + 1) * group; i++)
                    values_tile(v_cache, lut, table, start, n, kv_heads, h, i, 1, c0, 4, d, block_size, work, o);
            } else {
                for (; i < (h + 1) * group; i++)
                    values_tile(v_cache, lut, table, start, n, kv_heads, h, i, 1, c0, CC, d, block_size, work, o);
            }
        }
    for (int64_t i = 0; i < heads; i++) {
        const float r = v_scale / sum[i];
#pragma omp simd
        for (int64_t j = 0; j < d; j++)
            o[i * d + j] *= r;
    }
}

/* 1 when this build splits sequences over OpenMP threads (then the caller passes its thread
 * count), 0 when each call runs on the calling thread only. */
int kgen_paged_decode_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Sequences [seq_begin, seq_end). `work` holds `threads` scratch areas of `work_stride` floats each
 * (one per thread; heads * max(lens - starts) floats suffice). With OpenMP the sequences are
 * handed out one at a time to `threads` threads of the process's OpenMP pool: torch's own, since
 * the loader maps this library's libgomp onto the copy torch has already loaded (same soname), so
 * decode runs on the threads that run the matmuls, with no second pool competing for cores. */
int kgen_paged_decode(const float *q, const void *k_cache, const void *v_cache, const float *lut,
                      const int32_t *tables, int64_t table_stride, const int32_t *starts,
                      const int32_t *lens, int64_t seq_begin, int64_t seq_end, int64_t heads,
                      int64_t kv_heads, int64_t d, int64_t block_size, int64_t num_blocks,
                      float scale, float soft_cap, float v_scale, float *out, float *work,
                      int64_t work_stride, int64_t threads) {
    if (heads > MAX_HEADS || d > MAX_DIM || heads % kv_heads || d % LANES)
        return -1 - seq_begin;
    for (int64_t s = seq_begin; s < seq_end; s++) {  /* every live block id, before any is read */
        const int64_t start = starts[s], n = lens[s] - starts[s];
        const int32_t *table = tables + s * table_stride;
        for (int64_t p = start / block_size; p * block_size < start + n; p++)
            if (table[p] < 0 || table[p] >= num_blocks)
                return -1 - s;
    }
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
#endif
    for (int64_t s = seq_begin; s < seq_end; s++) {
        const int64_t start = starts[s], n = lens[s] - starts[s];
        const int32_t *table = tables + s * table_stride;
        const float *qs = q + s * heads * d;
        float *o = out + s * heads * d;
#ifdef _OPENMP
        float *w = work + omp_get_thread_num() * work_stride;
#else
        float *w = work;
#endif
        if (d == 64)  /* the common head sizes get loops specialized on their width */
            decode_seq(qs, k_cache, v_cache, lut, table, start, n, heads, kv_heads, 4, block_size, scale, soft_cap,
                       v_scale, o, w);
        else if (d == 128)
            decode_seq(qs, k_cache, v_cache, lut, table, start, n, heads, kv_heads, 8, block_size, scale, soft_cap,
                       v_scale, o, w);
        else
            decode_seq(qs, k_cache, v_cache, lut, table, start, n, heads, kv_heads, d / LANES, block_size, scale,
                       soft_cap, v_scale, o, w);
    }
    return 0;
}
