/* Element types of the CPU kernels (float32, bfloat16, float16) and the math they share, on
 * vectors of 16 lanes (GCC/Clang vector extensions: one zmm with AVX-512, two ymm with AVX2, ...).
 *
 * Every kernel computes in float32 and converts at its loads and stores. A bfloat16 is the top
 * half of a float32 (widened by a shift); a float16 is widened and narrowed with integer and
 * float32 ops (exact, subnormals included), so that no compiler support for _Float16 and no F16C
 * is needed. Narrowing rounds to nearest even as torch does, so that a kernel which rounds where
 * torch's ops round gives torch's bits: values beyond the format's range become infinities, a NaN
 * stays a NaN (made quiet, its sign kept).
 *
 * The library is built without -ffast-math (runtime/native_build.py): infinities and NaNs keep
 * their IEEE meaning, so the kernels can give torch's answers for non-finite inputs too. `vexp`
 * is a vectorized expf with those semantics: exp(-inf) = 0, exp(+inf) = inf, exp(NaN) = NaN,
 * within about 1 ulp elsewhere.
 */
#ifndef KGEN_ELEM_H
#define KGEN_ELEM_H

#include <math.h>
#include <stdint.h>
#include <string.h>

enum { T_F32 = 0, T_BF16 = 1, T_F16 = 2, T_FP8 = 3 }; /* runtime/native_build.py: TYPE_CODES */

#define LANES 16
typedef float f32x16 __attribute__((vector_size(64), aligned(4))); /* rows are only element-aligned */
typedef uint32_t u32x16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t i32x16 __attribute__((vector_size(64), aligned(4)));
typedef uint16_t u16x16 __attribute__((vector_size(32), aligned(2)));

#define INLINE static inline __attribute__((always_inline))

INLINE size_t type_size(const int T) {
    return T == T_F32 ? 4 : T == T_FP8 ? 1 : 2;
}

INLINE u32x16 usplat(uint32_t x) {
    return (u32x16){0} + x;
}

/* The smaller of 16 and what is left of a row of n from j. */
#define CHUNK(n, j) ((n) - (j) < LANES ? (n) - (j) : LANES)

/* All ones in lanes [0, c), zeros after. */
INLINE i32x16 vfirst(int64_t c) {
    const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    return lane < (int32_t)(c < LANES ? c : LANES);
}

/* Lanes of m (all ones or all zeros) pick a, the others b. */
INLINE u32x16 vselect(i32x16 m, u32x16 a, u32x16 b) {
    return ((u32x16)m & a) | (~(u32x16)m & b);
}

/* ---- bfloat16 ---- */

/* f rounded to bfloat16 (to nearest even), in the top half of each 32-bit lane (the bottom half
 * zero): add half an ulp of bfloat16, less one unless the kept part is odd, and cut. A NaN is not
 * rounded (that could carry into the sign) but made quiet. */
INLINE u32x16 vbf16_bits(f32x16 f) {
    const u32x16 u = (u32x16)f;
    const u32x16 rounded = u + 0x7fffu + ((u >> 16) & 1u);
    return vselect((u & 0x7fffffffu) > 0x7f800000u, u | 0x00400000u, rounded) & 0xffff0000u;
}

/* ---- float16 ---- */

/* Half bits (in 32-bit lanes) to float32: exponent and mantissa moved up 13 bits are a float32
 * 2^112 too small (the exponent biases differ by 127 - 15), subnormal halves included, so one
 * multiply rescales them exactly; infinities and NaNs get float32's top exponent. */
INLINE f32x16 vhalf_to_f32(u32x16 h) {
    const u32x16 em = h & 0x7fffu, sign = (h & 0x8000u) << 16;
    const f32x16 scaled = (f32x16)(em << 13) * 0x1p112f;
    return (f32x16)(vselect(em >= 0x7c00u, (em << 13) | 0x7f800000u, (u32x16)scaled) | sign);
}

/* float32 to half bits (in 32-bit lanes), rounded to nearest even: from 65536 up infinity (from
 * 65520 the normal path rounds there too), NaN a quiet NaN; below the smallest normal
 * half an add of 0.5 (whose ulp is the half subnormal's) rounds and aligns the mantissa; normal
 * halves are rebiased and rounded with the integer trick of vbf16_bits. */
