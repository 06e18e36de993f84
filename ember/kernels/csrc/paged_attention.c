// Paged decode attention for the CPU: one query token per sequence, read straight from the block table.
//
// Decode attention is bound by memory traffic: every step reads each sequence's whole K/V context.
// Gathering blocks into a contiguous tensor first (what plain PyTorch must do) reads the context,
// writes a copy and reads the copy again; this kernel reads each K/V row exactly once per KV head, for
// all query heads of its GQA group. Parallel over (sequence, KV head) with OpenMP.
//
// Layouts, with P = 4 / sizeof(element) elements packed per 32-bit word (1 for float32, 2 for bfloat16):
//   q, out, k_new, v_new [D, H or KVH, d]; block_tables [D, MAXB] (int64); context_lens [D] (int64);
//   k_cache [KVH, NB, d/P, BS, P]: each block transposed, so the scores of 16 consecutive tokens
//     accumulate in one vector register with no horizontal sums; for bf16 the two dims of a word are
//     what one AVX512-BF16 dot-product instruction consumes;
//   v_cache [KVH, NB, BS/P, d, P]: token pairs interleaved per dim, for the same instruction in P.V.
// The generic kernel is plain C (auto-vectorized, fp32 math); with AVX512-BF16 the bf16 kernel uses
// vdpbf16ps (bf16 products, fp32 sums; probabilities rounded to bf16 for P.V, as GPU flash attention
// does). Each call also stores the decode tokens' own new K/V (at position context_len - 1) first, so the
// cache lines of a sequence's last block are fetched once, by the kernel that reads them anyway.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#define TILE 16  // tokens whose scores are accumulated together

// Blocks sit at unrelated addresses, which defeats the hardware prefetcher: ask for the next one early.
static inline void prefetch_block(const void* start, size_t bytes) {
    for (size_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch((const char*)start + offset, 0, 3);
}

static void softmax_inplace(float* s, int64_t n) {
    float m = -INFINITY, sum = 0.0f;
    for (int64_t t = 0; t < n; t++) m = s[t] > m ? s[t] : m;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; t++) {
        s[t] = exp_nonpositive(s[t] - m);
        sum += s[t];
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t t = 0; t < n; t++) s[t] *= inv;
}


static inline int64_t key_index(int64_t i, int64_t j, int64_t BS, int64_t P) {  // dim i, token j of a block
    return ((i / P) * BS + j) * P + i % P;
}

static inline int64_t value_index(int64_t j, int64_t i, int64_t d, int64_t P) {  // token j, dim i of a block
    return ((j / P) * d + i) * P + j % P;
}

// Store one token's key and value rows (d elements) at `offset` of their blocks.
#define DEFINE_STORE_TOKEN(NAME, T)                                                                        \
    static void NAME(const T* ks, const T* vs, T* kb, T* vb, int64_t offset, int64_t BS, int64_t d) {      \
        const int64_t P = 4 / (int64_t)sizeof(T);                                                          \
        for (int64_t i = 0; i < d; i++) {                                                                 \
            kb[key_index(i, offset, BS, P)] = ks[i];                                                      \
            vb[value_index(offset, i, d, P)] = vs[i];                                                     \
        }                                                                                                  \
    }

DEFINE_STORE_TOKEN(store_token_32, uint32_t)
DEFINE_STORE_TOKEN(store_token_16, uint16_t)

static void store_token(const char* ks, const char* vs, char* kb, char* vb, int64_t offset, int64_t BS, int64_t d,
                        int64_t elem) {
    if (elem == 4)
        store_token_32((const uint32_t*)ks, (const uint32_t*)vs, (uint32_t*)kb, (uint32_t*)vb, offset, BS, d);
    else
        store_token_16((const uint16_t*)ks, (const uint16_t*)vs, (uint16_t*)kb, (uint16_t*)vb, offset, BS, d);
}

// Scatter a step's new keys and values ([T, KVH, d]) into their slots (2- or 4-byte elements).
void write_kv(const char* k, const char* v, char* k_cache, char* v_cache, const int64_t* slots, int64_t T,
              int64_t KVH, int64_t NB, int64_t BS, int64_t d, int64_t elem) {
#pragma omp parallel for collapse(2) if (T * KVH > 1024)
    for (int64_t t = 0; t < T; t++) {
        for (int64_t h = 0; h < KVH; h++) {
            const int64_t block = (h * NB + slots[t] / BS) * d * BS * elem;
            const int64_t row = (t * KVH + h) * d * elem;
            store_token(k + row, v + row, k_cache + block, v_cache + block, slots[t] % BS, BS, d, elem);
        }
    }
}

