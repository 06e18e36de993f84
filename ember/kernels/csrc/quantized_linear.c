// Linear layers straight from GGUF-quantized weights, for the few rows of a decode step: fp32 activations on
// x86 with AVX-512 or AVX2, bf16 activations on AVX512-BF16.
//
// A decode step of a small batch reads every weight once and does little with it: its time is the
// weights' bytes over memory bandwidth. A Q4 weight is 5/8 of a byte against 2 for bf16, so reading the
// blocks and dequantizing in registers beats a bf16 matmul about 3x in bytes. Each block of 32 weights is
// dequantized exactly as the loader does it (fp32 `d * q + m`, and for bf16 rounded), so the weights the
// dot products see are bit for bit those of the model; only the summation order differs, as it does
// between oneDNN's kernels for different row counts.
//
// Weights are stored split, per output feature n and block b: quants [N][K/32][BYTES], scales [N][K/32]
// and mins [N][K/32] as fp32 (mins NULL: none). x is [M, K], out [M, N], bias [N] or NULL, all of the
// activations' type.

#include "common.h"

#define QBLOCK 32
#define AS_FLOAT_F32(v) (v)
#define AS_FLOAT_BF16(v) bf16_to_float(v)
#define UP_TO(GROUP, c) ((c) < (GROUP) ? (c) : (GROUP))

