// GGUF blocks as Ember's quantized kernels read them, and their dequantization in registers: shared by the kernels
// for a few rows (`quantized_linear.c`) and, through `quantized_tiles.h`, for many (`quantized_amx.c`,
// `quantized_dpbf16.c`).
//
// Weights are stored split, per output feature n and block b: quants [N][K/32][BYTES], scales [N][K/32][SCALES]
// and mins [N][K/32] as fp32 (mins NULL: none).
//
// Formats (`quantized.py` repacks GGUF's blocks into them at load):
//   q4  16 bytes: weight j < 16 in the low nibble of byte j, weight j + 16 in its high nibble; `d * q + m`
//       (Q4_0, Q4_1, Q4_K's sub-blocks);
//   q8  32 signed bytes; `d * q` (Q8_0);
//   q2  8 bytes: 2-bit weights as q6's high bit pairs; four scales: each half's `d` then each half's `m`, as
//       `d * q + m` (Q2_K's sub-blocks of 16, with their own scales and mins);
//   iq4 16 bytes: q4's nibbles, each an index into llama.cpp's 16 int8 grid values; `d * grid[q]` (IQ4_NL,
//       IQ4_XS's sub-blocks);
//   q5  20 bytes: q4's nibbles, then a 32-bit word whose bit j is weight j's fifth bit; `d * q + m` (Q5_0, Q5_1,
//       Q5_K's sub-blocks);
//   q6  24 bytes: q4's nibbles, then 8 bytes of high bit pairs (byte i: weights i, i + 8, i + 16, i + 24 in
//       bits 0-1, 2-3, 4-5, 6-7); two scales, one per 16 weights; `d * (q - 32)` (Q6_K: its `d * sc` has at
//       most 18 significant bits, so the products are exact in fp32, as in gguf-py; Q3_K: q + 32 of its -4..3).
#pragma once

#include "common.h"

#define QBLOCK 32
#define UP_TO(GROUP, c) ((c) < (GROUP) ? (c) : (GROUP))

static inline void prefetch_span(const void* p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch((const char*)p + i, 0, 3);
}

// ---- fp32 weights, on x86 with AVX-512 (16 lanes) or AVX2 and FMA (8 lanes): each block unpacked into 32 exact
// fp32 weights. GCC's generic vector types were tried first: it lowered their byte-to-float conversions to scalar
// code, which under AVX2 made the kernel 6x slower than no kernel at all.

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>

#ifdef __AVX512F__
#define LANES 16
#define F32_GROUP_ROWS 8  // rows whose two accumulators stay in registers: 16 of AVX-512's 32
typedef __m512 fvec;
#define VLOAD _mm512_loadu_ps
#define VSTORE _mm512_storeu_ps
#define VSET1 _mm512_set1_ps
#define VFMA _mm512_fmadd_ps
#define VMUL _mm512_mul_ps
#define VADD _mm512_add_ps
#define VZERO _mm512_setzero_ps
#define VBYTES_TO_F32(bytes16) _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes16))
#define VSBYTES_TO_F32(bytes16) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes16))
static inline float vsum(fvec v) { return _mm512_reduce_add_ps(v); }
#else
#define LANES 8
#define F32_GROUP_ROWS 4  // 8 of AVX2's 16 registers
typedef __m256 fvec;
#define VLOAD _mm256_loadu_ps
#define VSTORE _mm256_storeu_ps
#define VSET1 _mm256_set1_ps
#define VFMA _mm256_fmadd_ps
#define VMUL _mm256_mul_ps
#define VADD _mm256_add_ps
#define VZERO _mm256_setzero_ps
#define VBYTES_TO_F32(bytes8) _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8))
#define VSBYTES_TO_F32(bytes8) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes8))
static inline float vsum(fvec v) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
}
#endif
#define CHUNKS (QBLOCK / LANES)

// The bytes of lane group c (lanes c * LANES onwards) of a 16-byte vector, in its low lanes.
static inline __m128i byte_group(__m128i v, int c) {
    return LANES == 16 ? v : (c % 2 ? _mm_srli_si128(v, 8) : v);
}

