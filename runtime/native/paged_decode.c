/* Paged decode attention for the CPU: one query token per sequence against its live context in
 * a paged K/V cache, each K and V row read from memory once, straight from its block (no gathered
 * copy).
 *
 * Per sequence, two passes. Scores: slot by slot, all KV heads of a slot at once (a block is read
 * front to back), each K chunk loaded once for up to 4 query heads of its group; the K rows 4 KB
 * on and the slot's V rows are prefetched, since blocks sit anywhere in the pool and the
 * hardware prefetcher cannot guess the next one. Softmax per head over its row of scores. Values:
 * per KV head, up to 4 query heads x 64 output floats are held in vector registers while the V
 * rows (now in L2) stream past once. Times per layer against the torch backend:
 * bench/results/cpu_kernels.md.
 *
 * Element types (elem.h): q and out float32, bfloat16 or float16; the cache float32, bfloat16,
 * float16 or fp8 codes with a 256-entry table `lut` giving each code's value. All arithmetic is
 * float32 (scores, softmax, the weighted sum of V); a bfloat16/float16 q is widened into scratch
 * first and the output rounded (to nearest even) at the end. Where the compiler targets
 * AVX512-BF16 (-march=native on such a CPU) a bfloat16 q against a bfloat16 cache takes its
 * scores with VDPBF16PS (products of two bfloat16 are exact in float32, sums float32); elsewhere
 * each K chunk is widened to float32 first (kgen_native_isa() says which).
 *
 * Built on first use by runtime/native_build.py (cc -O3 -march=native, with OpenMP when the
 * compiler has it; never -ffast-math: scores that are NaN or infinite keep their IEEE meaning)
 * and called through ctypes by runtime/decode_native.py (ctypes releases the GIL). No torch or
 * Python headers: plain C99 (with _Float16 for float16 where the compiler has it).
 *
 * Layouts (all contiguous, C order):
 *   q       [num_seqs, heads, d]                   q_type
 *   k_cache [num_blocks, block_size, kv_heads, d]   kv_type
 *   v_cache  same
 *   tables  int32  [num_seqs, table_stride]         block ids; only entries holding positions
 *                                                    [starts[s], lens[s]) are read
 *   out     [num_seqs, heads, d]                    q_type
 *   work    float  [threads, work_stride]           scratch, one area per thread, each at least
 *                                                    heads * (max(lens - starts) + 2 * d) floats
 * d must be a multiple of 16 (runtime/decode_native.py refuses other head sizes by name).
 * A query head i of kv head h is head h * group + i (grouped-query attention). `scale` already
 * includes the K dequantization scale; a positive `soft_cap` c turns each scaled score s into
 * c * tanh(s / c) (Gemma 2); `v_scale` multiplies the output.
 *
 * Softmax over non-finite scores follows torch's CPU SDPA (which transformers runs): the maximum
 * skips NaN; a head whose every score is NaN or -inf gets zeros (a fully masked row); otherwise a
 * NaN or +inf score makes the head's output NaN.
 *
 * Returns 0 after writing `out`, or before reading anything (then `out` is left as it was) a
 * positive code (decode_error() below): a shape it cannot run, or the first sequence whose live
 * range is wrong (start outside [0, len], len beyond the table's table_stride * block_size
 * positions), names a block outside [0, num_blocks), or needs more scratch than work_stride.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define KGEN_DPBF16 1
#else
#define KGEN_DPBF16 0
#endif

#include "elem.h"

#define MAX_HEADS 256
#define MAX_DIM 1024

/* Error codes (runtime/decode_native.py turns them into messages): a shape code, or
 * 16 + 4 * s + kind for sequence s. */
enum { E_SHAPE = 1, E_TYPE = 2, E_SEQ = 16 };
enum { K_BLOCK = 0, K_RANGE = 1, K_WORK = 2 };

typedef f32x16 v16;
#define AHEAD_BYTES 4096 /* K rows prefetched this far ahead: 8 slots of 2 KV heads x 64 floats (4-32 slots
                          * measured within 6% of each other on the mixed benchmark's float32 batch) */

