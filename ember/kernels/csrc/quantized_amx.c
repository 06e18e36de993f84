// Linear layers straight from GGUF-quantized weights for steps of many rows (prefill chunks, large batches), on
// CPUs with AMX: tiles of weights dequantized in cache (`quantized_tiles.h`), multiplied by AMX's tdpbf16ps. Same
// arguments as `quantized_linear.c`'s kernels, bf16 activations.

#define _GNU_SOURCE  // syscall(), for AMX's permission
#include "quantized_tiles.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>

// Linux lends a process AMX's tile registers only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA).
int amx_enable(void) { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

// Up to this many rows of x, a tile's weights are dequantized in rows (`quantized_tiles.h`) and taken as tdpbf16ps's
// first operand, x packed in pairs as its second, the sums transposed on the way out; past it, in pairs with x as
// the first. Transposing each block of weights costs the same at any number of rows, transposing x and the sums
// grows with them. Qwen3-0.6B's 28 layers of Q4 blocks, ms in rows / in pairs: 8 rows 31.2 / 35.0, 64 52.0 / 57.9,
// 256 134.9 / 137.4, and in another run 512 258.5 / 248.7, 1,024 534.8 / 494.7 (its Q6_K LM head at 8 rows: 14.2 /
// 16.1; `benchmarks/NOTES.md` step 37).
#define AMX_ROWS_LAYOUT_ROWS 256

// Tiles 0-3: fp32 sums, tile 4's first operand by tiles 6 and 7 (0, 1), tile 5's by them (2, 3); 4 and 5 have
// rows0 and rows1 rows. In pairs, the first operands are x [rows][32 of K] (the last group, of fewer than 16 rows,
// loads as just those rows: x needs no padded copy) and the second weights [16 pairs of K][16 features x 2]; in rows,
// the first are weights [16 features][32 of K], the second x [16 pairs of K][16 rows x 2].
static void amx_configure(int rows0, int rows1) {
    tile_config config = {.palette = 1};
    for (int t = 0; t < 8; t++) config.bytes_per_row[t] = 64, config.rows[t] = 16;
    config.rows[0] = config.rows[1] = config.rows[4] = (uint8_t)rows0;
    config.rows[2] = config.rows[3] = config.rows[5] = (uint8_t)rows1;
    _tile_loadconfig(&config);
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

// Two first operands (a0, a1; a1 NULL: one) by two second ones (b0, b1; b1 NULL: one) through the nb blocks of K,
// into sums: a0 b0, a0 b1, a1 b0, a1 b1. A block's first operands start `a_step` elements on, their 16 rows
// `a_stride` bytes apart; the second's `b_step` on, in 16 rows of 64 bytes.
static inline void multiply_tiles(const uint16_t* a0, const uint16_t* a1, int64_t a_step, int64_t a_stride,
                                  const uint16_t* b0, const uint16_t* b1, int64_t b_step, int64_t nb,
                                  float (*sums)[16][16]) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t b = 0; b < nb; b++) {
        _tile_loadd(4, a0 + b * a_step, a_stride);
        _tile_loadd(6, b0 + b * b_step, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (b1) {
            _tile_loadd(7, b1 + b * b_step, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (a1) {
            _tile_loadd(5, a1 + b * a_step, a_stride);
            _tile_dpbf16ps(2, 5, 6);
            if (b1) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, sums[0], 64);
    _tile_stored(1, sums[1], 64);
    _tile_stored(2, sums[2], 64);
    _tile_stored(3, sums[3], 64);
}

// Every pair of row groups times the tile (in pairs) of `features` features from n0, 32 features at a time. Tiles
// are configured for whole groups (by the thread, `amx_configure(16, 16)`), and for the last pair's rows while it runs.
static void amx_multiply_pairs(const uint16_t* w, int64_t features, int64_t n0, const uint16_t* x, int64_t M,
                               int64_t K, const uint16_t* bias, uint16_t* out, int64_t ldo) {
    const int64_t nb = K / QBLOCK, groups = (M + 15) / 16;
    float sums[4][16][16];
    for (int64_t g = 0; g < groups; g += 2) {
        const int partial = g + 2 >= groups && M % 16;
        if (partial) amx_configure((int)UP_TO(16, M - g * 16), g + 1 < groups ? (int)(M - g * 16 - 16) : 16);
        for (int64_t p0 = 0; p0 < features; p0 += 32) {
            const uint16_t* x1 = g + 1 < groups ? x + (g + 1) * 16 * K : NULL;
            const uint16_t* w0 = w + p0 / 16 * nb * 512;
            const uint16_t* w1 = features - p0 > 16 ? w0 + nb * 512 : NULL;
            multiply_tiles(x + g * 16 * K, x1, QBLOCK, K * 2, w0, w1, 512, nb, sums);
            for (int r = 0; r < (x1 ? 2 : 1); r++)
                for (int t = 0; t < (w1 ? 2 : 1); t++)
                    write_sums(sums[r * 2 + t], bias, out, (g + r) * 16, M, n0 + p0 + t * 16, features - p0 - t * 16,
                               ldo);
        }
        if (partial) amx_configure(16, 16);
    }
}

// x in pairs, as tdpbf16ps's second operand: per group g of 16 rows (the last padded with zeros), K / 2 rows of
// 16 pairs (k, k + 1), one per row of x, at xp + (g * K / 2 + k / 2) * 16; each 16 x 16 pairs transposed in registers.
static uint32_t* x_in_pairs(const uint16_t* x, int64_t M, int64_t K) {
    const int64_t groups = (M + 15) / 16;
    uint32_t* xp = aligned_buffer(groups * 16 * K * sizeof(uint16_t));
    for (int64_t g = 0; g < groups; g++)
        for (int64_t k2 = 0; k2 < K / 2; k2 += 16) {
            __m512i rows[16];
            for (int64_t r = 0; r < 16; r++)
                rows[r] = g * 16 + r < M ? _mm512_loadu_si512(x + (g * 16 + r) * K + 2 * k2) : _mm512_setzero_si512();
            transpose_16x16(rows);
            for (int j = 0; j < 16; j++) _mm512_store_si512(xp + (g * K / 2 + k2 + j) * 16, rows[j]);
        }
    return xp;
}

// Sums [16 features][16 rows] as a tile stores them (features n0.., rows r0..), transposed, plus bias, rounded
// into out.
static inline void write_sums_transposed(const float (*sums)[16], const uint16_t* bias, uint16_t* out, int64_t r0,
                                         int64_t M, int64_t n0, int64_t features, int64_t ldo) {
    __m512i rows[16];
    for (int f = 0; f < 16; f++) rows[f] = _mm512_loadu_si512(sums[f]);
    transpose_16x16(rows);
    float transposed[16][16] __attribute__((aligned(64)));
    for (int r = 0; r < 16; r++) _mm512_store_si512(transposed[r], rows[r]);
    write_sums(transposed, bias, out, r0, M, n0, features, ldo);
}

// Every pair of row groups (xp: x in pairs) times the tile (in rows) of `features` features from n0, 32 features
// at a time; every tile whole (configured `amx_configure(16, 16)`), x's padding rows not written out.
static void amx_multiply_rows(const uint16_t* w, const uint32_t* xp, int64_t features, int64_t n0, int64_t M,
                              int64_t K, const uint16_t* bias, uint16_t* out, int64_t ldo) {
    const int64_t nb = K / QBLOCK, groups = (M + 15) / 16, stride = ROW_STRIDE(K);
    float sums[4][16][16];
    for (int64_t g = 0; g < groups; g += 2) {
        const uint32_t* x0 = xp + g * K / 2 * 16;
        const uint32_t* x1 = g + 1 < groups ? x0 + K / 2 * 16 : NULL;
        for (int64_t p0 = 0; p0 < features; p0 += 32) {
            const uint16_t* w0 = w + p0 * stride;
            const uint16_t* w1 = features - p0 > 16 ? w0 + 16 * stride : NULL;
            multiply_tiles(w0, w1, QBLOCK, stride * 2, (const uint16_t*)x0, (const uint16_t*)x1, 512, nb, sums);
            for (int r = 0; r < (x1 ? 2 : 1); r++)
                for (int t = 0; t < (w1 ? 2 : 1); t++)
                    write_sums_transposed(sums[t * 2 + r], bias, out, (g + r) * 16, M, n0 + p0 + t * 16,
                                          features - p0 - t * 16, ldo);
        }
    }
}

// Each thread's tiles configured, and in rows its own copy of x in pairs: M * K / 512 transposes of 16 x 16 pairs,
// at most a quarter of the N * K / 512 that the pairs layout spends on the weights where M <= 256 and N >= 1,024.
static void* amx_begin(const uint16_t* x, int64_t M, int64_t K, int rows) {
    amx_configure(16, 16);
    return rows ? x_in_pairs(x, M, K) : NULL;
}

static void amx_multiply_tile(const uint16_t* w, void* prepared, int64_t features, int64_t n0, const uint16_t* x,
                              int64_t M, int64_t K, const uint16_t* bias, uint16_t* out, int64_t ldo) {
    if (prepared)
        amx_multiply_rows(w, prepared, features, n0, M, K, bias, out, ldo);
    else
        amx_multiply_pairs(w, features, n0, x, M, K, bias, out, ldo);
}

static void amx_end(void* prepared) {
    _tile_release();
    free(prepared);
}

#define AMX_LINEAR(NAME, BYTES, SCALES, DEQUANTIZE_TILE)                                                   \
    DEFINE_TILED_LINEAR(NAME, BYTES, SCALES, DEQUANTIZE_TILE, M <= AMX_ROWS_LAYOUT_ROWS, amx_begin,        \
                        amx_multiply_tile, amx_end)

AMX_LINEAR(amx_linear_q4_bf16, 16, 1, dequantize_tile_q4)
AMX_LINEAR(amx_linear_q8_bf16, 32, 1, dequantize_tile_q8)
AMX_LINEAR(amx_linear_q6_bf16, 24, 2, dequantize_tile_q6)
AMX_LINEAR(amx_linear_q5_bf16, 20, 1, dequantize_tile_q5)
AMX_LINEAR(amx_linear_iq4_bf16, 16, 1, dequantize_tile_iq4)
AMX_LINEAR(amx_linear_q2_bf16, 8, 4, dequantize_tile_q2)
#endif