// Weights c * LANES onwards of a 4-bit block (weight j < 16: low nibble of byte j; j >= 16: high nibble of
// byte j - 16), as `d * q + m`.
static inline void unpack_q4_f32(const uint8_t* q, const float* d, const float* m, fvec* w) {
    const __m128i bytes = _mm_loadu_si128((const __m128i*)q);
    const __m128i nibble = _mm_set1_epi8(0x0F);
    const __m128i halves[2] = {_mm_and_si128(bytes, nibble), _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble)};
    for (int c = 0; c < CHUNKS; c++) {
        const __m128i group = byte_group(halves[c * LANES / 16], c);
        w[c] = VFMA(VBYTES_TO_F32(group), VSET1(*d), VSET1(m ? *m : 0.0f));
    }
}

// IQ4 blocks (IQ4_NL, IQ4_XS's sub-blocks): q4's nibbles, each an index into llama.cpp's grid of 16 int8 values,
// looked up by a byte shuffle; `d * grid[q]`, exact in fp32 (at most 11 + 6 + 7 significant bits).
static inline __m128i iq4_grid(void) {
    return _mm_setr_epi8(-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113);
}

static inline void unpack_iq4_f32(const uint8_t* q, const float* d, const float* m, fvec* w) {
    (void)m;
    const __m128i bytes = _mm_loadu_si128((const __m128i*)q);
    const __m128i nibble = _mm_set1_epi8(0x0F);
    const __m128i halves[2] = {_mm_shuffle_epi8(iq4_grid(), _mm_and_si128(bytes, nibble)),
                               _mm_shuffle_epi8(iq4_grid(), _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble))};
    for (int c = 0; c < CHUNKS; c++) w[c] = VMUL(VSBYTES_TO_F32(byte_group(halves[c * LANES / 16], c)), VSET1(*d));
}

static inline void unpack_q8_f32(const uint8_t* q, const float* d, const float* m, fvec* w) {
    (void)m;
    for (int c = 0; c < CHUNKS; c++) {
        const __m128i* p = (const __m128i*)(q + c * LANES);
        const __m128i group = LANES == 16 ? _mm_loadu_si128(p) : _mm_loadl_epi64(p);  // no byte past the block
        w[c] = VMUL(VSBYTES_TO_F32(group), VSET1(*d));
    }
}

// The low 4 bits of a block's 32 weights from q4's 16 bytes, one weight a byte in weight order (0-15 low 128 bits).
static inline __m256i nibble_bytes(const uint8_t* q) {
    const __m128i bytes = _mm_loadu_si128((const __m128i*)q);
    const __m128i nibble = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), _mm_and_si128(bytes, nibble));
}

// 32 two-bit values from 8 bytes of bit pairs (byte i: values i, i + 8, i + 16, i + 24 in bits 0-1, 2-3, 4-5, 6-7),
// one a byte in order (0-15 in the low 128 bits): each 64-bit lane c of the broadcast bytes shifted by 2c.
static inline __m256i bit_pairs(const uint8_t* q) {
    int64_t packed;
    memcpy(&packed, q, sizeof packed);
    const __m256i pairs = _mm256_srlv_epi64(_mm256_set1_epi64x(packed), _mm256_set_epi64x(6, 4, 2, 0));
    return _mm256_and_si256(pairs, _mm256_set1_epi8(0x03));
}

// A q6 block's 32 weights as signed bytes q - 32 (in weight order; 0-15 in the low 128 bits): nibbles as q4's,
// high bits from the bit pairs after them.
static inline __m256i q6_values(const uint8_t* q) {
    const __m256i high = _mm256_slli_epi16(bit_pairs(q + 16), 4);  // stays in its byte
    return _mm256_sub_epi8(_mm256_or_si256(nibble_bytes(q), high), _mm256_set1_epi8(32));
}