/* Slots to prefetch K rows ahead: AHEAD_BYTES of rows, at least 1, at most the n slots there are. */
INLINE int64_t ahead_slots(int64_t row_bytes, int64_t n) {
    const int64_t a = AHEAD_BYTES / row_bytes > 1 ? AHEAD_BYTES / row_bytes : 1;
    return a < n ? a : n;
}

/* Chunk `c` (16 values) of a K or V row of a cache of type KT, as floats: a float32 load, a
 * bfloat16 or float16 widened, or fp8 codes looked up in `lut`. */
INLINE v16 load16(const void *restrict cache, const float *restrict lut, int64_t row, int64_t d, int64_t c,
                  const int KT) {
    const int64_t at = row * d + c * LANES;
    if (KT == T_FP8) {
        const uint8_t *codes = (const uint8_t *)cache + at;
        v16 x;
        for (int l = 0; l < LANES; l++)
            x[l] = lut[codes[l]];
        return x;
    }
    return vload16(cache, at, KT);
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

/* The K and V rows of the slot `t` positions on are prefetched (K rows AHEAD slots on). */
static inline __attribute__((always_inline)) void prefetch_rows(const void *restrict k_cache,
                                                                const void *restrict v_cache, int64_t slot,
                                                                SlotCursor *pre, int ahead_left, int64_t row_bytes) {
    const char *vrow = (const char *)v_cache + slot * row_bytes;
    for (int64_t b = 0; b < row_bytes; b += 64)
        __builtin_prefetch(vrow + b, 0, 2);
    if (ahead_left) {
        const char *krow = (const char *)k_cache + cursor_next(pre) * row_bytes;
        for (int64_t b = 0; b < row_bytes; b += 64)
            __builtin_prefetch(krow + b, 0, 3);
    }
}

/* Scores of every query head against the n K rows, slot by slot (a slot's K rows for all KV heads
 * are contiguous, so each block is read front to back); work[i * n + t] = scale * q_i . k_t, with
 * q float32. The slot's V rows are prefetched for the values pass. */
static inline __attribute__((always_inline)) void scores_all(
        const float *restrict qs, const void *restrict k_cache, const void *restrict v_cache,
        const float *restrict lut, const int32_t *restrict table, int64_t start, int64_t n, int64_t heads,
        int64_t kv_heads, const int64_t NC, int64_t block_size, float scale, float *restrict work, const int KT) {
    const int64_t d = NC * LANES, group = heads / kv_heads;
    const int64_t row_bytes = kv_heads * d * (int64_t)type_size(KT);
    SlotCursor cur = cursor_at(table, block_size, start);
    const int64_t ahead = ahead_slots(row_bytes, n);
    SlotCursor pre = cursor_at(table, block_size, start + ahead - (ahead == n));
    for (int64_t t = 0; t < n; t++) {
        const int64_t slot = cursor_next(&cur);
        prefetch_rows(k_cache, v_cache, slot, &pre, t + ahead < n, row_bytes);
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t row = slot * kv_heads + h;
            int64_t i = h * group;
            for (; i + 4 <= (h + 1) * group; i += 4) {
                v16 acc[4] = {0};
                for (int64_t c = 0; c < NC; c++) {
                    const v16 k = load16(k_cache, lut, row, d, c, KT);
#pragma GCC unroll 4
                    for (int g = 0; g < 4; g++)
                        acc[g] += *(const v16 *)(qs + (i + g) * d + c * LANES) * k;
                }
                float sums[4];
                hsum4(acc, sums);
#pragma GCC unroll 4
                for (int g = 0; g < 4; g++)
                    work[(i + g) * n + t] = sums[g] * scale;
            }
            for (; i < (h + 1) * group; i++) {
                v16 acc = {0};
                for (int64_t c = 0; c < NC; c++)
                    acc += *(const v16 *)(qs + i * d + c * LANES) * load16(k_cache, lut, row, d, c, KT);
                work[i * n + t] = hsum(acc) * scale;
            }
        }
    }
}

#if KGEN_DPBF16
/* scores_all for a bfloat16 q (qb, [heads, d]) against a bfloat16 cache: VDPBF16PS multiplies 32
 * bfloat16 pairs (exactly, in float32) and adds each pair's sum into 16 float32 lanes. */
