// Linear layers straight from GGUF-quantized weights, for the few rows of a decode step: fp32 activations on
// x86 with AVX-512 or AVX2, bf16 activations on AVX512-BF16.
//
// A decode step of a small batch reads every weight once and does little with it: its time is the
// weights' bytes over memory bandwidth. A Q4 weight is 5/8 of a byte against 2 for bf16, so reading the
// blocks and dequantizing in registers beats a bf16 matmul about 3x in bytes. Each block of 32 weights is
// dequantized exactly as the loader does it (fp32 `d * q + m`, and for bf16 rounded), so the weights the
// dot products see are bit for bit those of the model; only the summation order differs, as it does
// between oneDNN's kernels for different row counts. (One exception: q6 on bf16 multiplies by the exact fp32
// weights, not their bf16 roundings; see there.)
//
// x is [M, K]; out [M, ldo], of which columns 0..N-1 are written (so that the parts of a fused projection in
// different formats fill one output); bias [N] or NULL; all of the activations' type. The weights' formats are
// `quantized_blocks.h`'s.

#include "quantized_blocks.h"

#define AS_FLOAT_F32(v) (v)
#define AS_FLOAT_BF16(v) bf16_to_float(v)

// Each thread walks its features' blocks in order, yet from memory they arrived at about a third of the
// bandwidth a plain sum reads (10 of 31 GB/s, Qwen3-0.6B's Q4_0 linears at one row): the hardware prefetchers
// stop at page boundaries and see little of the stream between the kernel's arithmetic. Asking for a feature's
// blocks PREFETCH_FEATURES features ahead doubled it (4 measured best of 1, 2, 4 and 8).
#define PREFETCH_FEATURES 4

