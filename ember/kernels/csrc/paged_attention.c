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
// does) and runs the rows of a prefill chunk in tiles that share every K/V load (`avx512bf16_tiled`). Every
// kernel cuts long contexts into parts for the threads when a call has too few rows to keep them busy
// (`DEFINE_SPLIT`).
// Each call also stores the decode tokens' own new K/V (at position context_len - 1) first, so the cache
// lines of a sequence's last block are fetched once, by the kernel that reads them anyway.

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#define TILE 16  // tokens whose scores are accumulated together

// Blocks sit at unrelated addresses, which defeats the hardware prefetcher: ask for the next one early.
static inline void prefetch_block(const void* start, size_t bytes) {
    for (size_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch((const char*)start + offset, 0, 3);
}

// Softmax in place; its max and sum of exponentials go to max_sum (unless NULL), for merging parts.
static void softmax_inplace(float* s, int64_t n, float* max_sum) {
    float m = -INFINITY, sum = 0.0f;
    for (int64_t t = 0; t < n; t++) m = s[t] > m ? s[t] : m;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; t++) {
        s[t] = exp_nonpositive(s[t] - m);
        sum += s[t];
    }
    if (max_sum != NULL) {
        max_sum[0] = m;
        max_sum[1] = sum;
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

// A sliding window: a query at position L - 1 sees the keys of positions (L - 1 - window, L - 1], so its first
// visible token is L - window (window 0: the whole context). Ranges start at that token's block; the tokens of
// that block before it are masked.
static inline int64_t first_visible(int64_t L, int64_t window) { return window > 0 && L > window ? L - window : 0; }

// scores[0, n) of a range's first block fall before the window (a score of -inf weighs exp(-87) ~ 1e-38, nil)
static inline void mask_before(float* scores, int64_t n, int64_t L) {
    for (int64_t t = 0; t < n && t < L; t++) scores[t] = -INFINITY;
}

// Gemma 2's attention logit soft-capping, applied to scaled scores: s -> cap * tanh(s / cap) (cap 0: none).
static inline void soft_cap(float* scores, int64_t n, float cap) {
    if (cap <= 0.0f) return;
    for (int64_t t = 0; t < n; t++) scores[t] = cap * tanhf(scores[t] / cap);
}

#define DEFINE_PAGED_DECODE(NAME, T, LOAD, STORE)                                                          \
    /* scores[t - begin] = q . k_t for tokens [begin, L) of one (sequence, KV head, query head) */         \
    static void NAME##_scores(const float* qf, const T* k_cache, const int64_t* table, int64_t kh,        \
                              int64_t NB, int64_t BS, int64_t d, int64_t begin, int64_t L, float* scores) { \
        const int64_t P = 4 / (int64_t)sizeof(T);                                                          \
        for (int64_t t0 = begin; t0 < L; t0 += BS) {                                                      \
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
                memcpy(scores + (t0 - begin) + j0, s, sizeof(float) * (size_t)keep);                      \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
                                                                                                           \
    /* tokens [begin, end) (begin a multiple of BS), those before `from` masked: outputs (fp32 [G, d]) and  \
       softmax stats ([G, 2]) */                                                                           \
    static void NAME##_range(const T* q, const T* k_cache, const T* v_cache, const int64_t* table,         \
                             int64_t begin, int64_t end, int64_t from, float* acc, float* max_sum, int64_t G, \
                             int64_t kh, int64_t NB, int64_t BS, int64_t d, float scale, float softcap) { \
        const int64_t P = 4 / (int64_t)sizeof(T);                                                          \
        const int64_t L = end - begin;                                                                     \
        float* qf = malloc(sizeof(float) * (size_t)(G * d));                                              \
        float* scores = malloc(sizeof(float) * (size_t)(G * L));                                          \
        for (int64_t i = 0; i < G * d; i++) acc[i] = 0.0f;                                                \
        for (int64_t g = 0; g < G; g++) {                                                                 \
            for (int64_t i = 0; i < d; i++) qf[g * d + i] = LOAD(q[g * d + i]) * scale;                   \
            NAME##_scores(qf + g * d, k_cache, table, kh, NB, BS, d, begin, end, scores + g * L);         \
            soft_cap(scores + g * L, L, softcap);                                                         \
            mask_before(scores + g * L, from - begin, L);                                                 \
            softmax_inplace(scores + g * L, L, max_sum ? max_sum + 2 * g : NULL);                         \
        }                                                                                                  \
        for (int64_t t0 = begin; t0 < end; t0 += BS) {                                                    \
            const int64_t n = end - t0 < BS ? end - t0 : BS;                                              \
            const T* vb = v_cache + ((kh * NB + table[t0 / BS]) * BS) * d;                                \
            if (t0 + BS < end) prefetch_block(v_cache + ((kh * NB + table[t0 / BS + 1]) * BS) * d,         \
                                              (size_t)(d * BS) * sizeof(T));                              \
            for (int64_t g = 0; g < G; g++) {                                                             \
                const float* p = scores + g * L + (t0 - begin);                                           \
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
        free(qf);                                                                                          \
        free(scores);                                                                                      \
    }                                                                                                      \
                                                                                                           \
    static void NAME##_head(const T* q, const T* k_cache, const T* v_cache, const int64_t* table, int64_t L, \
                            int64_t window, T* out, int64_t G, int64_t kh, int64_t NB, int64_t BS, int64_t d, \
                            float scale, float softcap) {                                                  \
        float* acc = malloc(sizeof(float) * (size_t)(G * d));                                             \
        const int64_t from = first_visible(L, window);                                                    \
        NAME##_range(q, k_cache, v_cache, table, from / BS * BS, L, from, acc, NULL, G, kh, NB, BS, d, scale, \
                     softcap);                                                                             \
        for (int64_t i = 0; i < G * d; i++) out[i] = STORE(acc[i]);                                       \
        free(acc);                                                                                         \
    }

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)

DEFINE_PAGED_DECODE(generic_f32, float, LOAD_F32, STORE_F32)
DEFINE_PAGED_DECODE(generic_bf16, uint16_t, bf16_to_float, float_to_bf16)

// Few long contexts (flash-decoding on the CPU): when a call has fewer (row, KV head) pairs than twice the
// threads, as a single long conversation does (SmolLM2's 3 KV heads on 2 cores kept one core idle a third of
// the time), each context is cut into parts of whole blocks that threads share, then merged by their softmax
// statistics. NAME returns 0 when the call has enough pairs, or contexts too short to be worth cutting.
#define MIN_PART_TOKENS 512

#define DEFINE_SPLIT(NAME, T, RANGE, STORE)                                                                \
    static int NAME(const T* q, const T* k_new, const T* v_new, T* k_cache, T* v_cache,                   \
                    const int64_t* block_tables, const int64_t* row_tables, const int64_t* context_lens, T* out, \
                    int64_t D, int64_t H, int64_t KVH, int64_t NB, int64_t BS, int64_t d, int64_t MAXB,    \
                    float scale, int64_t window, float softcap) {                                          \
        const int64_t threads = omp_get_max_threads();                                                    \
        if (D == 0 || D * KVH >= 2 * threads) return 0; /* enough pairs (or none): no split */            \
        int64_t longest = 0;                                                                               \
        for (int64_t b = 0; b < D; b++) {                                                                 \
            const int64_t L = context_lens[b], seen = L - first_visible(L, window) / BS * BS;             \
            longest = seen > longest ? seen : longest;                                                    \
        }                                                                                                  \
        const int64_t wanted = (2 * threads + D * KVH - 1) / (D * KVH); /* parts to fill the threads */   \
        const int64_t parts = wanted < longest / MIN_PART_TOKENS ? wanted : longest / MIN_PART_TOKENS;    \
        if (parts < 2) return 0;                                                                          \
        const int64_t G = H / KVH;                                                                         \
        if (k_new != NULL) { /* each row's own new K/V first: some part reads its last block */           \
            for (int64_t b = 0; b < D; b++)                                                                \
                for (int64_t kh = 0; kh < KVH; kh++)                                                       \
                    store_decode_token((const char*)k_new, (const char*)v_new, (char*)k_cache, (char*)v_cache, \
                                       block_tables + (row_tables ? row_tables[b] : b) * MAXB, b, kh,      \
                                       context_lens[b], KVH, NB, BS, d, (int64_t)sizeof(T));              \
        }                                                                                                  \
        float* part_out = malloc(sizeof(float) * (size_t)(D * KVH * parts * G * d));                      \
        float* part_stats = malloc(sizeof(float) * (size_t)(D * KVH * parts * G * 2));                    \
        _Pragma("omp parallel for collapse(3) schedule(dynamic)")                                         \
        for (int64_t b = 0; b < D; b++) {                                                                 \
            for (int64_t kh = 0; kh < KVH; kh++) {                                                        \
                for (int64_t s = 0; s < parts; s++) {                                                     \
                    const int64_t L = context_lens[b], from = first_visible(L, window);                   \
                    const int64_t first = from / BS * BS;                                                 \
                    const int64_t span = ((L - first + parts - 1) / parts + BS - 1) / BS * BS; /* blocks */ \
                    const int64_t begin = first + s * span, end = begin + span < L ? begin + span : L;    \
                    const int64_t slot = (b * KVH + kh) * parts + s;                                      \
                    if (begin >= end) { /* a short context has fewer parts: this one weighs nothing */    \
                        for (int64_t g = 0; g < G; g++) part_stats[(slot * G + g) * 2 + 1] = 0.0f;        \
                        continue;                                                                         \
                    }                                                                                      \
                    RANGE(q + (b * H + kh * G) * d, k_cache, v_cache,                                     \
                          block_tables + (row_tables ? row_tables[b] : b) * MAXB, begin, end, from,       \
                          part_out + slot * G * d, part_stats + slot * G * 2, G, kh, NB, BS, d, scale,    \
                          softcap);                                                                       \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        float* acc = malloc(sizeof(float) * (size_t)d);                                                   \
        for (int64_t b = 0; b < D; b++) {                                                                 \
            for (int64_t kh = 0; kh < KVH; kh++) {                                                        \
                for (int64_t g = 0; g < G; g++) {                                                         \
                    const int64_t first = (b * KVH + kh) * parts;                                         \
                    float m = -INFINITY, total = 0.0f;                                                    \
                    for (int64_t s = 0; s < parts; s++) {                                                 \
                        const float* st = part_stats + ((first + s) * G + g) * 2;                         \
                        if (st[1] > 0.0f && st[0] > m) m = st[0];                                         \
                    }                                                                                      \
                    for (int64_t i = 0; i < d; i++) acc[i] = 0.0f;                                        \
                    for (int64_t s = 0; s < parts; s++) {                                                 \
                        const float* st = part_stats + ((first + s) * G + g) * 2;                         \
                        if (st[1] == 0.0f) continue;                                                      \
                        const float w = st[1] * expf(st[0] - m); /* the part's share of the softmax */    \
                        const float* o = part_out + ((first + s) * G + g) * d;                            \
                        for (int64_t i = 0; i < d; i++) acc[i] += w * o[i];                               \
                        total += w;                                                                       \
                    }                                                                                      \
                    T* dst = out + (b * H + kh * G + g) * d;                                              \
                    for (int64_t i = 0; i < d; i++) dst[i] = STORE(acc[i] / total);                       \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        free(acc);                                                                                         \
        free(part_out);                                                                                    \
        free(part_stats);                                                                                  \
        return 1;                                                                                          \
    }

DEFINE_SPLIT(generic_f32_split, float, generic_f32_range, STORE_F32)
DEFINE_SPLIT(generic_bf16_split, uint16_t, generic_bf16_range, float_to_bf16)

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#define AVX_TILE 16  // fp32 lanes of a zmm register

// Softmax of the L scores `s`, rounded to bf16 and packed in token pairs (what vdpbf16ps takes in P.V): in
// memory that is just the bf16 probabilities in order. Pairs past L, up to num_pairs, are zero; `pairs` has
// room for num_pairs rounded up to 16; `s` is overwritten; the max and the sum of exponentials go to
// `max_sum` (unless NULL), for merging parts of a context. Vectorized throughout: the scalar version (a scalar
// max, a bf16 rounding per element) was half the time of the tiled kernel below on a 2,048-token prefill.
static void softmax_to_pairs(float* s, int64_t L, int64_t num_pairs, uint32_t* pairs, float* max_sum) {
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < L; t += AVX_TILE) {
        const __mmask16 live = t + AVX_TILE <= L ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - t)) - 1);
        vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(vmax, live, s + t));
    }
    const float m = _mm512_reduce_max_ps(vmax);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < L; t++) {  // exponentials in place; the 1 / sum is applied while rounding
        s[t] = exp_nonpositive(s[t] - m);
        sum += s[t];
    }
    if (max_sum != NULL) {
        max_sum[0] = m;
        max_sum[1] = sum;
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sum);
    for (int64_t t = 0; t < 2 * num_pairs; t += 2 * AVX_TILE) {
        const int64_t lo_n = L - t < 0 ? 0 : (L - t > AVX_TILE ? AVX_TILE : L - t);
        const int64_t hi_n = L - t - AVX_TILE < 0 ? 0 : (L - t - AVX_TILE > AVX_TILE ? AVX_TILE : L - t - AVX_TILE);
        const __m512 lo = _mm512_maskz_loadu_ps((__mmask16)((1u << lo_n) - 1), s + t);
        const __m512 hi = _mm512_maskz_loadu_ps((__mmask16)((1u << hi_n) - 1), s + t + AVX_TILE);
        const __m512bh packed = _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, inv), _mm512_mul_ps(lo, inv));
        _mm512_storeu_si512(pairs + t / 2, (__m512i)packed);
    }
}