// The entry point of a kernel: output features split across threads; rows taken in groups of up to GROUP,
// each group size a FEATURE loop compiled for it (its accumulators then stay in registers).
#define DEFINE_QUANTIZED_LINEAR(NAME, T, AS_FLOAT, GROUP, BYTES, FEATURE)                                  \
    void NAME(const uint8_t* quants, const float* scales, const float* mins, const T* bias, const T* x,    \
              T* out, int64_t M, int64_t N, int64_t K) {                                                   \
        const int64_t nb = K / QBLOCK;                                                                     \
        _Pragma("omp parallel for schedule(static)")                                                      \
        for (int64_t n = 0; n < N; n++) {                                                                  \
            const uint8_t* q = quants + n * nb * (BYTES);                                                  \
            const float* d = scales + n * nb;                                                              \
            const float* m = mins ? mins + n * nb : NULL;                                                  \
            const float b = bias ? AS_FLOAT(bias[n]) : 0.0f;                                               \
            for (int64_t r0 = 0; r0 < M; r0 += GROUP) {                                                    \
                const T* xr = x + r0 * K;                                                                  \
                T* o = out + r0 * N + n;                                                                   \
                switch (M - r0 < GROUP ? M - r0 : GROUP) {                                                 \
                    case 1: FEATURE(q, d, m, b, xr, o, nb, K, N, 1); break;                                \
                    case 2: FEATURE(q, d, m, b, xr, o, nb, K, N, UP_TO(GROUP, 2)); break;                  \
                    case 3: FEATURE(q, d, m, b, xr, o, nb, K, N, UP_TO(GROUP, 3)); break;                  \
                    case 4: FEATURE(q, d, m, b, xr, o, nb, K, N, UP_TO(GROUP, 4)); break;                  \
                    case 5: FEATURE(q, d, m, b, xr, o, nb, K, N, UP_TO(GROUP, 5)); break;                  \
                    case 6: FEATURE(q, d, m, b, xr, o, nb, K, N, UP_TO(GROUP, 6)); break;                  \
                    case 7: FEATURE(q, d, m, b, xr, o, nb, K, N, UP_TO(GROUP, 7)); break;                  \
                    default: FEATURE(q, d, m, b, xr, o, nb, K, N, GROUP); break;                           \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
    }

// ---- fp32 activations, on x86 with AVX-512 (16 lanes) or AVX2 and FMA (8 lanes): each block unpacked into 32
// exact fp32 weights, then one FMA per vector and row. Other CPUs (no such kernel built) keep oneDNN. GCC's
// generic vector types were tried first: it lowered their byte-to-float conversions to scalar code, which
// under AVX2 made the kernel 6x slower than no kernel at all.

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>

#ifdef __AVX512F__
#define LANES 16
#define F32_GROUP_ROWS 8  // rows whose two accumulators stay in registers: 16 of AVX-512's 32
typedef __m512 fvec;
#define VLOAD _mm512_loadu_ps
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
static inline void unpack_q4_f32(const uint8_t* q, float d, float m, fvec* w) {
    const __m128i bytes = _mm_loadu_si128((const __m128i*)q);
    const __m128i nibble = _mm_set1_epi8(0x0F);
    const __m128i halves[2] = {_mm_and_si128(bytes, nibble), _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble)};
    for (int c = 0; c < CHUNKS; c++) {
        const __m128i group = byte_group(halves[c * LANES / 16], c);
        w[c] = VFMA(VBYTES_TO_F32(group), VSET1(d), VSET1(m));
    }
}

static inline void unpack_q8_f32(const uint8_t* q, float d, float m, fvec* w) {
    (void)m;
    for (int c = 0; c < CHUNKS; c++) {
        const __m128i* p = (const __m128i*)(q + c * LANES);
        const __m128i group = LANES == 16 ? _mm_loadu_si128(p) : _mm_loadl_epi64(p);  // no byte past the block
        w[c] = VMUL(VSBYTES_TO_F32(group), VSET1(d));
    }
}

#define DEFINE_FEATURE_F32(NAME, BYTES, UNPACK)                                                            \
    static inline __attribute__((always_inline)) void NAME(                                                \
        const uint8_t* q, const float* d, const float* m, float bias, const float* x, float* out,          \
        int64_t nb, int64_t K, int64_t N, const int rows) {                                                \
        fvec acc[F32_GROUP_ROWS][2];                                                                       \
        for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = VZERO();                                    \
        for (int64_t b = 0; b < nb; b++) {                                                                 \
            fvec w[CHUNKS];                                                                                \
            UNPACK(q + b * (BYTES), d[b], m ? m[b] : 0.0f, w);                                             \
            for (int c = 0; c < CHUNKS; c++)                                                               \
                for (int r = 0; r < rows; r++)                                                             \
                    acc[r][c % 2] = VFMA(w[c], VLOAD(x + r * K + b * QBLOCK + c * LANES), acc[r][c % 2]);  \
        }                                                                                                  \
        for (int r = 0; r < rows; r++) out[r * N] = vsum(VADD(acc[r][0], acc[r][1])) + bias;              \
    }

DEFINE_FEATURE_F32(q4_feature_f32, 16, unpack_q4_f32)
DEFINE_FEATURE_F32(q8_feature_f32, 32, unpack_q8_f32)
DEFINE_QUANTIZED_LINEAR(quantized_linear_q4_f32, float, AS_FLOAT_F32, F32_GROUP_ROWS, 16, q4_feature_f32)
DEFINE_QUANTIZED_LINEAR(quantized_linear_q8_f32, float, AS_FLOAT_F32, F32_GROUP_ROWS, 32, q8_feature_f32)
#endif

// ---- bf16 activations on AVX512-BF16

#if defined(__AVX512F__) && defined(__AVX512BF16__)

#define GROUP_ROWS 8  // rows whose accumulators stay in registers while a block is dequantized once

// 4-bit blocks (Q4_0, Q4_1): weight j in the low nibble of byte j, weight j + 16 in its high nibble. The
// 16 values a block can take are computed once (`d * q + m` for q = 0..15, rounded to bf16) and its 32
// weights looked up by nibble (vpermw): fewer instructions than converting every weight.
static inline __m512i q4_table(const float* d, const float* m) {
    const __m512 q = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 values = _mm512_fmadd_ps(q, _mm512_set1_ps(*d), _mm512_set1_ps(*m));
    return _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(values));
}

static inline __m512bh q4_lookup(__m512i nibbles, const float* d, const float* m) {
    return (__m512bh)_mm512_permutexvar_epi16(nibbles, q4_table(d, m));
}

// Two consecutive blocks: their 32 bytes widened to 16-bit lanes once, split into nibbles, regrouped per block.
static inline void q4_pair(const uint8_t* q, const float* d, const float* m, __m512bh* w0, __m512bh* w1) {
    const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)q));
    const __m512i lo = _mm512_and_si512(words, _mm512_set1_epi16(0x0F));
    const __m512i hi = _mm512_srli_epi16(words, 4);
    *w0 = q4_lookup(_mm512_shuffle_i64x2(lo, hi, 0x44), d, m);          // 128-bit lanes lo0 lo1 hi0 hi1
    *w1 = q4_lookup(_mm512_shuffle_i64x2(lo, hi, 0xEE), d + 1, m + 1);  // lo2 lo3 hi2 hi3
}

