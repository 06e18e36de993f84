// Linear layers straight from GGUF-quantized weights for steps of many rows (prefill chunks, large batches), on
// CPUs with AMX: the weights are dequantized a tile of features at a time into the layout AMX multiplies by, in
// cache, so a GGUF model needs no dequantized copy of its weights beside the blocks. Same arguments as
// `quantized_linear.c`'s kernels, bf16 activations.

#define _GNU_SOURCE  // syscall(), for AMX's permission
#include "quantized_blocks.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

// Linux lends a process AMX's tile registers only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA).
int amx_enable(void) { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

// Tiles 0-3: fp32 sums [16 rows][16 features], two groups of rows by two of features; 4-5: x [16 rows][32 of K];
// 6-7: weights [16 pairs of K][16 features x 2] (the layout AMX multiplies by: each weight pair in a 32-bit lane).
static void amx_configure(void) {
    tile_config config = {.palette = 1};
    for (int t = 0; t < 8; t++) config.bytes_per_row[t] = 64, config.rows[t] = 16;
    _tile_loadconfig(&config);
}

// 16 rows of 16 32-bit lanes, transposed in registers (rows[i] lane j <- rows[j] lane i)
static inline void transpose_16x16(__m512i* rows) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
    }
    for (int i = 0; i < 16; i += 4)
        for (int k = 0; k < 2; k++) {
            rows[i + 2 * k] = _mm512_unpacklo_epi64(t[i + k], t[i + k + 2]);
            rows[i + 2 * k + 1] = _mm512_unpackhi_epi64(t[i + k], t[i + k + 2]);
        }
    for (int i = 0; i < 16; i += 8)
        for (int k = 0; k < 4; k++) {
            t[i + k] = _mm512_shuffle_i32x4(rows[i + k], rows[i + k + 4], 0x88);
            t[i + k + 4] = _mm512_shuffle_i32x4(rows[i + k], rows[i + k + 4], 0xDD);
        }
    for (int k = 0; k < 8; k++) {
        rows[k] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0x88);
        rows[k + 8] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0xDD);
    }
}

// Features dequantized at a time: each thread's tile of weights stays in its 2 MiB L2 while every group of rows
// passes over it. Qwen3-0.6B's linears (K 1,024-3,072), ms for all 28 layers by tile width 32 / 64 / 128 / 256:
// 16 rows 44.0 / 43.8 / 47.2 / 54.9, 1,024 rows 576 / 539 / 489 / 474: wider tiles pay from about 512 rows on.
static inline int64_t tile_width(int64_t M) { return M >= 512 ? 128 : 64; }

// Tile h (16 features) of block b of the features n0.. as AMX's B tile, at w + (h * nb + b) * 512: each feature's
// 32 weights (16 pairs) dequantized into a register, the 16 registers transposed into the tile's 16 rows of pairs.
#define DEFINE_DEQUANTIZE_TILE(NAME, BYTES, SCALES, DEQUANTIZE)                                            \
    static inline void NAME(const uint8_t* quants, const float* scales, const float* mins, uint16_t* w,    \
                            int64_t n0, int64_t features, int64_t nb, int64_t h, int64_t b) {              \
        __m512i rows[16];                                                                                  \
        for (int64_t f = 0; f < 16; f++) {                                                                 \
            const int64_t block = (n0 + h * 16 + f) * nb + b;                                              \
            rows[f] = h * 16 + f < features ? (__m512i)DEQUANTIZE(quants + block * (BYTES),                \
                                                                  scales + block * (SCALES),               \
                                                                  mins ? mins + block : NULL)              \
                                            : _mm512_setzero_si512();                                      \
        }                                                                                                  \
        transpose_16x16(rows);                                                                             \
        for (int p = 0; p < 16; p++) _mm512_store_si512(w + ((h * nb + b) * 16 + p) * 32, rows[p]);        \
    }

// Sums [16 rows][16 features] as a tile stores them (rows r0.., features n0..), plus bias, rounded into out.
static inline void write_sums(const float (*sums)[16], const uint16_t* bias, uint16_t* out, int64_t r0,
                              int64_t M, int64_t n0, int64_t features, int64_t ldo) {
    const __mmask16 lanes = (__mmask16)((1u << UP_TO(16, features)) - 1);
    const __m512 add =
        bias ? _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(lanes, bias + n0)) : _mm512_setzero_ps();
    for (int64_t j = 0; j < 16 && r0 + j < M; j++) {
        const __m512 v = _mm512_add_ps(_mm512_loadu_ps(sums[j]), add);
        _mm256_mask_storeu_epi16(out + (r0 + j) * ldo + n0, lanes, (__m256i)_mm512_cvtneps_pbh(v));
    }
}