#define MAX_VECTORS 6  // query vectors (rows x heads of the group) per tile: 6 x 3 score and 6 x 4 output registers
#define QK_TILES 3     // 16-token key tiles scored per pass over the dims

#define ALWAYS_INLINE static inline __attribute__((always_inline))

// Scores of R query vectors (their dim pairs at q[r]) against QK_TILES key tiles (k[t]), scaled, into s.
ALWAYS_INLINE void score_tiles(const int R, const uint32_t* const* q, const uint16_t* const* k, int64_t BS,
                               int64_t d, __m512 scale, float* s, int64_t stride) {
    __m512 acc[MAX_VECTORS][QK_TILES];
#pragma GCC unroll 6
    for (int r = 0; r < R; r++)
        for (int t = 0; t < QK_TILES; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t p = 0; p < d / 2; p++) {
        __m512bh keys[QK_TILES];
        for (int t = 0; t < QK_TILES; t++) keys[t] = (__m512bh)_mm512_loadu_si512(k[t] + p * BS * 2);
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            const __m512bh qr = (__m512bh)_mm512_set1_epi32((int)q[r][p]);
            for (int t = 0; t < QK_TILES; t++) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], keys[t], qr);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; r++)
        for (int t = 0; t < QK_TILES; t++) _mm512_store_ps(s + r * stride + t * AVX_TILE, _mm512_mul_ps(acc[r][t], scale));
}