INLINE u32x16 vf32_to_half(f32x16 f) {
    const u32x16 all = (u32x16)f, sign = (all & 0x80000000u) >> 16, u = all & 0x7fffffffu;
    const u32x16 big = vselect(u > 0x7f800000u, usplat(0x7e00u), usplat(0x7c00u));
    const u32x16 sub = (u32x16)((f32x16)u + 0.5f) - 0x3f000000u;
    const u32x16 norm = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13; /* (15 - 127) << 23, plus 0xfff */
    return vselect(u >= 0x47800000u, big, vselect(u < 0x38800000u, sub, norm)) | sign;
}

/* ---- loads and stores of 16 elements of type T, as float32 ----
 * With AVX-512 through intrinsics (one widening or narrowing move, a masked op for NaN lanes, the
 * CPU's own IEEE float16 conversions), since compilers lower the generic forms into shuffles;
 * elsewhere the generic vector code above, which gives the same bits. */

#if defined(__AVX512F__)
#include <immintrin.h>

INLINE f32x16 vbf16_load16(const uint16_t *p) {
    return (f32x16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
}

INLINE __m512i vbf16_bits_avx512(f32x16 f) {
    const __m512i u = _mm512_castps_si512((__m512)f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
    r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask((__m512)f, (__m512)f, _CMP_UNORD_Q), u, _mm512_set1_epi32(0x400000));
    return _mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u));
}

INLINE void vbf16_store16(uint16_t *p, f32x16 v) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(vbf16_bits_avx512(v), 16)));
}

INLINE f32x16 vbf16_round(f32x16 v) {
    return (f32x16)_mm512_castsi512_ps(vbf16_bits_avx512(v));
}

