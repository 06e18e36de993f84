// Tiles of dequantized weights for the kernels of many rows (`quantized_amx.c`, `quantized_dpbf16.c`): each thread
// dequantizes a tile of output features into a buffer that stays in its L2 while every row passes over it, so a
// GGUF model needs no dequantized copy of its weights beside the blocks.
//
// A tile is laid out in one of two ways:
// - pairs, as both AMX's tdpbf16ps and AVX512-BF16's vdpbf16ps multiply weights given as their second operand: per
//   group h of 16 features and block b of 32 weights, 16 rows of weight pairs (k, k + 1) x 16 features, at
//   w + (h * nb + b) * 512; so group h's pairs run through all of K from w + h * nb * 512, 32 bf16 (64 bytes) per
//   pair of K. Each block's 16 registers of features are transposed into it;
// - rows (AMX with few rows of x, `quantized_amx.c`): feature f's weights in order from w + f * ROW_STRIDE(K), as
//   tdpbf16ps takes its first operand; no transposition.
#pragma once

#include "quantized_blocks.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <stdio.h>
#include <stdlib.h>

// A kernel cannot report an error to its caller; failing loudly beats writing through NULL.
static inline void* aligned_buffer(size_t bytes) {
    void* p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (p == NULL) {
        fprintf(stderr, "ember: out of memory for a %zu-byte kernel buffer\n", bytes);
        abort();
    }
    return p;
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

// Features dequantized at a time. Qwen3-0.6B's linears (K 1,024-3,072) on AMX, ms for all 28 layers by tile width
// 32 / 64 / 128 / 256: 16 rows 44.0 / 43.8 / 47.2 / 54.9, 1,024 rows 576 / 539 / 489 / 474: wider tiles pay from
// about 512 rows on.
static inline int64_t tile_width(int64_t M) { return M >= 512 ? 128 : 64; }

// The rows layout's row length in bf16: K and one cache line, so a tile's 16 rows (K * 2 bytes apart: a multiple
// of 2 KiB for most models) do not share a few sets of L1. Qwen3-0.6B's Q4 layers at 1,024 rows: 552 ms unpadded,
// 535 padded.
#define ROW_STRIDE(K) ((K) + 32)

// Group h (16 features) of block b of the features n0.. into the tile w, in pairs or rows (`rows`): each feature's
// 32 weights dequantized into a register, stored as a row or the 16 registers transposed into the group's 16 rows
// of pairs. Features past `features` are zeros.
#define DEFINE_DEQUANTIZE_TILE(NAME, BYTES, SCALES, DEQUANTIZE)                                            \
    static inline void NAME(const uint8_t* quants, const float* scales, const float* mins, uint16_t* w,    \
                            int64_t n0, int64_t features, int64_t nb, int64_t h, int64_t b, int rows) {    \
        __m512i v[16];                                                                                     \
        for (int64_t f = 0; f < 16; f++) {                                                                 \
            const int64_t block = (n0 + h * 16 + f) * nb + b;                                              \
            v[f] = h * 16 + f < features ? (__m512i)DEQUANTIZE(quants + block * (BYTES),                   \
                                                               scales + block * (SCALES),                  \
                                                               mins ? mins + block : NULL)                 \
                                         : _mm512_setzero_si512();                                         \
        }                                                                                                  \
        if (rows) {                                                                                        \
            for (int64_t f = 0; f < 16; f++)                                                               \
                _mm512_store_si512(w + (h * 16 + f) * ROW_STRIDE(nb * QBLOCK) + b * QBLOCK, v[f]);         \
            return;                                                                                        \
        }                                                                                                  \
        transpose_16x16(v);                                                                                \
        for (int p = 0; p < 16; p++) _mm512_store_si512(w + ((h * nb + b) * 16 + p) * 32, v[p]);           \
    }

DEFINE_DEQUANTIZE_TILE(dequantize_tile_q4, 16, 1, q4_single)
DEFINE_DEQUANTIZE_TILE(dequantize_tile_q8, 32, 1, q8_single)
DEFINE_DEQUANTIZE_TILE(dequantize_tile_q6, 24, 2, q6_rounded)
DEFINE_DEQUANTIZE_TILE(dequantize_tile_q5, 20, 1, q5_single)
DEFINE_DEQUANTIZE_TILE(dequantize_tile_iq4, 16, 1, iq4_single)
DEFINE_DEQUANTIZE_TILE(dequantize_tile_q2, 8, 4, q2_single)

// Slice `part` (of `slice` bytes) of the span of `bytes` from p, asked for ahead of use. Consecutive slices leave no
// 64-byte line of the span unasked.
static inline void prefetch_slice(const void* p, int64_t bytes, int64_t slice, int64_t part) {
    prefetch_span((const char*)p + part * slice, UP_TO(slice, bytes - part * slice));
}

// A linear of `quantized_linear.c`'s arguments: threads take tiles of features; each dequantizes its tile into w
// in groups of 16, up to a whole pair of groups (the multiplies take 32 features at a time; the padding is zeros),
// in rows where ROWS (an expression of M and K) says so, else in pairs, then multiplies every row of x by it
// (MULTIPLY_TILE(w, prepared, features, n0, x, M, K, bias, out, ldo)). Each thread first calls
// `prepared = BEGIN(x, M, K, rows)` and last `END(prepared)` (the multiply's own setup). Each of the tile's
// dequantization steps (a group's block) first asks for its share of the next tile's blocks, so memory works while
// the dequantization computes: asking for the whole next tile at once, before dequantizing this one, left them to
// wait on each other (Qwen3-0.6B's 28 layers of Q4 blocks at 8 rows on AMX: 44.1 ms that way, 32.3 this way).
#define DEFINE_TILED_LINEAR(NAME, BYTES, SCALES, DEQUANTIZE_TILE, ROWS, BEGIN, MULTIPLY_TILE, END)            \
    void NAME(const uint8_t* quants, const float* scales, const float* mins, const uint16_t* bias,          \
              const uint16_t* x, uint16_t* out, int64_t M, int64_t N, int64_t K, int64_t ldo) {            \
        const int64_t nb = K / QBLOCK, width = tile_width(M);                                              \
        const int rows = (ROWS);                                                                           \
        _Pragma("omp parallel")                                                                            \
        {                                                                                                  \
            uint16_t* w = aligned_buffer(width * ROW_STRIDE(K) * sizeof(uint16_t));                        \
            void* prepared = BEGIN(x, M, K, rows);                                                         \
            _Pragma("omp for schedule(static)")                                                            \
            for (int64_t n0 = 0; n0 < N; n0 += width) {                                                    \
                const int64_t features = UP_TO(width, N - n0);                                             \
                const int64_t next = (n0 + width) * nb, groups = (features + 31) / 32 * 2;                 \
                const int64_t count = n0 + width < N ? UP_TO(width, N - n0 - width) * nb : 0;             \
                const int64_t quant_bytes = count * (BYTES), scale_bytes = count * (SCALES) * sizeof(float); \
                const int64_t parts = groups * nb, quant_slice = (quant_bytes + parts - 1) / parts;        \
                const int64_t scale_slice = (scale_bytes + parts - 1) / parts;                             \
                const int64_t min_slice = (count * (int64_t)sizeof(float) + parts - 1) / parts;           \
                for (int64_t h = 0; h < groups; h++)                                                       \
                    for (int64_t b = 0; b < nb; b++) {                                                     \
                        const int64_t part = h * nb + b;                                                   \
                        prefetch_slice(quants + next * (BYTES), quant_bytes, quant_slice, part);           \
                        prefetch_slice(scales + next * (SCALES), scale_bytes, scale_slice, part);          \
                        if (mins) prefetch_slice(mins + next, count * sizeof(float), min_slice, part);     \
                        DEQUANTIZE_TILE(quants, scales, mins, w, n0, features, nb, h, b, rows);            \
                    }                                                                                      \
                MULTIPLY_TILE(w, prepared, features, n0, x, M, K, bias, out, ldo);                         \
            }                                                                                              \
            END(prepared);                                                                                 \
            free(w);                                                                                       \
        }                                                                                                  \
    }

#endif