// out[r][i0 .. i0+64) = P[r] . V over the first L tokens, for R query vectors (probability pairs at pairs[r]).
ALWAYS_INLINE void weigh_values(const int R, const uint32_t* const* pairs, const uint16_t* v_cache,
                                const int64_t* table, int64_t L, int64_t kh, int64_t NB, int64_t BS, int64_t d,
                                int64_t i0, float* out) {
    __m512 acc[MAX_VECTORS][4];
#pragma GCC unroll 6
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < L; t0 += BS) {
        const uint16_t* vb = v_cache + ((kh * NB + table[t0 / BS]) * BS) * d;
        const int64_t npairs = ((L - t0 < BS ? L - t0 : BS) + 1) / 2;
        for (int64_t jp = 0; jp < npairs; jp++) {
            const uint16_t* vp = vb + (jp * d + i0) * 2;
            __m512bh values[4];
            for (int c = 0; c < 4; c++) values[c] = (__m512bh)_mm512_loadu_si512(vp + c * 32);
#pragma GCC unroll 6
            for (int r = 0; r < R; r++) {
                const __m512bh pr = (__m512bh)_mm512_set1_epi32((int)pairs[r][t0 / 2 + jp]);
                for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], values[c], pr);
            }
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(out + r * 64 + c * AVX_TILE, acc[r][c]);
}