// The decode token's own K/V go to position L - 1 of its sequence.
static void store_decode_token(const char* k_new, const char* v_new, char* k_cache, char* v_cache,
                               const int64_t* table, int64_t b, int64_t kh, int64_t L, int64_t KVH, int64_t NB,
                               int64_t BS, int64_t d, int64_t elem) {
    if (k_new == NULL) return;
    const int64_t block = (kh * NB + table[(L - 1) / BS]) * d * BS * elem;
    const int64_t row = (b * KVH + kh) * d * elem;
    store_token(k_new + row, v_new + row, k_cache + block, v_cache + block, (L - 1) % BS, BS, d, elem);
}

#define DEFINE_PAGED_DECODE(NAME, T, LOAD, STORE)                                                          \
    /* scores[t] = q . k_t for the L tokens of one (sequence, KV head, query head) */                      \
    static void NAME##_scores(const float* qf, const T* k_cache, const int64_t* table, int64_t kh,        \
                              int64_t NB, int64_t BS, int64_t d, int64_t L, float* scores) {              \
        const int64_t P = 4 / (int64_t)sizeof(T);                                                          \
        for (int64_t t0 = 0; t0 < L; t0 += BS) {                                                          \
            const T* kb = k_cache + ((kh * NB + table[t0 / BS]) * d) * BS;                                \
            const int64_t n = L - t0 < BS ? L - t0 : BS;                                                  \
            if (t0 + BS < L) prefetch_block(k_cache + ((kh * NB + table[t0 / BS + 1]) * d) * BS,           \
                                            (size_t)(d * BS) * sizeof(T));                                \
            for (int64_t j0 = 0; j0 < n; j0 += TILE) {                                                    \
                float s[TILE] = {0};                                                                      \
                const int64_t width = BS - j0 < TILE ? BS - j0 : TILE;                                    \
                if (width == TILE) { /* full tiles: no per-lane guard, so the loop is pure FMAs */      \
                    for (int64_t i = 0; i < d; i++) {                                                     \
                        const T* kp = kb + key_index(i, j0, BS, P);                                      \
                        const float qv = qf[i];                                                           \
                        _Pragma("omp simd")                                                               \
                        for (int64_t j = 0; j < TILE; j++) s[j] += qv * LOAD(kp[j * P]);                  \
                    }                                                                                      \
                } else {                                                                                   \
                    for (int64_t i = 0; i < d; i++) {                                                     \
                        const T* kp = kb + key_index(i, j0, BS, P);                                      \
                        const float qv = qf[i];                                                           \
                        _Pragma("omp simd")                                                               \
                        for (int64_t j = 0; j < TILE; j++)                                                \
                            s[j] += qv * (j < width ? LOAD(kp[j * P]) : 0.0f);                            \
                    }                                                                                      \
                }                                                                                          \
                const int64_t keep = n - j0 < TILE ? n - j0 : TILE;                                       \
                memcpy(scores + t0 + j0, s, sizeof(float) * (size_t)keep);                                \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
                                                                                                           \
    static void NAME##_head(const T* q, const T* k_cache, const T* v_cache, const int64_t* table, int64_t L, \
                            T* out, int64_t G, int64_t kh, int64_t NB, int64_t BS, int64_t d, float scale) {  \
        const int64_t P = 4 / (int64_t)sizeof(T);                                                          \
        float* qf = malloc(sizeof(float) * (size_t)(G * d));                                              \
        float* acc = calloc((size_t)(G * d), sizeof(float));                                              \
        float* scores = malloc(sizeof(float) * (size_t)(G * L));                                          \
        for (int64_t g = 0; g < G; g++) {                                                                 \
            for (int64_t i = 0; i < d; i++) qf[g * d + i] = LOAD(q[g * d + i]) * scale;                   \
            NAME##_scores(qf + g * d, k_cache, table, kh, NB, BS, d, L, scores + g * L);                  \
            softmax_inplace(scores + g * L, L);                                                           \
        }                                                                                                  \
        for (int64_t t0 = 0; t0 < L; t0 += BS) {                                                          \
            const int64_t n = L - t0 < BS ? L - t0 : BS;                                                  \
            const T* vb = v_cache + ((kh * NB + table[t0 / BS]) * BS) * d;                                \
            if (t0 + BS < L) prefetch_block(v_cache + ((kh * NB + table[t0 / BS + 1]) * BS) * d,           \
                                            (size_t)(d * BS) * sizeof(T));                                \
            for (int64_t g = 0; g < G; g++) {                                                             \
                const float* p = scores + g * L + t0;                                                     \
                for (int64_t i0 = 0; i0 < d; i0 += TILE) {                                                \
                    float a[TILE] = {0};                                                                  \
                    const int64_t width = d - i0 < TILE ? d - i0 : TILE;                                  \
                    for (int64_t j = 0; j < n; j++) {                                                     \
                        const T* vp = vb + value_index(j, i0, d, P);                                      \
                        const float pj = p[j];                                                            \
                        if (width == TILE) {                                                              \
                            _Pragma("omp simd")                                                           \
                            for (int64_t i = 0; i < TILE; i++) a[i] += pj * LOAD(vp[i * P]);              \
                        } else {                                                                          \
                            _Pragma("omp simd")                                                           \
                            for (int64_t i = 0; i < TILE; i++)                                            \
                                a[i] += pj * (i < width ? LOAD(vp[i * P]) : 0.0f);                        \
                        }                                                                                 \
                    }                                                                                      \
                    for (int64_t i = 0; i < width; i++) acc[g * d + i0 + i] += a[i];                     \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        for (int64_t i = 0; i < G * d; i++) out[i] = STORE(acc[i]);                                       \
        free(qf);                                                                                          \
        free(acc);                                                                                         \
        free(scores);                                                                                      \
    }

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)

DEFINE_PAGED_DECODE(generic_f32, float, LOAD_F32, STORE_F32)
DEFINE_PAGED_DECODE(generic_bf16, uint16_t, bf16_to_float, float_to_bf16)

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#define AVX_TILE 16  // fp32 lanes of a zmm register

// bf16 attention of one (sequence, KV head) with vdpbf16ps: needs BS % 16 == 0 and d % 64 == 0.
static void avx512bf16_head(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
                            const int64_t* table, int64_t L, uint16_t* out, int64_t G, int64_t kh, int64_t NB,
                            int64_t BS, int64_t d, float scale) {
    const int64_t Lp = (L + 1) & ~(int64_t)1;  // probabilities come in token pairs
    const int64_t stride = (L + 15) & ~(int64_t)15;  // scores are stored in whole 16-token tiles
    float* scores = aligned_alloc(64, sizeof(float) * (size_t)(G * stride));
    uint32_t* pairs = malloc(sizeof(uint32_t) * (size_t)(G * (Lp / 2)));
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t t0 = 0; t0 < L; t0 += BS) {
        const uint16_t* kb = k_cache + ((kh * NB + table[t0 / BS]) * d) * BS;
        if (t0 + BS < L) {  // the next block's keys now, and its values for the P.V pass (they stay in L2)
            prefetch_block(k_cache + ((kh * NB + table[t0 / BS + 1]) * d) * BS, (size_t)(d * BS) * 2);
            prefetch_block(v_cache + ((kh * NB + table[t0 / BS + 1]) * BS) * d, (size_t)(d * BS) * 2);
        }
        const int64_t n = L - t0 < BS ? L - t0 : BS;
        for (int64_t j0 = 0; j0 < n; j0 += AVX_TILE) {
            for (int64_t g = 0; g < G; g++) {
                const uint32_t* qp = (const uint32_t*)(q + g * d);
                __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
                for (int64_t p = 0; p < d / 2; p += 2) {  // dims 2p, 2p+1 of 16 tokens per load
                    const uint16_t* k0 = kb + (p * BS + j0) * 2;
                    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(k0), (__m512bh)_mm512_set1_epi32(qp[p]));
                    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(k0 + BS * 2),
                                          (__m512bh)_mm512_set1_epi32(qp[p + 1]));
                }
                _mm512_store_ps(scores + g * stride + t0 + j0, _mm512_mul_ps(_mm512_add_ps(a0, a1), vscale));
            }
        }
    }
    for (int64_t g = 0; g < G; g++) {
        float* s = scores + g * stride;
        softmax_inplace(s, L);
        uint32_t* pp = pairs + g * (Lp / 2);
        for (int64_t j = 0; j < Lp / 2; j++) {
            const uint32_t lo = float_to_bf16(s[2 * j]);
            const uint32_t hi = 2 * j + 1 < L ? float_to_bf16(s[2 * j + 1]) : 0u;
            pp[j] = lo | (hi << 16);
        }
    }
    for (int64_t g = 0; g < G; g++) {
        const uint32_t* pp = pairs + g * (Lp / 2);
        for (int64_t i0 = 0; i0 < d; i0 += 4 * AVX_TILE) {
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
            for (int64_t t0 = 0; t0 < L; t0 += BS) {
                const uint16_t* vb = v_cache + ((kh * NB + table[t0 / BS]) * BS) * d;
                const int64_t npairs = ((L - t0 < BS ? L - t0 : BS) + 1) / 2;
                for (int64_t jp = 0; jp < npairs; jp++) {  // tokens 2jp, 2jp+1: their values per dim interleaved
                    const uint16_t* vp = vb + (jp * d + i0) * 2;
                    const __m512bh pv = (__m512bh)_mm512_set1_epi32(pp[t0 / 2 + jp]);
                    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(vp), pv);
                    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(vp + 32), pv);
                    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(vp + 64), pv);
                    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(vp + 96), pv);
                }
            }
            float acc[4 * AVX_TILE];
            _mm512_storeu_ps(acc, a0);
            _mm512_storeu_ps(acc + 16, a1);
            _mm512_storeu_ps(acc + 32, a2);
            _mm512_storeu_ps(acc + 48, a3);
            for (int64_t i = 0; i < 4 * AVX_TILE; i++) out[g * d + i0 + i] = float_to_bf16(acc[i]);
        }
    }
    free(scores);
    free(pairs);
}
#endif