// The entry point of a kernel: output features split across threads; rows taken in groups of up to GROUP,
// each group size a FEATURE loop compiled for it (its accumulators then stay in registers).
#define DEFINE_QUANTIZED_LINEAR(NAME, T, AS_FLOAT, GROUP, BYTES, SCALES, FEATURE)                          \
    void NAME(const uint8_t* quants, const float* scales, const float* mins, const T* bias, const T* x,    \
              T* out, int64_t M, int64_t N, int64_t K, int64_t ldo) {                                      \
        const int64_t nb = K / QBLOCK;                                                                     \
        _Pragma("omp parallel for schedule(static)")                                                       \
        for (int64_t n = 0; n < N; n++) {                                                                  \
            const uint8_t* q = quants + n * nb * (BYTES);                                                  \
            const float* d = scales + n * nb * (SCALES);                                                   \
            const float* m = mins ? mins + n * nb : NULL;                                                  \
            const float b = bias ? AS_FLOAT(bias[n]) : 0.0f;                                               \
            if (n + PREFETCH_FEATURES < N) {                                                               \
                prefetch_span(q + PREFETCH_FEATURES * nb * (BYTES), nb * (BYTES));                         \
                prefetch_span(d + PREFETCH_FEATURES * nb * (SCALES), nb * (SCALES) * sizeof(float));       \
                if (m) prefetch_span(m + PREFETCH_FEATURES * nb, nb * sizeof(float));                      \
            }                                                                                              \
            for (int64_t r0 = 0; r0 < M; r0 += GROUP) {                                                    \
                const T* xr = x + r0 * K;                                                                  \
                T* o = out + r0 * ldo + n;                                                                 \
                switch (M - r0 < GROUP ? M - r0 : GROUP) {                                                 \
                    case 1: FEATURE(q, d, m, b, xr, o, nb, K, ldo, 1); break;                              \
                    case 2: FEATURE(q, d, m, b, xr, o, nb, K, ldo, UP_TO(GROUP, 2)); break;                \
                    case 3: FEATURE(q, d, m, b, xr, o, nb, K, ldo, UP_TO(GROUP, 3)); break;                \
                    case 4: FEATURE(q, d, m, b, xr, o, nb, K, ldo, UP_TO(GROUP, 4)); break;                \
                    case 5: FEATURE(q, d, m, b, xr, o, nb, K, ldo, UP_TO(GROUP, 5)); break;                \
                    case 6: FEATURE(q, d, m, b, xr, o, nb, K, ldo, UP_TO(GROUP, 6)); break;                \
                    case 7: FEATURE(q, d, m, b, xr, o, nb, K, ldo, UP_TO(GROUP, 7)); break;                \
                    default: FEATURE(q, d, m, b, xr, o, nb, K, ldo, GROUP); break;                         \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
    }

// ---- fp32 activations: one FMA per vector of unpacked weights and row. Other CPUs (no such kernel built) keep
// oneDNN.

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))

#define DEFINE_FEATURE_F32(NAME, BYTES, SCALES, UNPACK)                                                    \
    static inline __attribute__((always_inline)) void NAME(                                                \
        const uint8_t* q, const float* d, const float* m, float bias, const float* x, float* out,          \
        int64_t nb, int64_t K, int64_t N, const int rows) {                                                \
        fvec acc[F32_GROUP_ROWS][2];                                                                       \
        for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = VZERO();                                    \
        for (int64_t b = 0; b < nb; b++) {                                                                 \
            fvec w[CHUNKS];                                                                                \
            UNPACK(q + b * (BYTES), d + b * (SCALES), m ? m + b : NULL, w);                                \
            for (int c = 0; c < CHUNKS; c++)                                                               \
                for (int r = 0; r < rows; r++)                                                             \
                    acc[r][c % 2] = VFMA(w[c], VLOAD(x + r * K + b * QBLOCK + c * LANES), acc[r][c % 2]);  \
        }                                                                                                  \
        for (int r = 0; r < rows; r++) out[r * N] = vsum(VADD(acc[r][0], acc[r][1])) + bias;               \
    }

DEFINE_FEATURE_F32(q4_feature_f32, 16, 1, unpack_q4_f32)
DEFINE_FEATURE_F32(q8_feature_f32, 32, 1, unpack_q8_f32)
DEFINE_FEATURE_F32(q6_feature_f32, 24, 2, unpack_q6_f32)
DEFINE_FEATURE_F32(q5_feature_f32, 20, 1, unpack_q5_f32)
DEFINE_FEATURE_F32(iq4_feature_f32, 16, 1, unpack_iq4_f32)
DEFINE_FEATURE_F32(q2_feature_f32, 8, 4, unpack_q2_f32)
DEFINE_QUANTIZED_LINEAR(quantized_linear_q4_f32, float, AS_FLOAT_F32, F32_GROUP_ROWS, 16, 1, q4_feature_f32)
DEFINE_QUANTIZED_LINEAR(quantized_linear_q8_f32, float, AS_FLOAT_F32, F32_GROUP_ROWS, 32, 1, q8_feature_f32)
DEFINE_QUANTIZED_LINEAR(quantized_linear_q6_f32, float, AS_FLOAT_F32, F32_GROUP_ROWS, 24, 2, q6_feature_f32)
DEFINE_QUANTIZED_LINEAR(quantized_linear_q5_f32, float, AS_FLOAT_F32, F32_GROUP_ROWS, 20, 1, q5_feature_f32)
DEFINE_QUANTIZED_LINEAR(quantized_linear_iq4_f32, float, AS_FLOAT_F32, F32_GROUP_ROWS, 16, 1, iq4_feature_f32)
DEFINE_QUANTIZED_LINEAR(quantized_linear_q2_f32, float, AS_FLOAT_F32, F32_GROUP_ROWS, 8, 4, q2_feature_f32)

// Dense fp32 weights out [N][K] from the blocks (`quantized.dequantize`: a GPU's or a kept copy's weights, at
// load): the same unpacking, so the same bits as gguf-py's; Qwen3-0.6B's blocks in 0.2 s against 0.4-1.4 in PyTorch.
#define DEFINE_DEQUANTIZE(NAME, BYTES, SCALES, UNPACK)                                                     \
    void NAME(const uint8_t* quants, const float* scales, const float* mins, float* out, int64_t N,        \
              int64_t K) {                                                                                 \
        const int64_t blocks = N * (K / QBLOCK);                                                           \
        _Pragma("omp parallel for schedule(static)")                                                       \
        for (int64_t b = 0; b < blocks; b++) {                                                             \
            fvec w[CHUNKS];                                                                                \
            UNPACK(quants + b * (BYTES), scales + b * (SCALES), mins ? mins + b : NULL, w);                \
            for (int c = 0; c < CHUNKS; c++) VSTORE(out + b * QBLOCK + c * LANES, w[c]);                   \
        }                                                                                                  \
    }

DEFINE_DEQUANTIZE(dequantize_q4_f32, 16, 1, unpack_q4_f32)
DEFINE_DEQUANTIZE(dequantize_q8_f32, 32, 1, unpack_q8_f32)
DEFINE_DEQUANTIZE(dequantize_q6_f32, 24, 2, unpack_q6_f32)
DEFINE_DEQUANTIZE(dequantize_q5_f32, 20, 1, unpack_q5_f32)
DEFINE_DEQUANTIZE(dequantize_iq4_f32, 16, 1, unpack_iq4_f32)
DEFINE_DEQUANTIZE(dequantize_q2_f32, 8, 4, unpack_q2_f32)
#endif

// ---- bf16 activations on AVX512-BF16

#if defined(__AVX512F__) && defined(__AVX512BF16__)

// vpshufb indices: in each 128-bit lane, words 0-3 (4-7) take bytes 0-3 (4-7) as their upper byte, zero lower
#define UPPER_BYTES_0_3 0x0380028001800080LL
#define UPPER_BYTES_4_7 0x0780068005800480LL
#define WORDS_OF(v) ((int64_t)(v) * 0x0001000100010001LL)  // four 16-bit lanes of v

#define GROUP_ROWS 8  // rows whose accumulators stay in registers while a block is dequantized once

// q6 blocks: a block's 32 weights as the exact bf16 integers q - 32 (q in 16-bit lanes, looked up in a
// 64-entry table), its products with each row summed in fp32 (vdpbf16ps pairs weights 2i and 2i + 1, so lanes
// 0-7 hold the first 16 weights' sums), then scaled per 16 weights: the exact fp32 weights `d * (q - 32)`
// times x. The weights are not rounded to bf16 first, as the other formats' are (converting each weight to
// float, scaling and rounding it took three times as long): sums differ from oneDNN's on the bf16 weights
// (prefill, steps past MAX_ROWS rows) by that rounding (at most 2^-9 of each weight), not only by their order.
static inline __m512i q6_words(const uint8_t* q) {
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)q));
    const __m256i low = _mm256_and_si256(bytes, _mm256_set1_epi16(0x0F));
    const __m512i nibbles = _mm512_inserti64x4(_mm512_castsi256_si512(low), _mm256_srli_epi16(bytes, 4), 1);
    int64_t packed;
    memcpy(&packed, q + 16, sizeof packed);
    // word j (in 128-bit lane j / 8) takes high byte j % 8 as its upper byte, then shifts right by 4 + 2 (j / 8)
    // so that weight j's pair lands in bits 4-5
    const __m512i upper = _mm512_set_epi64(UPPER_BYTES_4_7, UPPER_BYTES_0_3, UPPER_BYTES_4_7, UPPER_BYTES_0_3,
                                           UPPER_BYTES_4_7, UPPER_BYTES_0_3, UPPER_BYTES_4_7, UPPER_BYTES_0_3);
    const __m512i shifts = _mm512_set_epi64(WORDS_OF(10), WORDS_OF(10), WORDS_OF(8), WORDS_OF(8), WORDS_OF(6),
                                            WORDS_OF(6), WORDS_OF(4), WORDS_OF(4));
    const __m512i words = _mm512_shuffle_epi8(_mm512_set1_epi64(packed), upper);
    return _mm512_or_si512(nibbles, _mm512_and_si512(_mm512_srlv_epi16(words, shifts), _mm512_set1_epi16(0x30)));
}