// R as a constant in each case, so the loops over vectors unroll and the accumulators stay in registers.
#define FOR_EACH_R(R, CALL)                                                                                \
    switch (R) {                                                                                           \
        case 1: CALL(1); break;                                                                            \
        case 2: CALL(2); break;                                                                            \
        case 3: CALL(3); break;                                                                            \
        case 4: CALL(4); break;                                                                            \
        case 5: CALL(5); break;                                                                            \
        default: CALL(6); break;                                                                           \
    }

// bf16 attention of one (sequence, KV head) over tokens [begin, end) of its context, with vdpbf16ps (needs
// BS % 16 == 0, d % 64 == 0, begin a multiple of BS): each query head's output over that range into out
// (fp32 [G, d]), and its score max and exponential sum into max_sum ([G, 2], unless NULL). With G <= MAX_VECTORS
// the scores come from the tiled kernel's `score_tiles`, the group's heads as its vectors, so a row attends
// bit-identically alone (plain decoding) and in a tile (a speculating request's rows): in bf16 a rounding
// apart could accept a draft where plain greedy decoding picks another token. Sharing each key load over the
// heads also made one row's attention 15-25% faster at 1,000-4,000 tokens.
static void avx512bf16_range(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
                             const int64_t* table, int64_t begin, int64_t end, int64_t from, float* out,
                             float* max_sum, int64_t G, int64_t kh, int64_t NB, int64_t BS, int64_t d, float scale,
                             float softcap) {
    const int64_t L = end - begin;
    const int64_t Lp = (L + 1) & ~(int64_t)1;  // probabilities come in token pairs
    const int64_t step = QK_TILES * AVX_TILE;
    const int64_t stride = (L + step - 1) / step * step;  // scores are stored in whole passes of key tiles
    float* scores = aligned_alloc(64, sizeof(float) * (size_t)(G * stride));
    const int64_t pair_stride = (Lp / 2 + 15) & ~(int64_t)15;
    uint32_t* pairs = malloc(sizeof(uint32_t) * (size_t)(G * pair_stride));
    const __m512 vscale = _mm512_set1_ps(scale);
    if (G <= MAX_VECTORS) {  // the query heads as the tiled kernel's vectors: scores bit-identical to a tile's
        const uint32_t* qv[MAX_VECTORS];
        for (int64_t g = 0; g < G; g++) qv[g] = (const uint32_t*)(q + g * d);
        for (int64_t t0 = 0; t0 < L; t0 += step) {
            const uint16_t* k[QK_TILES];
            for (int t = 0; t < QK_TILES; t++) {
                const int64_t tok = begin + (t0 + t * AVX_TILE < L ? t0 + t * AVX_TILE : t0);  // past L: unused
                k[t] = k_cache + ((kh * NB + table[tok / BS]) * d) * BS + (tok % BS) * 2;
            }
            const int64_t next = begin + t0 + step;
            if (next < end && next % BS == 0) {  // the next pass's first block: keys now, values for P.V
                prefetch_block(k_cache + ((kh * NB + table[next / BS]) * d) * BS, (size_t)(d * BS) * 2);
                prefetch_block(v_cache + ((kh * NB + table[next / BS]) * BS) * d, (size_t)(d * BS) * 2);
            }
#define SCORE(R_) score_tiles(R_, qv, k, BS, d, vscale, scores + t0, stride)
            FOR_EACH_R((int)G, SCORE)
#undef SCORE
        }
    } else for (int64_t t0 = begin; t0 < end; t0 += BS) {
        const uint16_t* kb = k_cache + ((kh * NB + table[t0 / BS]) * d) * BS;
        if (t0 + BS < end) {  // the next block's keys now, and its values for the P.V pass (they stay in L2)
            prefetch_block(k_cache + ((kh * NB + table[t0 / BS + 1]) * d) * BS, (size_t)(d * BS) * 2);
            prefetch_block(v_cache + ((kh * NB + table[t0 / BS + 1]) * BS) * d, (size_t)(d * BS) * 2);
        }
        const int64_t n = end - t0 < BS ? end - t0 : BS;
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
                _mm512_store_ps(scores + g * stride + (t0 - begin) + j0,
                                _mm512_mul_ps(_mm512_add_ps(a0, a1), vscale));
            }
        }
    }
    for (int64_t g = 0; g < G; g++) {
        soft_cap(scores + g * stride, L, softcap);
        mask_before(scores + g * stride, from - begin, L);
        softmax_to_pairs(scores + g * stride, L, Lp / 2, pairs + g * pair_stride, max_sum ? max_sum + 2 * g : NULL);
    }
    for (int64_t g = 0; g < G; g++) {
        const uint32_t* pp = pairs + g * pair_stride;
        for (int64_t i0 = 0; i0 < d; i0 += 4 * AVX_TILE) {
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
            for (int64_t t0 = begin; t0 < end; t0 += BS) {
                const uint16_t* vb = v_cache + ((kh * NB + table[t0 / BS]) * BS) * d;
                const int64_t npairs = ((end - t0 < BS ? end - t0 : BS) + 1) / 2;
                const uint32_t* block_pairs = pp + (t0 - begin) / 2;
                for (int64_t jp = 0; jp < npairs; jp++) {  // tokens 2jp, 2jp+1: their values per dim interleaved
                    const uint16_t* vp = vb + (jp * d + i0) * 2;
                    const __m512bh pv = (__m512bh)_mm512_set1_epi32(block_pairs[jp]);
                    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(vp), pv);
                    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(vp + 32), pv);
                    a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(vp + 64), pv);
                    a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(vp + 96), pv);
                }
            }
            float* o = out + g * d + i0;
            _mm512_storeu_ps(o, a0);
            _mm512_storeu_ps(o + 16, a1);
            _mm512_storeu_ps(o + 32, a2);
            _mm512_storeu_ps(o + 48, a3);
        }
    }
    free(scores);
    free(pairs);
}