static inline __attribute__((always_inline)) void scores_all_dpbf16(
        const uint16_t *restrict qb, const uint16_t *restrict k_cache, const void *restrict v_cache,
        const int32_t *restrict table, int64_t start, int64_t n, int64_t heads, int64_t kv_heads, const int64_t NC,
        int64_t block_size, float scale, float *restrict work) {
    const int64_t d = NC * LANES, group = heads / kv_heads, row_bytes = kv_heads * d * 2;
    SlotCursor cur = cursor_at(table, block_size, start);
    const int64_t ahead = ahead_slots(row_bytes, n);
    SlotCursor pre = cursor_at(table, block_size, start + ahead - (ahead == n));
    for (int64_t t = 0; t < n; t++) {
        const int64_t slot = cursor_next(&cur);
        prefetch_rows(k_cache, v_cache, slot, &pre, t + ahead < n, row_bytes);
        for (int64_t h = 0; h < kv_heads; h++) {
            const uint16_t *krow = k_cache + (slot * kv_heads + h) * d;
            int64_t i = h * group;
            for (; i + 4 <= (h + 1) * group; i += 4) {
                f32x16 acc[4] = {{0}};
                for (int64_t c = 0; c < NC; c += 2) {  /* 32 values a step: d is a multiple of 32 here */
                    const __m512bh k = (__m512bh)_mm512_loadu_si512(krow + c * LANES);
#pragma GCC unroll 4
                    for (int g = 0; g < 4; g++) {
                        const __m512bh qg = (__m512bh)_mm512_loadu_si512(qb + (i + g) * d + c * LANES);
                        acc[g] = (f32x16)_mm512_dpbf16_ps((__m512)acc[g], qg, k);
                    }
                }
                float sums[4];
                hsum4(acc, sums);
#pragma GCC unroll 4
                for (int g = 0; g < 4; g++)
                    work[(i + g) * n + t] = sums[g] * scale;
            }
            for (; i < (h + 1) * group; i++) {
                __m512 acc = _mm512_setzero_ps();
                for (int64_t c = 0; c < NC; c += 2)
                    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qb + i * d + c * LANES),
                                           (__m512bh)_mm512_loadu_si512(krow + c * LANES));
                work[i * n + t] = _mm512_reduce_add_ps(acc) * scale;
            }
        }
    }
}
#endif

/* o[i] = sum_t p_i[t] v_t for query heads [i0, i0 + TG) of KV head h over V chunks [c0, c0 + CC):
 * TG x CC vector accumulators stay in registers while each V chunk is loaded once. */
static inline __attribute__((always_inline)) void values_tile(
        const void *restrict v_cache, const float *restrict lut, const int32_t *restrict table, int64_t start,
        int64_t n, int64_t kv_heads, int64_t h, int64_t i0, const int TG, int64_t c0, const int CC, int64_t d,
        int64_t block_size, const float *restrict work, float *restrict o, const int KT) {
    v16 acc[4][4] = {{0}};
    SlotCursor cur = cursor_at(table, block_size, start);
    if (KT == T_BF16 && CC % 2 == 0) {  /* bfloat16 rows 32 values a load, as even and odd elements */
        for (int64_t t = 0; t < n; t++) {
            const uint16_t *row = (const uint16_t *)v_cache + (cursor_next(&cur) * kv_heads + h) * d + c0 * LANES;
#pragma GCC unroll 2
            for (int c = 0; c < CC; c += 2) {
                v16 even, odd;
                vbf16_pairs(row + c * LANES, &even, &odd);
#pragma GCC unroll 4
                for (int g = 0; g < TG; g++) {
                    const float p = work[(i0 + g) * n + t];
                    acc[g][c] += p * even;
                    acc[g][c + 1] += p * odd;
                }
            }
        }
        for (int g = 0; g < TG; g++)
            for (int c = 0; c < CC; c += 2) {
                v16 ordered[2];
                vinterleave(acc[g][c], acc[g][c + 1], ordered);
                *(v16 *)(o + (i0 + g) * d + (c0 + c) * LANES) = ordered[0];
                *(v16 *)(o + (i0 + g) * d + (c0 + c + 1) * LANES) = ordered[1];
            }
        return;
    }
    for (int64_t t = 0; t < n; t++) {
        const int64_t row = cursor_next(&cur) * kv_heads + h;
#pragma GCC unroll 4
        for (int c = 0; c < CC; c++) {
            const v16 v = load16(v_cache, lut, row, d, c0 + c, KT);
#pragma GCC unroll 4
            for (int g = 0; g < TG; g++)
                acc[g][c] += work[(i0 + g) * n + t] * v;
        }
    }
    for (int g = 0; g < TG; g++)
        for (int c = 0; c < CC; c++)
            *(v16 *)(o + (i0 + g) * d + (c0 + c) * LANES) = acc[g][c];
}