// bf16 of q - 32 for q = 0..31 (low) and 32..63 (high), the table q6_words' values index
static inline void q6_tables(__m512i* low, __m512i* high) {
    const __m512 step = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 from[4] = {_mm512_sub_ps(step, _mm512_set1_ps(32)), _mm512_sub_ps(step, _mm512_set1_ps(16)), step,
                            _mm512_add_ps(step, _mm512_set1_ps(16))};
    *low = (__m512i)_mm512_cvtne2ps_pbh(from[1], from[0]);
    *high = (__m512i)_mm512_cvtne2ps_pbh(from[3], from[2]);
}

// Block b's two scales spread over the 16 lanes of its dot products: lanes 0-7 the first 16 weights'.
static inline __m512 q6_lane_scales(const float* d) {
    const __m512i spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double*)d))));
}

static inline __attribute__((always_inline)) void q6_feature_bf16(const uint8_t* q, const float* d, const float* m,
                                                                  float bias, const uint16_t* x, uint16_t* out,
                                                                  int64_t nb, int64_t K, int64_t N, const int rows) {
    (void)m;
    __m512i table_low, table_high;
    q6_tables(&table_low, &table_high);
    __m512 acc0[GROUP_ROWS], acc1[GROUP_ROWS];
    for (int r = 0; r < rows; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b += 2) {  // whole Q6_K super-blocks of 8 blocks: always pairs
        const __m512bh w0 = (__m512bh)_mm512_permutex2var_epi16(table_low, q6_words(q + b * 24), table_high);
        const __m512bh w1 = (__m512bh)_mm512_permutex2var_epi16(table_low, q6_words(q + b * 24 + 24), table_high);
        const __m512 scales0 = q6_lane_scales(d + 2 * b), scales1 = q6_lane_scales(d + 2 * b + 2);
        for (int r = 0; r < rows; r++) {
            const uint16_t* xb = x + r * K + b * QBLOCK;
            const __m512 sums0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), w0, (__m512bh)_mm512_loadu_si512(xb));
            const __m512 sums1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), w1, (__m512bh)_mm512_loadu_si512(xb + QBLOCK));
            acc0[r] = _mm512_fmadd_ps(sums0, scales0, acc0[r]);
            acc1[r] = _mm512_fmadd_ps(sums1, scales1, acc1[r]);
        }
    }
    for (int r = 0; r < rows; r++)
        out[r * N] = float_to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r])) + bias);
}