// The context [0, L) of one (sequence, KV head), or its last `window` tokens, out in bf16.
static void avx512bf16_head(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
                            const int64_t* table, int64_t L, int64_t window, uint16_t* out, int64_t G, int64_t kh,
                            int64_t NB, int64_t BS, int64_t d, float scale, float softcap) {
    float* acc = malloc(sizeof(float) * (size_t)(G * d));
    const int64_t from = first_visible(L, window);
    avx512bf16_range(q, k_cache, v_cache, table, from / BS * BS, L, from, acc, NULL, G, kh, NB, BS, d, scale, softcap);
    for (int64_t i = 0; i < G * d; i++) out[i] = float_to_bf16(acc[i]);
    free(acc);
}

DEFINE_SPLIT(avx512bf16_split, uint16_t, avx512bf16_range, float_to_bf16)

// Tiled rows: consecutive query rows of one sequence (a prefill chunk's tokens) attend as one tile, all the
// query heads of its rows over one KV head. Each K/V vector loaded then feeds MAX_VECTORS dot products
// instead of one (rows one at a time re-read every tile per row: ~2 loads per vdpbf16ps, here ~0.5).
// `rows` consecutive rows of one sequence, row i attending to the first L0 + i tokens, over KV head kh.
// q, out: the first row's [H, d]; rows are H * d apart.
static void avx512bf16_tile(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
                            const int64_t* table, int64_t L0, int64_t rows, uint16_t* out, int64_t H, int64_t G,
                            int64_t kh, int64_t NB, int64_t BS, int64_t d, float scale, float softcap) {
    const int R = (int)(rows * G);
    const int64_t L = L0 + rows - 1;  // the last row's context
    const int64_t step = QK_TILES * AVX_TILE;
    const int64_t stride = (L + step - 1) / step * step;
    const int64_t num_pairs = (L + 1) / 2;
    const int64_t pair_stride = (num_pairs + 15) & ~(int64_t)15;
    float* scores = aligned_alloc(64, sizeof(float) * (size_t)(R * stride));
    uint32_t* pairs = malloc(sizeof(uint32_t) * (size_t)(R * pair_stride));
    float* acc = aligned_alloc(64, sizeof(float) * (size_t)(R * 64));
    const uint32_t* qv[MAX_VECTORS];
    const uint32_t* pv[MAX_VECTORS];
    for (int r = 0; r < R; r++) {
        qv[r] = (const uint32_t*)(q + ((r / G) * H + kh * G + r % G) * d);
        pv[r] = pairs + r * pair_stride;
    }
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t t0 = 0; t0 < L; t0 += step) {
        const uint16_t* k[QK_TILES];
        for (int t = 0; t < QK_TILES; t++) {
            const int64_t tok = t0 + t * AVX_TILE < L ? t0 + t * AVX_TILE : t0;  // past L: any valid tile, unused
            k[t] = k_cache + ((kh * NB + table[tok / BS]) * d) * BS + (tok % BS) * 2;
        }
#define SCORE(R_) score_tiles(R_, qv, k, BS, d, vscale, scores + t0, stride)
        FOR_EACH_R(R, SCORE)
#undef SCORE
    }
    for (int r = 0; r < R; r++) {
        soft_cap(scores + r * stride, L0 + r / G, softcap);
        softmax_to_pairs(scores + r * stride, L0 + r / G, num_pairs, pairs + r * pair_stride, NULL);
    }
    for (int64_t i0 = 0; i0 < d; i0 += 64) {
#define WEIGH(R_) weigh_values(R_, pv, v_cache, table, L, kh, NB, BS, d, i0, acc)
        FOR_EACH_R(R, WEIGH)
#undef WEIGH
        for (int r = 0; r < R; r++)
            for (int64_t i = 0; i < 64; i++)
                out[((r / G) * H + kh * G + r % G) * d + i0 + i] = float_to_bf16(acc[r * 64 + i]);
    }
    free(scores);
    free(pairs);
    free(acc);
}

