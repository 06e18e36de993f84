// Paged decode attention for the CPU: one query token per sequence, read straight from the block table.
//
// Decode attention is bound by memory traffic: every step reads each sequence's whole K/V context.
// Gathering blocks into a contiguous tensor first (what plain PyTorch must do) reads the context,
// writes a copy and reads the copy again; this kernel reads each K/V row exactly once per KV head, for
// all query heads of its GQA group. Parallel over (sequence, KV head) with OpenMP.
//
// Layouts: q, out [D, H, d]; k_cache [KVH, NB, d, BS] (each block stored transposed, so the scores of
// 16 consecutive tokens accumulate in one vector register with no horizontal sums); v_cache
// [KVH, NB, BS, d]; block_tables [D, MAXB] (int64); context_lens [D] (int64). Entry points for float32
// and bfloat16 storage (fp32 math in both).

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 16  // tokens whose scores are accumulated together

static inline float bf16_to_float(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

// exp(x) for x <= 0 (softmax after subtracting the max): 2^n * p(r), branch-free so loops vectorize.
// Relative error about 2e-7, below fp32 attention's own rounding.
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = nearbyintf(x * 1.44269504088896341f);
    const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits;
    memcpy(&bits, &p, sizeof bits);
    bits += (int32_t)n << 23;
    memcpy(&p, &bits, sizeof p);
    return p;
}

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

#define DEFINE_PAGED_DECODE(NAME, T, LOAD, STORE)                                                          \
    /* scores[t] = q . k_t for the L tokens of one (sequence, KV head, query head) */                      \
    static void NAME##_scores(const float* qf, const T* k_cache, const int64_t* table, int64_t kh,        \
                              int64_t NB, int64_t BS, int64_t d, int64_t L, float* scores) {              \
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
                        const T* kp = kb + i * BS + j0;                                                   \
                        const float qv = qf[i];                                                           \
                        _Pragma("omp simd")                                                               \
                        for (int64_t j = 0; j < TILE; j++) s[j] += qv * LOAD(kp[j]);                      \
                    }                                                                                      \
                } else {                                                                                   \
                    for (int64_t i = 0; i < d; i++) {                                                     \
                        const T* kp = kb + i * BS + j0;                                                   \
                        const float qv = qf[i];                                                           \
                        _Pragma("omp simd")                                                               \
                        for (int64_t j = 0; j < TILE; j++) s[j] += qv * (j < width ? LOAD(kp[j]) : 0.0f); \
                    }                                                                                      \
                }                                                                                          \
                const int64_t keep = n - j0 < TILE ? n - j0 : TILE;                                       \
                memcpy(scores + t0 + j0, s, sizeof(float) * (size_t)keep);                                \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
                                                                                                           \
    void NAME(const T* q, const T* k_cache, const T* v_cache, const int64_t* block_tables,                \
              const int64_t* context_lens, T* out, int64_t D, int64_t H, int64_t KVH, int64_t NB,         \
              int64_t BS, int64_t d, int64_t MAXB, float scale) {                                         \
        const int64_t G = H / KVH;                                                                         \
        _Pragma("omp parallel for collapse(2) schedule(dynamic)")                                         \
        for (int64_t b = 0; b < D; b++) {                                                                 \
            for (int64_t kh = 0; kh < KVH; kh++) {                                                        \
                const int64_t L = context_lens[b];                                                        \
                const int64_t* table = block_tables + b * MAXB;                                           \
                float* qf = malloc(sizeof(float) * (size_t)(G * d));                                      \
                float* acc = calloc((size_t)(G * d), sizeof(float));                                      \
                float* scores = malloc(sizeof(float) * (size_t)(G * L));                                  \
                for (int64_t g = 0; g < G; g++) {                                                         \
                    const T* qp = q + (b * H + kh * G + g) * d;                                           \
                    for (int64_t i = 0; i < d; i++) qf[g * d + i] = LOAD(qp[i]) * scale;                  \
                    NAME##_scores(qf + g * d, k_cache, table, kh, NB, BS, d, L, scores + g * L);          \
                    softmax_inplace(scores + g * L, L);                                                   \
                }                                                                                          \
                for (int64_t t0 = 0; t0 < L; t0 += BS) {                                                  \
                    const int64_t n = L - t0 < BS ? L - t0 : BS;                                          \
                    const T* vb = v_cache + ((kh * NB + table[t0 / BS]) * BS) * d;                        \
                    if (t0 + BS < L) prefetch_block(v_cache + ((kh * NB + table[t0 / BS + 1]) * BS) * d,   \
                                                    (size_t)(d * BS) * sizeof(T));                        \
                    for (int64_t g = 0; g < G; g++) {                                                     \
                        const float* p = scores + g * L + t0;                                             \
                        for (int64_t i0 = 0; i0 < d; i0 += TILE) {                                        \
                            float a[TILE] = {0};                                                          \
                            const int64_t width = d - i0 < TILE ? d - i0 : TILE;                          \
                            if (width == TILE) {                                                          \
                                for (int64_t j = 0; j < n; j++) {                                         \
                                    const T* vp = vb + j * d + i0;                                        \
                                    const float pj = p[j];                                                \
                                    _Pragma("omp simd")                                                   \
                                    for (int64_t i = 0; i < TILE; i++) a[i] += pj * LOAD(vp[i]);          \
                                }                                                                          \
                            } else {                                                                       \
                                for (int64_t j = 0; j < n; j++) {                                         \
                                    const T* vp = vb + j * d + i0;                                        \
                                    const float pj = p[j];                                                \
                                    _Pragma("omp simd")                                                   \
                                    for (int64_t i = 0; i < TILE; i++)                                    \
                                        a[i] += pj * (i < width ? LOAD(vp[i]) : 0.0f);                    \
                                }                                                                          \
                            }                                                                              \
                            for (int64_t i = 0; i < width; i++) acc[g * d + i0 + i] += a[i];             \
                        }                                                                                  \
                    }                                                                                      \
                }                                                                                          \
                for (int64_t g = 0; g < G; g++) {                                                         \
                    T* op = out + (b * H + kh * G + g) * d;                                               \
                    for (int64_t i = 0; i < d; i++) op[i] = STORE(acc[g * d + i]);                        \
                }                                                                                          \
                free(qf);                                                                                  \
                free(acc);                                                                                 \
                free(scores);                                                                              \
            }                                                                                              \
        }                                                                                                  \
    }

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)