static inline __m512bh q4_single(const uint8_t* q, const float* d, const float* m) {
    const __m256i words = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)q));
    const __m256i lo = _mm256_and_si256(words, _mm256_set1_epi16(0x0F));
    const __m256i hi = _mm256_srli_epi16(words, 4);
    return q4_lookup(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), d, m);
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

// One output feature for `rows` (a compile-time constant after inlining) rows of x: the accumulators
// live in registers (two per row, so consecutive blocks do not wait on each other), and each block is
// dequantized once for all rows.
#define DEFINE_FEATURE(NAME, BYTES, PAIR, SINGLE)                                                          \
    static inline __attribute__((always_inline)) void NAME(                                                \
        const uint8_t* q, const float* d, const float* m, float bias, const uint16_t* x, uint16_t* out,    \
        int64_t nb, int64_t K, int64_t N, const int rows) {                                                \
        __m512 acc0[GROUP_ROWS], acc1[GROUP_ROWS];                                                         \
        for (int r = 0; r < rows; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();                           \
        int64_t b = 0;                                                                                     \
        for (; b + 1 < nb; b += 2) {                                                                       \
            __m512bh w0, w1;                                                                               \
            PAIR(q + b * (BYTES), d + b, m ? m + b : NULL, &w0, &w1);                                      \
            for (int r = 0; r < rows; r++) {                                                               \
                const uint16_t* xb = x + r * K + b * QBLOCK;                                               \
                acc0[r] = _mm512_dpbf16_ps(acc0[r], w0, (__m512bh)_mm512_loadu_si512(xb));                 \
                acc1[r] = _mm512_dpbf16_ps(acc1[r], w1, (__m512bh)_mm512_loadu_si512(xb + QBLOCK));        \
            }                                                                                              \
        }                                                                                                  \
        if (b < nb) {                                                                                      \
            const __m512bh w = SINGLE(q + b * (BYTES), d + b, m ? m + b : NULL);                           \
            for (int r = 0; r < rows; r++)                                                                 \
                acc0[r] = _mm512_dpbf16_ps(acc0[r], w, (__m512bh)_mm512_loadu_si512(x + r * K + b * QBLOCK)); \
        }                                                                                                  \
        for (int r = 0; r < rows; r++)                                                                     \
            out[r * N] = float_to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r])) + bias);     \
    }

DEFINE_FEATURE(q4_feature_bf16, 16, q4_pair, q4_single)
DEFINE_FEATURE(q8_feature_bf16, 32, q8_pair, q8_single)
DEFINE_QUANTIZED_LINEAR(quantized_linear_q4_bf16, uint16_t, AS_FLOAT_BF16, GROUP_ROWS, 16, q4_feature_bf16)
DEFINE_QUANTIZED_LINEAR(quantized_linear_q8_bf16, uint16_t, AS_FLOAT_BF16, GROUP_ROWS, 32, q8_feature_bf16)

#endif