// Rows that share a table at consecutive context lengths (k_new NULL: their K/V are stored), cut into tiles
// of at most MAX_VECTORS / G rows. Returns 0 when the call is not of that kind (decodes, or a sliding window,
// whose rows each start elsewhere: rows one by one).
static int avx512bf16_tiled(const uint16_t* q, const uint16_t* k_new, uint16_t* k_cache, uint16_t* v_cache,
                            const int64_t* block_tables, const int64_t* row_tables, const int64_t* context_lens,
                            uint16_t* out, int64_t D, int64_t H, int64_t KVH, int64_t NB, int64_t BS, int64_t d,
                            int64_t MAXB, float scale, int64_t window, float softcap) {
    const int64_t G = H / KVH;
    if (row_tables == NULL || k_new != NULL || window > 0 || G > MAX_VECTORS || BS % 16 != 0 || d % 64 != 0)
        return 0;
    const int64_t per_tile = MAX_VECTORS / G;
    int64_t* tile_start = malloc(sizeof(int64_t) * (size_t)(D + 1));
    int64_t num_tiles = 0;
    for (int64_t b = 0; b < D;) {
        int64_t n = 1;
        while (n < per_tile && b + n < D && row_tables[b + n] == row_tables[b] &&
               context_lens[b + n] == context_lens[b] + n)
            n++;
        tile_start[num_tiles++] = b;
        b += n;
    }
    tile_start[num_tiles] = D;
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int64_t i = 0; i < num_tiles; i++) {
        for (int64_t kh = 0; kh < KVH; kh++) {
            const int64_t b = tile_start[i];
            avx512bf16_tile(q + b * H * d, k_cache, v_cache, block_tables + row_tables[b] * MAXB, context_lens[b],
                            tile_start[i + 1] - b, out + b * H * d, H, G, kh, NB, BS, d, scale, softcap);
        }
    }
    free(tile_start);
    return 1;
}
#endif