// Two groups of 16 rows (x0, x1; x1 NULL: one) times 32 features (w0, w1: their B tiles, w1 NULL: 16), all of K.
static inline void multiply_tiles(const uint16_t* x0, const uint16_t* x1, const uint16_t* w0, const uint16_t* w1,
                                  int64_t nb, int64_t K, float (*sums)[16][16]) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t b = 0; b < nb; b++) {
        _tile_loadd(4, x0 + b * QBLOCK, K * 2);
        _tile_loadd(6, w0 + b * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (w1) {
            _tile_loadd(7, w1 + b * 512, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (x1) {
            _tile_loadd(5, x1 + b * QBLOCK, K * 2);
            _tile_dpbf16ps(2, 5, 6);
            if (w1) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, sums[0], 64);
    _tile_stored(1, sums[1], 64);
    _tile_stored(2, sums[2], 64);
    _tile_stored(3, sums[3], 64);
}

// The last group of x's rows, padded with zero rows to 16 (a tile always loads 16)
static uint16_t* padded_last_group(const uint16_t* x, int64_t M, int64_t K) {
    const int64_t first = (M - 1) / 16 * 16;
    uint16_t* tail = aligned_alloc(64, 16 * K * sizeof(uint16_t));
    memcpy(tail, x + first * K, (M - first) * K * sizeof(uint16_t));
    memset(tail + (M - first) * K, 0, (16 - (M - first)) * K * sizeof(uint16_t));
    return tail;
}

// Threads take tiles of features: each dequantizes its tile (having asked for the next tile's blocks), then
// multiplies every pair of row groups by it, 32 features at a time. The prefetch is written out here: the same
// requests made by a helper function measured slower (Qwen3-0.6B's layers at 16 rows: 49.5 against 41.1 ms).
#define DEFINE_AMX_LINEAR(NAME, BYTES, SCALES, DEQUANTIZE_TILE)                                            \
    void NAME(const uint8_t* quants, const float* scales, const float* mins, const uint16_t* bias,          \
              const uint16_t* x, uint16_t* out, int64_t M, int64_t N, int64_t K, int64_t ldo) {            \
        const int64_t nb = K / QBLOCK, groups = (M + 15) / 16, width = tile_width(M);                      \
        uint16_t* tail = padded_last_group(x, M, K);                                                       \
        _Pragma("omp parallel")                                                                            \
        {                                                                                                  \
            uint16_t* w = aligned_alloc(64, width * K * sizeof(uint16_t));                                 \
            float sums[4][16][16];                                                                         \
            amx_configure();                                                                               \
            _Pragma("omp for schedule(static)")                                                            \
            for (int64_t n0 = 0; n0 < N; n0 += width) {                                                    \
                const int64_t features = UP_TO(width, N - n0);                                             \
                if (n0 + width < N) { /* the next tile's blocks, while this one's multiply */              \
                    const int64_t next = (n0 + width) * nb, count = UP_TO(width, N - n0 - width) * nb;     \
                    prefetch_span(quants + next * (BYTES), count * (BYTES));                               \
                    prefetch_span(scales + next * (SCALES), count * (SCALES) * sizeof(float));             \
                    if (mins) prefetch_span(mins + next, count * sizeof(float));                           \
                }                                                                                          \
                for (int64_t h = 0; h * 16 < features; h++)                                                \
                    for (int64_t b = 0; b < nb; b++) DEQUANTIZE_TILE(quants, scales, mins, w, n0, features, nb, h, b); \
                for (int64_t g = 0; g < groups; g += 2)                                                    \
                    for (int64_t p0 = 0; p0 < features; p0 += 32) {                                        \
                        const uint16_t* x0 = g == groups - 1 ? tail : x + g * 16 * K;                      \
                        const uint16_t* x1 = g + 1 >= groups       ? NULL                                  \
                                             : g + 1 == groups - 1 ? tail                                  \
                                                                   : x + (g + 1) * 16 * K;                 \
                        const uint16_t* w0 = w + p0 / 16 * nb * 512;                                       \
                        const uint16_t* w1 = features - p0 > 16 ? w0 + nb * 512 : NULL;                    \
                        multiply_tiles(x0, x1, w0, w1, nb, K, sums);                                       \
                        for (int r = 0; r < (x1 ? 2 : 1); r++)                                             \
                            for (int t = 0; t < (w1 ? 2 : 1); t++)                                         \
                                write_sums(sums[r * 2 + t], bias, out, (g + r) * 16, M, n0 + p0 + t * 16,  \
                                           features - p0 - t * 16, ldo);                                   \
                    }                                                                                      \
            }                                                                                              \
            _tile_release();                                                                               \
            free(w);                                                                                       \
        }                                                                                                  \
        free(tail);                                                                                        \
    }

DEFINE_DEQUANTIZE_TILE(dequantize_tile_q4, 16, 1, q4_single)
DEFINE_DEQUANTIZE_TILE(dequantize_tile_q8, 32, 1, q8_single)
DEFINE_DEQUANTIZE_TILE(dequantize_tile_q6, 24, 2, q6_rounded)
DEFINE_DEQUANTIZE_TILE(dequantize_tile_q5, 20, 1, q5_single)
DEFINE_AMX_LINEAR(amx_linear_q4_bf16, 16, 1, dequantize_tile_q4)
DEFINE_AMX_LINEAR(amx_linear_q8_bf16, 32, 1, dequantize_tile_q8)
DEFINE_AMX_LINEAR(amx_linear_q6_bf16, 24, 2, dequantize_tile_q6)
DEFINE_AMX_LINEAR(amx_linear_q5_bf16, 20, 1, dequantize_tile_q5)
#endif