// One output feature for `rows` (a compile-time constant after inlining) rows of x: the accumulators
// live in registers (two per row, so consecutive blocks do not wait on each other), and each block is
// dequantized once for all rows.
#define DEFINE_FEATURE(NAME, BYTES, SCALES, PAIR, SINGLE)                                                          \
    static inline __attribute__((always_inline)) void NAME(                                                \
        const uint8_t* q, const float* d, const float* m, float bias, const uint16_t* x, uint16_t* out,    \
        int64_t nb, int64_t K, int64_t N, const int rows) {                                                \
        __m512 acc0[GROUP_ROWS], acc1[GROUP_ROWS];                                                         \
        for (int r = 0; r < rows; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();                            \
        int64_t b = 0;                                                                                     \
        for (; b + 1 < nb; b += 2) {                                                                       \
            __m512bh w0, w1;                                                                               \
            PAIR(q + b * (BYTES), d + b * (SCALES), m ? m + b : NULL, &w0, &w1);                                      \
            for (int r = 0; r < rows; r++) {                                                               \
                const uint16_t* xb = x + r * K + b * QBLOCK;                                               \
                acc0[r] = _mm512_dpbf16_ps(acc0[r], w0, (__m512bh)_mm512_loadu_si512(xb));                 \
                acc1[r] = _mm512_dpbf16_ps(acc1[r], w1, (__m512bh)_mm512_loadu_si512(xb + QBLOCK));        \
            }                                                                                              \
        }                                                                                                  \
        if (b < nb) {                                                                                      \
            const __m512bh w = SINGLE(q + b * (BYTES), d + b * (SCALES), m ? m + b : NULL);                           \
            for (int r = 0; r < rows; r++)                                                                 \
                acc0[r] = _mm512_dpbf16_ps(acc0[r], w, (__m512bh)_mm512_loadu_si512(x + r * K + b * QBLOCK)); \
        }                                                                                                  \
        for (int r = 0; r < rows; r++)                                                                     \
            out[r * N] = float_to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r])) + bias);      \
    }

DEFINE_FEATURE(q4_feature_bf16, 16, 1, q4_pair, q4_single)
DEFINE_FEATURE(q8_feature_bf16, 32, 1, q8_pair, q8_single)
DEFINE_FEATURE(q5_feature_bf16, 20, 1, q5_pair, q5_single)
DEFINE_FEATURE(iq4_feature_bf16, 16, 1, iq4_pair, iq4_single)
DEFINE_FEATURE(q2_feature_bf16, 8, 4, q2_pair, q2_single)
DEFINE_QUANTIZED_LINEAR(quantized_linear_q4_bf16, uint16_t, AS_FLOAT_BF16, GROUP_ROWS, 16, 1, q4_feature_bf16)
DEFINE_QUANTIZED_LINEAR(quantized_linear_q8_bf16, uint16_t, AS_FLOAT_BF16, GROUP_ROWS, 32, 1, q8_feature_bf16)
DEFINE_QUANTIZED_LINEAR(quantized_linear_q6_bf16, uint16_t, AS_FLOAT_BF16, GROUP_ROWS, 24, 2, q6_feature_bf16)
DEFINE_QUANTIZED_LINEAR(quantized_linear_q5_bf16, uint16_t, AS_FLOAT_BF16, GROUP_ROWS, 20, 1, q5_feature_bf16)
DEFINE_QUANTIZED_LINEAR(quantized_linear_iq4_bf16, uint16_t, AS_FLOAT_BF16, GROUP_ROWS, 16, 1, iq4_feature_bf16)
DEFINE_QUANTIZED_LINEAR(quantized_linear_q2_bf16, uint16_t, AS_FLOAT_BF16, GROUP_ROWS, 8, 4, q2_feature_bf16)

#endif