// q2 blocks (Q2_K): 32 two-bit weights as bit pairs, then each half's `d * q + m` from the block's four fp32
// values (the halves' scales, then their mins).
static inline void unpack_q2_f32(const uint8_t* q, const float* d, const float* m, fvec* w) {
    (void)m;
    const __m256i values = bit_pairs(q);
    const __m128i halves[2] = {_mm256_castsi256_si128(values), _mm256_extracti128_si256(values, 1)};
    for (int c = 0; c < CHUNKS; c++) {
        const int h = c * LANES / 16;
        w[c] = VFMA(VBYTES_TO_F32(byte_group(halves[h], c)), VSET1(d[h]), VSET1(d[2 + h]));
    }
}

// A q5 block's 32 weights as bytes (in weight order; 0-15 in the low 128 bits): nibbles as q4's, and 16 where
// the weight's bit in the word is set (each byte j gets byte j / 8 of the word and tests bit j % 8).
static inline __m256i q5_values(const uint8_t* q) {
    const __m256i low = nibble_bytes(q);
    int32_t bits;
    memcpy(&bits, q + 16, sizeof bits);
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits), _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0));
    const __m256i select = _mm256_set1_epi64x((int64_t)0x8040201008040201ULL);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
    return _mm256_or_si256(low, _mm256_and_si256(set, _mm256_set1_epi8(16)));
}

static inline void unpack_q5_f32(const uint8_t* q, const float* d, const float* m, fvec* w) {
    const __m256i values = q5_values(q);
    const __m128i halves[2] = {_mm256_castsi256_si128(values), _mm256_extracti128_si256(values, 1)};
    for (int c = 0; c < CHUNKS; c++)
        w[c] = VFMA(VBYTES_TO_F32(byte_group(halves[c * LANES / 16], c)), VSET1(*d), VSET1(*m));
}

static inline void unpack_q6_f32(const uint8_t* q, const float* d, const float* m, fvec* w) {
    (void)m;
    const __m256i values = q6_values(q);
    const __m128i halves[2] = {_mm256_castsi256_si128(values), _mm256_extracti128_si256(values, 1)};
    for (int c = 0; c < CHUNKS; c++) {
        const int h = c * LANES / 16;
        w[c] = VMUL(VSBYTES_TO_F32(byte_group(halves[h], c)), VSET1(d[h]));
    }
}
#endif

// ---- bf16 weights, on AVX512-BF16: 32 weights of a block in one register

#if defined(__AVX512F__) && defined(__AVX512BF16__)

// 4-bit blocks (Q4_0, Q4_1): weight j in the low nibble of byte j, weight j + 16 in its high nibble. The
// 16 values a block can take are computed once (`d * q + m` for q = 0..15, rounded to bf16) and its 32
// weights looked up by nibble (vpermw): fewer instructions than converting every weight.
static inline __m512i q4_table(const float* d, const float* m) {
    const __m512 q = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 values = _mm512_fmadd_ps(q, _mm512_set1_ps(*d), _mm512_set1_ps(*m));
    return _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(values));
}

// IQ4 blocks: as 4-bit ones, the table `d * grid[q]`.
static inline __m512i iq4_table(const float* d) {
    const __m512 grid = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(iq4_grid()));
    return _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(grid, _mm512_set1_ps(*d))));
}

// Two consecutive blocks of nibbles, looked up in a table each: their 32 bytes widened to 16-bit lanes once, split
// into nibbles, regrouped per block.
static inline void nibble_pair(const uint8_t* q, __m512i table0, __m512i table1, __m512bh* w0, __m512bh* w1) {
    const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)q));
    const __m512i lo = _mm512_and_si512(words, _mm512_set1_epi16(0x0F));
    const __m512i hi = _mm512_srli_epi16(words, 4);
    *w0 = (__m512bh)_mm512_permutexvar_epi16(_mm512_shuffle_i64x2(lo, hi, 0x44), table0);  // lanes lo0 lo1 hi0 hi1
    *w1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_shuffle_i64x2(lo, hi, 0xEE), table1);  // lo2 lo3 hi2 hi3
}