// Entry points: D query rows, each attending to the first context_lens[b] tokens of its sequence (their last
// `window` with a sliding window; 0: all). Row b
// reads the block table row_tables[b] (or b when row_tables is NULL): the rows of a prefill chunk or of a
// speculating request share their sequence's table. k_new/v_new may be NULL (the new tokens were already
// stored); they must be, when rows of one sequence read each other's new K/V.
#define DEFINE_ENTRY(NAME, T, HEAD, FAST_HEAD, WHOLE_CALL)                                                \
    void NAME(const T* q, const T* k_new, const T* v_new, T* k_cache, T* v_cache, const int64_t* block_tables, \
              const int64_t* row_tables, const int64_t* context_lens, T* out, int64_t D, int64_t H,        \
              int64_t KVH, int64_t NB, int64_t BS, int64_t d, int64_t MAXB, float scale, int64_t window,   \
              float softcap) {                                                                             \
        WHOLE_CALL                                                                                         \
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
                HEAD(qh, k_cache, v_cache, table, L, window, oh, G, kh, NB, BS, d, scale, softcap);       \
            }                                                                                              \
        }                                                                                                  \
    }

#define F32_WHOLE_CALL                                                                                    \
    if (generic_f32_split(q, k_new, v_new, k_cache, v_cache, block_tables, row_tables, context_lens, out, D, H, \
                          KVH, NB, BS, d, MAXB, scale, window, softcap))                                  \
        return;