/* Softmax numerators of one head's n scores in place, with torch's rule for non-finite scores
 * (see the top of the file); returns their sum, or 0 when the head attends to nothing. */
static inline float softmax_row(float *restrict w, int64_t n, float soft_cap) {
    if (soft_cap > 0.0f) {
        const float inv = 1.0f / soft_cap;
        for (int64_t t = 0; t < n; t++)
            w[t] = soft_cap * tanhf(w[t] * inv);
    }
    v16 mv = (v16){0} - INFINITY;  /* x > m is false for NaN: NaN scores never become the maximum */
    for (int64_t t = 0; t < n; t += LANES) {
        const int64_t c = CHUNK(n, t);
        const v16 x = vload(w, t, c, T_F32);
        mv = (v16)vselect(vfirst(c) & (x > mv), (u32x16)x, (u32x16)mv);
    }
    float m = -INFINITY;
    for (int l = 0; l < LANES; l++)
        m = mv[l] > m ? mv[l] : m;
    if (m == -INFINITY)
        return 0.0f;
    v16 tot = {0};
    for (int64_t t = 0; t < n; t += LANES) {
        const int64_t c = CHUNK(n, t);
        const v16 e = (v16)vselect(vfirst(c), (u32x16)vexp(vload(w, t, c, T_F32) - m), usplat(0));
        vstore(w, t, e, c, T_F32);
        tot += e;
    }
    return hsum(tot);
}

/* One sequence, all its heads, d = NC * 16: scores, softmax, values (see the top of the file).
 * q and o are float32 here; qb is the bfloat16 q when the caller has one (the VDPBF16PS scores). */
static inline __attribute__((always_inline)) void decode_seq(
        const float *restrict qs, const uint16_t *restrict qb, const void *restrict k_cache,
        const void *restrict v_cache, const float *restrict lut, const int32_t *restrict table, const int64_t start,
        const int64_t n, const int64_t heads, const int64_t kv_heads, const int64_t NC, const int64_t block_size,
        const float scale, const float soft_cap, const float v_scale, float *restrict o, float *restrict work,
        const int KT) {
    const int64_t group = heads / kv_heads, d = NC * LANES;
    if (n < 1) {  /* nothing to attend to (never a decode row): zeros, not a division by zero */
        memset(o, 0, (size_t)(heads * d) * sizeof(float));
        return;
    }
#if KGEN_DPBF16
    if (KT == T_BF16 && qb != NULL && NC % 2 == 0)
        scores_all_dpbf16(qb, k_cache, v_cache, table, start, n, heads, kv_heads, NC, block_size, scale, work);
    else
#endif
        scores_all(qs, k_cache, v_cache, lut, table, start, n, heads, kv_heads, NC, block_size, scale, work, KT);
    (void)qb;
    float sum[MAX_HEADS];
    for (int64_t i = 0; i < heads; i++)
        sum[i] = softmax_row(work + i * n, n, soft_cap);
    for (int64_t h = 0; h < kv_heads; h++)
        for (int64_t c0 = 0; c0 < NC; c0 += 4) {
            const int CC = NC - c0 >= 4 ? 4 : (int)(NC - c0);
            int64_t i = h * group;
            if (CC == 4) {  /* tiles of 4, 2, then 1 query heads (compile-time tile shapes) */
                for (; i + 4 <= (h + 1) * group; i += 4)
                    values_tile(v_cache, lut, table, start, n, kv_heads, h, i, 4, c0, 4, d, block_size, work, o, KT);
                for (; i + 2 <= (h + 1) * group; i += 2)
                    values_tile(v_cache, lut, table, start, n, kv_heads, h, i, 2, c0, 4, d, block_size, work, o, KT);
                for (; i < (h + 1) * group; i++)
                    values_tile(v_cache, lut, table, start, n, kv_heads, h, i, 1, c0, 4, d, block_size, work, o, KT);
            } else {
                for (; i < (h + 1) * group; i++)
                    values_tile(v_cache, lut, table, start, n, kv_heads, h, i, 1, c0, CC, d, block_size, work, o, KT);
            }
        }
    for (int64_t i = 0; i < heads; i++) {  /* a head that attends to nothing: zeros (sum 0) */
        const float r = sum[i] == 0.0f ? 0.0f : v_scale / sum[i];
#pragma omp simd
        for (int64_t j = 0; j < d; j++)
            o[i * d + j] = sum[i] == 0.0f ? 0.0f : o[i * d + j] * r;
    }
}