static inline __m512bh nibble_single(const uint8_t* q, __m512i table) {
    const __m256i words = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)q));
    const __m256i lo = _mm256_and_si256(words, _mm256_set1_epi16(0x0F));
    const __m256i hi = _mm256_srli_epi16(words, 4);
    return (__m512bh)_mm512_permutexvar_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), table);
}

static inline void q4_pair(const uint8_t* q, const float* d, const float* m, __m512bh* w0, __m512bh* w1) {
    nibble_pair(q, q4_table(d, m), q4_table(d + 1, m + 1), w0, w1);
}

static inline __m512bh q4_single(const uint8_t* q, const float* d, const float* m) {
    return nibble_single(q, q4_table(d, m));
}

static inline void iq4_pair(const uint8_t* q, const float* d, const float* m, __m512bh* w0, __m512bh* w1) {
    (void)m;
    nibble_pair(q, iq4_table(d), iq4_table(d + 1), w0, w1);
}

static inline __m512bh iq4_single(const uint8_t* q, const float* d, const float* m) {
    (void)m;
    return nibble_single(q, iq4_table(d));
}

// 8-bit blocks (Q8_0): 32 signed bytes times the scale, no min.
static inline __m512bh q8_single(const uint8_t* q, const float* d, const float* m) {
    (void)m;
    const __m512 scale = _mm512_set1_ps(*d);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)q)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 16))));
    return _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, scale), _mm512_mul_ps(lo, scale));
}

static inline void q8_pair(const uint8_t* q, const float* d, const float* m, __m512bh* w0, __m512bh* w1) {
    *w0 = q8_single(q, d, m);
    *w1 = q8_single(q + 32, d + 1, m);
}

// 5-bit blocks (Q5_0, Q5_1, Q5_K): as 4-bit ones, with 32 table entries (`d * q + m` for q = 0..31) and each
// word's fifth bit set from the block's bit word (a masked broadcast of 16).
static inline __m512bh q5_single(const uint8_t* q, const float* d, const float* m) {
    const __m256i words = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)q));
    const __m256i low = _mm256_and_si256(words, _mm256_set1_epi16(0x0F));
    const __m512i nibbles = _mm512_inserti64x4(_mm512_castsi256_si512(low), _mm256_srli_epi16(words, 4), 1);
    uint32_t bits;
    memcpy(&bits, q + 16, sizeof bits);
    const __m512i values = _mm512_or_si512(nibbles, _mm512_maskz_set1_epi16((__mmask32)bits, 16));
    const __m512 step = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 low_values = _mm512_fmadd_ps(step, _mm512_set1_ps(*d), _mm512_set1_ps(*m));
    const __m512 high_values = _mm512_fmadd_ps(_mm512_add_ps(step, _mm512_set1_ps(16)), _mm512_set1_ps(*d),
                                               _mm512_set1_ps(*m));
    const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(high_values, low_values);
    return (__m512bh)_mm512_permutexvar_epi16(values, table);
}

static inline void q5_pair(const uint8_t* q, const float* d, const float* m, __m512bh* w0, __m512bh* w1) {
    *w0 = q5_single(q, d, m);
    *w1 = q5_single(q + 20, d + 1, m + 1);
}

// q6 weights rounded to bf16 as the loader's are (the vector kernels' q6 multiplies by exact ones)
static inline __m512bh q6_rounded(const uint8_t* q, const float* d, const float* m) {
    fvec v[CHUNKS];
    unpack_q6_f32(q, d, m, v);
    return _mm512_cvtne2ps_pbh(v[1], v[0]);
}

static inline __m512bh q2_single(const uint8_t* q, const float* d, const float* m) {
    fvec v[CHUNKS];
    unpack_q2_f32(q, d, m, v);
    return _mm512_cvtne2ps_pbh(v[1], v[0]);
}

static inline void q2_pair(const uint8_t* q, const float* d, const float* m, __m512bh* w0, __m512bh* w1) {
    *w0 = q2_single(q, d, m);
    *w1 = q2_single(q + 8, d + 4, m);
}

#endif