// Entry points: D query rows, each attending to the first context_lens[b] tokens of its sequence. Row b
// reads the block table row_tables[b] (or b when row_tables is NULL): the rows of a prefill chunk or of a
// speculating request share their sequence's table. k_new/v_new may be NULL (the new tokens were already
// stored); they must be, when rows of one sequence read each other's new K/V.
#define DEFINE_ENTRY(NAME, T, HEAD, FAST_HEAD)                                                            \
    void NAME(const T* q, const T* k_new, const T* v_new, T* k_cache, T* v_cache, const int64_t* block_tables, \
              const int64_t* row_tables, const int64_t* context_lens, T* out, int64_t D, int64_t H,        \
              int64_t KVH, int64_t NB, int64_t BS, int64_t d, int64_t MAXB, float scale) {                \
        const int64_t G = H / KVH;                                                                         \
        _Pragma("omp parallel for collapse(2) schedule(dynamic)")                                         \
        for (int64_t b = 0; b < D; b++) {                                                                 \
            for (int64_t kh = 0; kh < KVH; kh++) {                                                        \
                const int64_t L = context_lens[b];                                                        \
                const int64_t* table = block_tables + (row_tables ? row_tables[b] : b) * MAXB;            \
                store_decode_token((const char*)k_new, (const char*)v_new, (char*)k_cache, (char*)v_cache, \
                                   table, b, kh, L, KVH, NB, BS, d, (int64_t)sizeof(T));                  \
                const T* qh = q + (b * H + kh * G) * d;                                                   \
                T* oh = out + (b * H + kh * G) * d;                                                       \
                FAST_HEAD                                                                                 \
                HEAD(qh, k_cache, v_cache, table, L, oh, G, kh, NB, BS, d, scale);                        \
            }                                                                                              \
        }                                                                                                  \
    }

DEFINE_ENTRY(paged_decode_f32, float, generic_f32_head, )
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define BF16_FAST_PATH                                                                                    \
    if (BS % 16 == 0 && d % 64 == 0) {                                                                    \
        avx512bf16_head(qh, k_cache, v_cache, table, L, oh, G, kh, NB, BS, d, scale);                     \
        continue;                                                                                         \
    }
#else
#define BF16_FAST_PATH
#endif
DEFINE_ENTRY(paged_decode_bf16, uint16_t, generic_bf16_head, BF16_FAST_PATH)

// 1 when the bf16 kernel has its AVX512-BF16 path (it then beats PyTorch's SDPA on prefill chunks too).
int has_avx512bf16(void) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}
