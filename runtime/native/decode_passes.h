/* The passes of paged_decode.c over one sequence: K/V chunk loads, the slot cursor and its
 * prefetches, the scores (widened floats, or VDPBF16PS for bfloat16 where the CPU has
 * AVX512-BF16), softmax with torch's rule for non-finite scores, and the weighted sum of V rows.
 * Static inline functions, included by paged_decode.c only (see the top of that file). */
#ifndef KGEN_DECODE_PASSES_H
#define KGEN_DECODE_PASSES_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define KGEN_DPBF16 1
#else
#define KGEN_DPBF16 0
#endif

#include "elem.h"

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

#endif