DEFINE_PAGED_DECODE(paged_decode_f32, float, LOAD_F32, STORE_F32)
DEFINE_PAGED_DECODE(paged_decode_bf16, uint16_t, bf16_to_float, float_to_bf16)

// Scatter a step's new keys and values ([T, KVH, d]) into their slots: keys into the transposed
// [KVH, NB, d, BS] layout, values into [KVH, NB, BS, d]. Element type agnostic (copies `elem` bytes).
void write_kv(const char* k, const char* v, char* k_cache, char* v_cache, const int64_t* slots, int64_t T,
              int64_t KVH, int64_t NB, int64_t BS, int64_t d, int64_t elem) {
#pragma omp parallel for collapse(2) if (T * KVH > 1024)
    for (int64_t t = 0; t < T; t++) {
        for (int64_t h = 0; h < KVH; h++) {
            const int64_t block = slots[t] / BS, offset = slots[t] % BS;
            const char* ks = k + ((t * KVH + h) * d) * elem;
            char* kd = k_cache + (((h * NB + block) * d) * BS + offset) * elem;
            if (elem == 2) {
                for (int64_t i = 0; i < d; i++) ((uint16_t*)kd)[i * BS] = ((const uint16_t*)ks)[i];
            } else if (elem == 4) {
                for (int64_t i = 0; i < d; i++) ((uint32_t*)kd)[i * BS] = ((const uint32_t*)ks)[i];
            } else {
                for (int64_t i = 0; i < d; i++) memcpy(kd + i * BS * elem, ks + i * elem, (size_t)elem);
            }
            memcpy(v_cache + (((h * NB + block) * BS + offset) * d) * elem, v + ((t * KVH + h) * d) * elem,
                   (size_t)(d * elem));
        }
    }
}