/* decode_seq specialized on the common head sizes (64, 128: loops unrolled on their width). */
static inline __attribute__((always_inline)) void decode_seq_d(
        const float *qs, const uint16_t *qb, const void *k_cache, const void *v_cache, const float *lut,
        const int32_t *table, int64_t start, int64_t n, int64_t heads, int64_t kv_heads, int64_t d,
        int64_t block_size, float scale, float soft_cap, float v_scale, float *o, float *w, const int KT) {
    if (d == 64)
        decode_seq(qs, qb, k_cache, v_cache, lut, table, start, n, heads, kv_heads, 4, block_size, scale, soft_cap,
                   v_scale, o, w, KT);
    else if (d == 128)
        decode_seq(qs, qb, k_cache, v_cache, lut, table, start, n, heads, kv_heads, 8, block_size, scale, soft_cap,
                   v_scale, o, w, KT);
    else
        decode_seq(qs, qb, k_cache, v_cache, lut, table, start, n, heads, kv_heads, d / LANES, block_size, scale,
                   soft_cap, v_scale, o, w, KT);
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

/* What this build can do: bit 0 OpenMP, bit 1 float16 elements (always), bit 2 VDPBF16PS scores. */
int kgen_native_features(void) {
    return kgen_paged_decode_openmp() | 2 | (KGEN_DPBF16 << 2);
}

/* The instruction set the library was compiled for, most specific first. */
const char *kgen_native_isa(void) {
#if defined(__AVX512BF16__)
    return "avx512_bf16";
#elif defined(__AVX512F__)
    return "avx512f";
#elif defined(__AVX2__)
    return "avx2";
#elif defined(__aarch64__)
    return "aarch64";
#else
    return "generic";
#endif
}

/* Every sequence's live range, block ids and scratch, checked before anything is read. */
static int check_seqs(const int32_t *tables, int64_t table_stride, const int32_t *starts, const int32_t *lens,
                      int64_t seq_begin, int64_t seq_end, int64_t heads, int64_t d, int64_t block_size,
                      int64_t num_blocks, int64_t work_stride) {
    for (int64_t s = seq_begin; s < seq_end; s++) {
        const int64_t start = starts[s], len = lens[s];
        if (start < 0 || start > len || len > table_stride * block_size)
            return E_SEQ + 4 * (int)s + K_RANGE;
        if (heads * (len - start + 2 * d) > work_stride)
            return E_SEQ + 4 * (int)s + K_WORK;
        const int32_t *table = tables + s * table_stride;
        for (int64_t p = start / block_size; p * block_size < len; p++)
            if (table[p] < 0 || table[p] >= num_blocks)
                return E_SEQ + 4 * (int)s + K_BLOCK;
    }
    return 0;
}

/* n values (a multiple of 16) of type T to float32 and back. */
static void widen(const void *src, float *dst, int64_t n, int T) {
    for (int64_t j = 0; j < n; j += LANES)
        vstore16(dst, j, T == T_BF16 ? vload16(src, j, T_BF16) : vload16(src, j, T_F16), T_F32);
}

static void narrow(const float *src, void *dst, int64_t n, int T) {
    for (int64_t j = 0; j < n; j += LANES) {
        if (T == T_BF16)
            vstore16(dst, j, vload16(src, j, T_F32), T_BF16);
        else
            vstore16(dst, j, vload16(src, j, T_F32), T_F16);
    }
}

/* All sequences [seq_begin, seq_end) with q type QT and cache type KT: a q that is not float32 is
 * widened into the thread's scratch (after its scores) and the output stored from float32 there.
 * With OpenMP the sequences are handed out one at a time to `threads` threads of the process's
 * OpenMP pool: torch's own, since the loader maps this library's libgomp onto the copy torch has
 * already loaded (same soname), so decode runs on the threads that run the matmuls, with no
 * second pool competing for cores. */
static inline __attribute__((always_inline)) void decode_all(
        const char *q, const void *k_cache, const void *v_cache, const float *lut, const int32_t *tables,
        int64_t table_stride, const int32_t *starts, const int32_t *lens, int64_t seq_begin, int64_t seq_end,
        int64_t heads, int64_t kv_heads, int64_t d, int64_t block_size, float scale, float soft_cap, float v_scale,
        char *out, float *work, int64_t work_stride, int64_t threads, int QT, const int KT) {
    const int64_t qbytes = heads * d * (int64_t)type_size(QT);
    (void)threads;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
#endif
    for (int64_t s = seq_begin; s < seq_end; s++) {
#ifdef _OPENMP
        float *w = work + omp_get_thread_num() * work_stride;
#else
        float *w = work;
#endif
        const int64_t start = starts[s], n = lens[s] - start;
        const char *qs = q + s * qbytes;
        char *o = out + s * qbytes;
        float *q32 = QT == T_F32 ? (float *)qs : w + heads * n, *o32 = QT == T_F32 ? (float *)o : q32 + heads * d;
        if (QT != T_F32)
            widen(qs, q32, heads * d, QT);
        decode_seq_d(q32, QT == T_BF16 ? (const uint16_t *)qs : NULL, k_cache, v_cache, lut,
                     tables + s * table_stride, start, n, heads, kv_heads, d, block_size, scale, soft_cap, v_scale,
                     o32, w, KT);
        if (QT != T_F32)
            narrow(o32, o, heads * d, QT);
    }
}

/* Sequences [seq_begin, seq_end); `types` = q_type + 16 * kv_type (elem.h's codes). `work` holds
 * `threads` scratch areas of `work_stride` floats each (one per thread). */
int kgen_paged_decode(const void *q, const void *k_cache, const void *v_cache, const float *lut,
                      const int32_t *tables, int64_t table_stride, const int32_t *starts,
                      const int32_t *lens, int64_t seq_begin, int64_t seq_end, int64_t heads,
                      int64_t kv_heads, int64_t d, int64_t block_size, int64_t num_blocks,
                      float scale, float soft_cap, float v_scale, void *out, float *work,
                      int64_t work_stride, int64_t threads, int64_t types) {
    const int QT = (int)(types & 15), KT = (int)(types >> 4);
    if (heads < 1 || kv_heads < 1 || heads > MAX_HEADS || d < LANES || d > MAX_DIM || heads % kv_heads ||
        d % LANES || block_size < 1)
        return E_SHAPE;
    if (QT >= T_FP8 || QT < 0 || KT > T_FP8 || KT < 0 || (KT == T_FP8) != (lut != NULL))
        return E_TYPE;
    const int bad = check_seqs(tables, table_stride, starts, lens, seq_begin, seq_end, heads, d, block_size,
                               num_blocks, work_stride);
    if (bad)
        return bad;
#define DECODE(kt) decode_all(q, k_cache, v_cache, lut, tables, table_stride, starts, lens, seq_begin, seq_end, \
                              heads, kv_heads, d, block_size, scale, soft_cap, v_scale, out, work, work_stride,  \
                              threads, QT, kt)
    if (KT == T_F32)
        DECODE(T_F32);
    else if (KT == T_BF16)
        DECODE(T_BF16);
    else if (KT == T_FP8)
        DECODE(T_FP8);
    else
        DECODE(T_F16);
#undef DECODE
    return 0;
}
