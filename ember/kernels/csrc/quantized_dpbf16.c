// Linear layers straight from GGUF-quantized weights for steps of many rows (prefill chunks, large batches), on
// CPUs with AVX512-BF16 but no AMX (AMD Zen 4 and 5, Intel Cooper Lake): tiles of weights dequantized in cache
// (`quantized_tiles.h`), multiplied by vdpbf16ps, up to ROWS rows by 32 features in registers. Same arguments as
// `quantized_linear.c`'s kernels, bf16 activations.

#include "quantized_tiles.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)

#define ROWS 12  // rows per pass: 24 accumulators and 2 weight registers of AVX-512's 32

// Rows x[0..R) times 32 features of the tile (w0: the first group's pairs through all of K, the second's follow
// nb * 512 later), plus bias, rounded into out. R is a constant where inlined, so the sums stay in registers.
static inline __attribute__((always_inline)) void multiply_rows(const int R, const uint16_t* x, int64_t K,
                                                                const uint16_t* w0, int64_t nb,
                                                                const uint16_t* bias, uint16_t* out, int64_t ldo,
                                                                int64_t features) {
    const uint16_t* w1 = w0 + nb * 512;
    __m512 sums[ROWS][2];
    for (int r = 0; r < R; r++) sums[r][0] = sums[r][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 2) {
        const __m512bh a = (__m512bh)_mm512_load_si512(w0 + k * 16), b = (__m512bh)_mm512_load_si512(w1 + k * 16);
        for (int r = 0; r < R; r++) {
            int32_t pair;  // x's weights k and k + 1 of row r, against each feature's pair
            memcpy(&pair, x + r * K + k, sizeof pair);
            const __m512bh v = (__m512bh)_mm512_set1_epi32(pair);
            sums[r][0] = _mm512_dpbf16_ps(sums[r][0], v, a);
            sums[r][1] = _mm512_dpbf16_ps(sums[r][1], v, b);
        }
    }
    for (int t = 0; t < 2 && t * 16 < features; t++) {
        const __mmask16 lanes = (__mmask16)((1u << UP_TO(16, features - t * 16)) - 1);
        const __m512 add = bias ? _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(lanes, bias + t * 16))
                                : _mm512_setzero_ps();
        for (int r = 0; r < R; r++)
            _mm256_mask_storeu_epi16(out + r * ldo + t * 16, lanes,
                                     (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(sums[r][t], add)));
    }
}

#define ROWS_CASE(R)                                                                                 \
    case R:                                                                                          \
        multiply_rows(R, x + r0 * K, K, w0, nb, bias ? bias + n : NULL, out + r0 * ldo + n, ldo, left); \
        break;

// Every row times the tile (in pairs) of `features` features from n0, in passes of up to ROWS rows.
static void dpbf16_multiply_tile(const uint16_t* w, void* prepared, int64_t features, int64_t n0, const uint16_t* x,
                                 int64_t M, int64_t K, const uint16_t* bias, uint16_t* out, int64_t ldo) {
    (void)prepared;
    const int64_t nb = K / QBLOCK;
    for (int64_t r0 = 0; r0 < M; r0 += ROWS)
        for (int64_t p0 = 0; p0 < features; p0 += 32) {
            const uint16_t* w0 = w + p0 / 16 * nb * 512;
            const int64_t n = n0 + p0, left = features - p0;
            switch (UP_TO(ROWS, M - r0)) {
                ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5) ROWS_CASE(6)
                ROWS_CASE(7) ROWS_CASE(8) ROWS_CASE(9) ROWS_CASE(10) ROWS_CASE(11) ROWS_CASE(12)
            }
        }
}

// Nothing to prepare per thread: x is read as it is.
static inline void* dpbf16_begin(const uint16_t* x, int64_t M, int64_t K, int rows) {
    (void)x, (void)M, (void)K, (void)rows;
    return NULL;
}

static inline void dpbf16_end(void* prepared) { (void)prepared; }

#define DPBF16_LINEAR(NAME, BYTES, SCALES, DEQUANTIZE_TILE) \
    DEFINE_TILED_LINEAR(NAME, BYTES, SCALES, DEQUANTIZE_TILE, 0, dpbf16_begin, dpbf16_multiply_tile, dpbf16_end)

DPBF16_LINEAR(dpbf16_linear_q4_bf16, 16, 1, dequantize_tile_q4)
DPBF16_LINEAR(dpbf16_linear_q8_bf16, 32, 1, dequantize_tile_q8)
DPBF16_LINEAR(dpbf16_linear_q6_bf16, 24, 2, dequantize_tile_q6)
DPBF16_LINEAR(dpbf16_linear_q5_bf16, 20, 1, dequantize_tile_q5)
DPBF16_LINEAR(dpbf16_linear_iq4_bf16, 16, 1, dequantize_tile_iq4)
DPBF16_LINEAR(dpbf16_linear_q2_bf16, 8, 4, dequantize_tile_q2)
#endif
