// Fused elementwise kernels of the Llama layer for the CPU: each reads and writes its rows once.
//
// In PyTorch each of these is a chain of 4-9 ops (casts to fp32, pow, mean, rsqrt, mul, cat, cast
// back), every op a full pass over the activations plus a temporary. The math and its rounding points
// follow the PyTorch formulation in ember/models/llama.py, so bf16 results match it: fp32 arithmetic,
// rounded to the storage type where PyTorch rounds.

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common.h"

static inline float f32_load(float x) { return x; }
static inline float f32_store(float x) { return x; }

// Threads only pay off on large steps (prefill); `work` is the element count.
#define PARALLEL_IF_LARGE(count)  \
    const int64_t work = (count); \
    _Pragma("omp parallel for if (work > 65536)")

// out[r, i] = round(round(x * sigmoid(A)) * up) for gate_up rows [gate (I) | up (I)], x the gate: A = x is SiLU,
// A = 2 sqrt(2 / pi) (x + 0.044715 x^3) GELU's tanh approximation (0.5 (1 + tanh(z)) = sigmoid(2 z)).
#define DEFINE_GATED(NAME, SUFFIX, T, LOAD, STORE, A)                                                      \
    void NAME##_##SUFFIX(const T* gate_up, T* out, int64_t rows, int64_t I) {                              \
        PARALLEL_IF_LARGE(rows * I)                                                                        \
        for (int64_t r = 0; r < rows; r++) {                                                               \
            const T* g = gate_up + r * 2 * I;                                                              \
            const T* u = g + I;                                                                            \
            T* o = out + r * I;                                                                            \
            _Pragma("omp simd")                                                                            \
            for (int64_t i = 0; i < I; i++) {                                                              \
                const float x = LOAD(g[i]), a = (A), e = exp_nonpositive(-fabsf(a));                       \
                const float act = (a >= 0.0f ? x : x * e) / (1.0f + e);                                    \
                o[i] = STORE(LOAD(STORE(act)) * LOAD(u[i]));                                               \
            }                                                                                              \
        }                                                                                                  \
    }

#define DEFINE_ELEMENTWISE(SUFFIX, T, LOAD, STORE)                                                         \
    /* out = weight * round(s * rsqrt(mean(s^2) + eps)), s = round(x + residual) stored back into          \
       residual when residual is given, else s = x. Rows of H elements, x rows `x_stride` apart. With        \
       `unit_offset` (Gemma's norm) out = round((1 + weight) * s * rsqrt(...)) instead, in fp32 throughout. */ \
    static void rms_norm_rows_##SUFFIX(const T* x, T* residual, const T* weight, T* out, int64_t rows,     \
                                       int64_t H, int64_t x_stride, float eps, int unit_offset) {          \
        PARALLEL_IF_LARGE(rows * H)                                                                        \
        for (int64_t r = 0; r < rows; r++) {                                                               \
            const T* xr = x + r * x_stride;                                                                \
            T* res = residual ? residual + r * H : NULL;                                                   \
            T* o = out + r * H;                                                                            \
            if (res) {                                                                                     \
                _Pragma("omp simd")                                                                        \
                for (int64_t i = 0; i < H; i++) res[i] = STORE(LOAD(xr[i]) + LOAD(res[i]));                \
            }                                                                                              \
            const T* src = res ? res : xr;                                                                 \
            float sum = 0.0f;                                                                              \
            _Pragma("omp simd reduction(+ : sum)")                                                         \
            for (int64_t i = 0; i < H; i++) sum += LOAD(src[i]) * LOAD(src[i]);                            \
            const float inv = 1.0f / sqrtf(sum / (float)H + eps);                                          \
            if (unit_offset) {                                                                             \
                _Pragma("omp simd")                                                                        \
                for (int64_t i = 0; i < H; i++) o[i] = STORE(LOAD(src[i]) * inv * (1.0f + LOAD(weight[i]))); \
            } else {                                                                                       \
                _Pragma("omp simd")                                                                        \
                for (int64_t i = 0; i < H; i++) o[i] = STORE(LOAD(weight[i]) * LOAD(STORE(LOAD(src[i]) * inv))); \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
                                                                                                           \
    void rms_norm_##SUFFIX(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t H,       \
                           int64_t x_stride, float eps) {                                                  \
        rms_norm_rows_##SUFFIX(x, residual, weight, out, rows, H, x_stride, eps, 0);                       \
    }                                                                                                      \
                                                                                                           \
    void gemma_rms_norm_##SUFFIX(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t H, \
                                 int64_t x_stride, float eps) {                                            \
        rms_norm_rows_##SUFFIX(x, residual, weight, out, rows, H, x_stride, eps, 1);                       \
    }                                                                                                      \
                                                                                                           \
    /* Rotate, in place, the first d dims of `heads` heads per row, head_stride apart ("rotate half"      \
       layout; d < head_stride: partial rotary), by cos/sin [rows, d/2]. */                                \
    void rotary_##SUFFIX(T* x, const float* cos, const float* sin, int64_t rows, int64_t heads, int64_t d,  \
                         int64_t head_stride, int64_t row_stride) {                                        \
        const int64_t half = d / 2;                                                                        \
        PARALLEL_IF_LARGE(rows * heads * d)                                                                \
        for (int64_t r = 0; r < rows; r++) {                                                               \
            const float* c = cos + r * half;                                                               \
            const float* s = sin + r * half;                                                               \
            for (int64_t h = 0; h < heads; h++) {                                                          \
                T* v = x + r * row_stride + h * head_stride;                                               \
                _Pragma("omp simd")                                                                        \
                for (int64_t i = 0; i < half; i++) {                                                       \
                    const float x1 = LOAD(v[i]), x2 = LOAD(v[i + half]);                                   \
                    v[i] = STORE(x1 * c[i] - x2 * s[i]);                                                   \
                    v[i + half] = STORE(x2 * c[i] + x1 * s[i]);                                            \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
                                                                                                           \
    /* x *= scale in place, each product rounded once (Gemma's embeddings times sqrt(hidden)) */        \
    void scale_##SUFFIX(T* x, int64_t n, float scale) {                                                    \
        _Pragma("omp simd")                                                                                \
        for (int64_t i = 0; i < n; i++) x[i] = STORE(LOAD(x[i]) * scale);                                  \
    }                                                                                                      \
                                                                                                           \
    DEFINE_GATED(silu_and_mul, SUFFIX, T, LOAD, STORE, x)                                                  \
    DEFINE_GATED(gelu_tanh_and_mul, SUFFIX, T, LOAD, STORE, 1.5957691216057308f * (x + 0.044715f * x * x * x))

DEFINE_ELEMENTWISE(f32, float, f32_load, f32_store)
DEFINE_ELEMENTWISE(bf16, uint16_t, bf16_to_float, float_to_bf16)
