/* Paged decode attention for the CPU: one query token per sequence against its live context in
 * a paged K/V cache, each K and V row read from memory once, straight from its block (no gathered
 * copy).
 *
 * Per sequence, two passes. Scores: slot by slot, all KV heads of a slot at once (a block is read
 * front to back), each K chunk loaded once for up to 4 query heads of its group; the K rows 4 KB
 * on and the slot's V rows are prefetched, since blocks sit anywhere in the pool and the
 * hardware prefetcher cannot guess the next one. Softmax per head over its row of scores. Values:
 * per KV head, up to 4 query heads x 64 output floats are held in vector registers while the V
 * rows (now in L2) stream past once (the passes live in decode_passes.h). Times per layer against
 * the torch backend: bench/results/cpu_kernels.md.
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
 * positive code (runtime/decode_native.py names each): a shape it cannot run, or the first
 * sequence whose live range is wrong (start outside [0, len], len beyond the table's
 * table_stride * block_size positions), names a block outside [0, num_blocks), or needs more
 * scratch than work_stride.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "elem.h"

#define MAX_HEADS 256
#define MAX_DIM 1024

/* Error codes (runtime/decode_native.py turns them into messages): a shape code, or
 * 16 + 4 * s + kind for sequence s. */
enum { E_SHAPE = 1, E_TYPE = 2, E_SEQ = 16 };
enum { K_BLOCK = 0, K_RANGE = 1, K_WORK = 2 };

#include "decode_passes.h"

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