INLINE f32x16 vhalf_load16(const uint16_t *p) {
    return (f32x16)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

INLINE void vhalf_store16(uint16_t *p, f32x16 v) {
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

INLINE f32x16 vhalf_round(f32x16 v) {
    return (f32x16)_mm512_cvtph_ps(_mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#else
INLINE f32x16 vbf16_load16(const uint16_t *p) {
    return (f32x16)(__builtin_convertvector(*(const u16x16 *)p, u32x16) << 16);
}

INLINE void vbf16_store16(uint16_t *p, f32x16 v) {
    *(u16x16 *)p = __builtin_convertvector(vbf16_bits(v) >> 16, u16x16);
}

INLINE f32x16 vbf16_round(f32x16 v) {
    return (f32x16)vbf16_bits(v);
}

INLINE f32x16 vhalf_load16(const uint16_t *p) {
    return vhalf_to_f32(__builtin_convertvector(*(const u16x16 *)p, u32x16));
}

INLINE void vhalf_store16(uint16_t *p, f32x16 v) {
    *(u16x16 *)p = __builtin_convertvector(vf32_to_half(v), u16x16);
}

INLINE f32x16 vhalf_round(f32x16 v) {
    return vhalf_to_f32(vf32_to_half(v));
}
#endif

INLINE f32x16 vload16(const void *p, int64_t i, const int T) {
    if (T == T_BF16)
        return vbf16_load16((const uint16_t *)p + i);
    if (T == T_F16)
        return vhalf_load16((const uint16_t *)p + i);
    return *(const f32x16 *)((const float *)p + i);
}

INLINE void vstore16(void *p, int64_t i, f32x16 v, const int T) {
    if (T == T_BF16)
        vbf16_store16((uint16_t *)p + i, v);
    else if (T == T_F16)
        vhalf_store16((uint16_t *)p + i, v);
    else
        *(f32x16 *)((float *)p + i) = v;
}

/* 32 bfloat16 values from p as two float32 vectors: the even elements (0, 2, ..., 30) and the
 * odd ones. A 32-bit lane holds an even element in its low half and the next odd one in its top
 * half, so one load and one op per vector widen them (against a widening load and a shift per
 * 16 in order); sums over all 32 do not care about the order, and weighted sums of rows are put
 * back in order once at the end (vinterleave). */
INLINE void vbf16_pairs(const uint16_t *p, f32x16 *even, f32x16 *odd) {
    const u32x16 raw = *(const u32x16 *)p;
    *even = (f32x16)(raw << 16);
    *odd = (f32x16)(raw & 0xffff0000u);
}

/* Even and odd elements back in order: out[0] = elements 0-15, out[1] = 16-31. */
INLINE void vinterleave(f32x16 even, f32x16 odd, f32x16 out[2]) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
    out[0] = __builtin_shufflevector(even, odd, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    out[1] = __builtin_shufflevector(even, odd, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
#else
    for (int l = 0; l < LANES; l++) {
        out[l / 8][(2 * l) % LANES] = even[l];
        out[l / 8][(2 * l) % LANES + 1] = odd[l];
    }
#endif
}

/* Elements [i, i + c) (c <= 16), the other lanes zero: a whole vector, or a row's tail through a
 * zeroed buffer (so one formula serves both). */
INLINE f32x16 vload(const void *p, int64_t i, int64_t c, const int T) {
    if (c >= LANES)
        return vload16(p, i, T);
    float buf[LANES] = {0};
    memcpy(buf, (const char *)p + i * (int64_t)type_size(T), (size_t)c * type_size(T));
    return vload16(buf, 0, T);
}

INLINE void vstore(void *p, int64_t i, f32x16 v, int64_t c, const int T) {
    if (c >= LANES) {
        vstore16(p, i, v, T);
        return;
    }
    float buf[LANES];
    vstore16(buf, 0, v, T);
    memcpy((char *)p + i * (int64_t)type_size(T), buf, (size_t)c * type_size(T));
}

/* v rounded to type T and widened back: what torch holds after an op whose result has type T. */
INLINE f32x16 vround(f32x16 v, const int T) {
    if (T == T_BF16)
        return vbf16_round(v);
    if (T == T_F16)
        return vhalf_round(v);
    return v;
}

/* ---- exp ---- */

/* exp(x) = 2^k exp(r), k = round(x / ln 2) (adding and removing 1.5 * 2^23 rounds to nearest
 * even), r = x - k ln 2 (ln 2 in two parts, Cody and Waite), exp(r) by Cephes' expf polynomial;
 * 2^k applied as two powers of two so that k down to -150 (subnormal results) needs no special
 * case. Out-of-range lanes (and NaN) are computed on a clamped copy and replaced at the end. */
INLINE f32x16 vexp(f32x16 x) {
    const float hi = 88.72283935546875f, lo = -103.97208404541016f; /* exp(hi) ~ FLT_MAX; exp(lo) < 2^-149 */
    const i32x16 nan = x != x, over = x > hi, under = x < lo;
    const f32x16 xs = (f32x16)vselect(nan | under, (u32x16)((f32x16){0} + lo), (u32x16)x);
    const f32x16 xc = (f32x16)vselect(over, (u32x16)((f32x16){0} + hi), (u32x16)xs);
    const f32x16 k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const f32x16 r = (xc - k * 0.693359375f) - k * -2.12194440e-4f;
    const f32x16 p = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
                        4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f) * (r * r) + r + 1.0f;
    const i32x16 ki = __builtin_convertvector(k, i32x16), k1 = ki >> 1, k2 = ki - k1; /* each in [-75, 64] */
    const f32x16 y = p * (f32x16)((u32x16)(k1 + 127) << 23) * (f32x16)((u32x16)(k2 + 127) << 23);
    const u32x16 special = vselect(over, (u32x16)((f32x16){0} + INFINITY), usplat(0));
    return (f32x16)vselect(nan, (u32x16)x, vselect(over | under, special, (u32x16)y));
}

/* The sum of a vector's 16 lanes: halves added as a tree (shuffles where the compiler has them). */
INLINE float hsum(f32x16 a) {
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

/* The lane sums of 4 vectors at once, out[g] = hsum(a[g]): three rounds of halving, each adding
 * two shuffled pairs, share their shuffles between the vectors (about 4 ops a sum against 8). */
INLINE void hsum4(const f32x16 a[4], float out[4]) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
    typedef float v8 __attribute__((vector_size(32)));
    typedef float v4 __attribute__((vector_size(16)));
    /* [a0 | a1] with each 256-bit half folded: lanes 0-7 partials of a0, 8-15 of a1 */
#define FOLD(x, y) (__builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) + \
                    __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
    const f32x16 p01 = FOLD(a[0], a[1]), p23 = FOLD(a[2], a[3]);
#undef FOLD
    /* lanes 4g..4g+3: four partials of a[g] */
    const f32x16 q = __builtin_shufflevector(p01, p23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                     __builtin_shufflevector(p01, p23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    const v8 r = __builtin_shufflevector(q, q, 0, 2, 4, 6, 8, 10, 12, 14) +
                 __builtin_shufflevector(q, q, 1, 3, 5, 7, 9, 11, 13, 15);
    const v4 s = __builtin_shufflevector(r, r, 0, 2, 4, 6) + __builtin_shufflevector(r, r, 1, 3, 5, 7);
    for (int g = 0; g < 4; g++)
        out[g] = s[g];
#else
    for (int g = 0; g < 4; g++)
        out[g] = hsum(a[g]);
#endif
}

#endif
