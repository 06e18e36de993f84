// Paged decode attention for the CPU: one query token per sequence, read straight from the block table.
//
// Decode attention is bound by memory traffic: every step reads each sequence's whole K/V context.
// Gathering blocks into a contiguous tensor first (what plain PyTorch must do) reads the context,
// writes a copy and reads the copy again; this kernel reads each K/V row exactly once, and once per KV
// head for all the query heads of its GQA group. Parallel over (sequence, KV head) with OpenMP.
//
// Layouts: q, out [D, H, d]; k_cache [KVH, NB, d, BS] (each block stored transposed, so the scores of a
// block's tokens accumulate in one vector with no horizontal sums); v_cache [KVH, NB, BS, d];
// block_tables [D, MAXB] (int64); context_lens [D] (int64). Entry points for float32 and bfloat16
// storage (fp32 math in both).

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

#define DEFINE_PAGED_DECODE(NAME, T, LOAD, STORE)                                                          \
    void NAME(const T* q, const T* k_cache, const T* v_cache, const int64_t* block_tables,                \
              const int64_t* context_lens, T* out, int64_t D, int64_t H, int64_t KVH, int64_t NB,         \
              int64_t BS, int64_t d, int64_t MAXB, float scale) {                                         \
        const int64_t G = H / KVH;                                                                         \
        _Pragma("omp parallel for collapse(2) schedule(dynamic)")                                         \
        for (int64_t b = 0; b < D; b++) {                                                                 \
            for (int64_t kh = 0; kh < KVH; kh++) {                                                        \
                const int64_t L = context_lens[b];                                                        \
                float* qf = malloc(sizeof(float) * (size_t)(G * d));                                      \
                float* acc = calloc((size_t)(G * d), sizeof(float));                                      \
                float* scores = malloc(sizeof(float) * (size_t)(G * L));                                  \
                float* row = malloc(sizeof(float) * (size_t)(d > BS ? d : BS));                            \
                for (int64_t g = 0; g < G; g++) {                                                         \
                    const T* qp = q + (b * H + kh * G + g) * d;                                           \
                    for (int64_t i = 0; i < d; i++) qf[g * d + i] = LOAD(qp[i]) * scale;                  \
                }                                                                                          \
                const int64_t* table = block_tables + b * MAXB;                                           \
                for (int64_t t0 = 0; t0 < L; t0 += BS) {                                                  \
                    const int64_t n = L - t0 < BS ? L - t0 : BS;                                          \
                    const T* kb = k_cache + ((kh * NB + table[t0 / BS]) * d) * BS;                        \
                    for (int64_t g = 0; g < G; g++) memset(scores + g * L + t0, 0, sizeof(float) * n);    \
                    for (int64_t i = 0; i < d; i++) {                                                     \
                        const T* kp = kb + i * BS;                                                        \
                        _Pragma("omp simd")                                                               \
                        for (int64_t j = 0; j < n; j++) row[j] = LOAD(kp[j]);                             \
                        for (int64_t g = 0; g < G; g++) {                                                 \
                            const float qv = qf[g * d + i];                                               \
                            float* sg = scores + g * L + t0;                                              \
                            _Pragma("omp simd")                                                           \
                            for (int64_t j = 0; j < n; j++) sg[j] += qv * row[j];                         \
                        }                                                                                  \
                    }                                                                                      \
                }                                                                                          \
                for (int64_t g = 0; g < G; g++) {                                                         \
                    float* sg = scores + g * L;                                                           \
                    float m = -INFINITY, sum = 0.0f;                                                      \
                    for (int64_t t = 0; t < L; t++) m = sg[t] > m ? sg[t] : m;                            \
                    for (int64_t t = 0; t < L; t++) {                                                     \
                        sg[t] = expf(sg[t] - m);                                                          \
                        sum += sg[t];                                                                     \
                    }                                                                                      \
                    const float inv = 1.0f / sum;                                                         \
                    for (int64_t t = 0; t < L; t++) sg[t] *= inv;                                         \
                }                                                                                          \
                for (int64_t t0 = 0; t0 < L; t0 += BS) {                                                  \
                    const int64_t n = L - t0 < BS ? L - t0 : BS;                                          \
                    const T* vb = v_cache + ((kh * NB + table[t0 / BS]) * BS) * d;                        \
                    for (int64_t j = 0; j < n; j++) {                                                     \
                        const T* vp = vb + j * d;                                                         \
                        _Pragma("omp simd")                                                               \
                        for (int64_t i = 0; i < d; i++) row[i] = LOAD(vp[i]);                             \
                        for (int64_t g = 0; g < G; g++) {                                                 \
                            const float p = scores[g * L + t0 + j];                                       \
                            float* ag = acc + g * d;                                                      \
                            _Pragma("omp simd")                                                           \
                            for (int64_t i = 0; i < d; i++) ag[i] += p * row[i];                          \
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
                free(row);                                                                                 \
            }                                                                                              \
        }                                                                                                  \
    }

#define LOAD_F32(x) (x)
#define STORE_F32(x) (x)

DEFINE_PAGED_DECODE(paged_decode_f32, float, LOAD_F32, STORE_F32)
DEFINE_PAGED_DECODE(paged_decode_bf16, uint16_t, bf16_to_float, float_to_bf16)