DEFINE_ENTRY(paged_decode_f32, float, generic_f32_head, , F32_WHOLE_CALL)
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define BF16_FAST_PATH                                                                                    \
    if (BS % 16 == 0 && d % 64 == 0) {                                                                    \
        avx512bf16_head(qh, k_cache, v_cache, table, L, window, oh, G, kh, NB, BS, d, scale, softcap);    \
        continue;                                                                                         \
    }
#define BF16_WHOLE_CALL                                                                                   \
    if (avx512bf16_tiled(q, k_new, k_cache, v_cache, block_tables, row_tables, context_lens, out, D, H, KVH, \
                         NB, BS, d, MAXB, scale, window, softcap) ||                                      \
        (BS % 16 == 0 && d % 64 == 0 ? avx512bf16_split : generic_bf16_split)(                           \
            q, k_new, v_new, k_cache, v_cache, block_tables, row_tables, context_lens, out, D, H, KVH, NB, BS, d, \
            MAXB, scale, window, softcap))                                                                \
        return;
#else
#define BF16_FAST_PATH
#define BF16_WHOLE_CALL                                                                                   \
    if (generic_bf16_split(q, k_new, v_new, k_cache, v_cache, block_tables, row_tables, context_lens, out, D, H, \
                           KVH, NB, BS, d, MAXB, scale, window, softcap))                                 \
        return;
#endif
DEFINE_ENTRY(paged_decode_bf16, uint16_t, generic_bf16_head, BF16_FAST_PATH, BF16_WHOLE_CALL)

// 1 when the bf16 kernel has its AVX512-BF16 path (it then beats PyTorch's SDPA on prefill chunks too).
int has_avx512bf16(void) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}
