// LoRA deltas for the rows of a step, each row with its own adapter (or none), in one call: y[r] += B (A x[r]).
//
// At the few rows of a decode step, a LoRA delta is two tiny matmuls (rank 8-64), and PyTorch's matmuls cost
// 15-50 us each in call overhead alone (measured: a rank-48 shrink and expand of one bf16 row took 60 us
// together), about 120 of them per SmolLM2 step per adapter. Here one call per linear does every row, whatever
// its adapter, with fp32 accumulation; the weights of an adapter stay in cache across its rows.
//
// Per adapter slot s (a row's entry in `slots`, -1: no adapter): a[s] is A [ranks[s], K] and b[s] is B
// transposed, [ranks[s], N], with the scale folded in; ranks[s] 0: the adapter leaves this linear alone.
// cols[s] is [ranks[s], 2]: the output columns [start, end) that rank row j of B^T can be nonzero in. A fused
// linear's parts (q, k, v; gate, up) each own their columns, so B^T is block-diagonal, mostly zeros: the expand
// reads only each rank row's own columns. x is [M, K], y [M, N], weights and activations of one type.

#include <stdlib.h>

#include "common.h"

#define AS_FLOAT_F32(v) (v)
#define AS_FLOAT_BF16(v) bf16_to_float(v)
#define FROM_FLOAT_F32(v) (v)
#define FROM_FLOAT_BF16(v) float_to_bf16(v)
#define COLUMNS 128  // output columns a thread accumulates at a time (fp32, on its stack)

#define DEFINE_LORA_ADD(NAME, T, AS_FLOAT, FROM_FLOAT)                                                         \
    void NAME(const T* x, T* y, const T* const* a, const T* const* b, const int64_t* const* cols,              \
              const int64_t* ranks, const int64_t* slots, int64_t M, int64_t N, int64_t K) {                   \
        int64_t offsets[M + 1];  /* where each row's shrunk vector starts in `t` */                            \
        offsets[0] = 0;                                                                                        \
        for (int64_t r = 0; r < M; r++) offsets[r + 1] = offsets[r] + (slots[r] < 0 ? 0 : ranks[slots[r]]);    \
        const int64_t total = offsets[M];                                                                      \
        if (total == 0) return;                                                                                \
        float* t = malloc(total * sizeof(float));                                                              \
        _Pragma("omp parallel if (total * K > 32768)")                                                        \
        {                                                                                                      \
            _Pragma("omp for schedule(static)")                                                               \
            for (int64_t i = 0; i < total; i++) { /* t[i] = A[j] . x[r] for the row r and rank j of i */       \
                int64_t r = 0;                                                                                 \
                while (offsets[r + 1] <= i) r++;                                                               \
                const T* w = a[slots[r]] + (i - offsets[r]) * K;                                               \
                const T* xr = x + r * K;                                                                       \
                float acc = 0.0f;                                                                              \
                _Pragma("omp simd reduction(+ : acc)")                                                        \
                for (int64_t k = 0; k < K; k++) acc += AS_FLOAT(w[k]) * AS_FLOAT(xr[k]);                       \
                t[i] = acc;                                                                                    \
            }                                                                                                  \
            _Pragma("omp for schedule(static)")                                                               \
            for (int64_t n0 = 0; n0 < N; n0 += COLUMNS) { /* y[r, n0:n1] += t[r] . B^T[:, n0:n1] */           \
                const int64_t width = N - n0 < COLUMNS ? N - n0 : COLUMNS;                                     \
                for (int64_t r = 0; r < M; r++) {                                                              \
                    const int64_t rank = offsets[r + 1] - offsets[r];                                          \
                    if (rank == 0) continue;                                                                   \
                    float acc[COLUMNS];                                                                        \
                    for (int64_t c = 0; c < width; c++) acc[c] = 0.0f;                                         \
                    const T* bt = b[slots[r]] + n0;                                                            \
                    const int64_t* span = cols[slots[r]];                                                      \
                    for (int64_t j = 0; j < rank; j++) {                                                       \
                        const int64_t lo = (span[2 * j] > n0 ? span[2 * j] : n0) - n0;                         \
                        const int64_t hi = (span[2 * j + 1] < n0 + width ? span[2 * j + 1] : n0 + width) - n0; \
                        const float tj = t[offsets[r] + j];                                                    \
                        const T* bj = bt + j * N;                                                              \
                        _Pragma("omp simd")                                                                   \
                        for (int64_t c = lo; c < hi; c++) acc[c] += tj * AS_FLOAT(bj[c]);                      \
                    }                                                                                          \
                    T* yr = y + r * N + n0;                                                                    \
                    for (int64_t c = 0; c < width; c++) yr[c] = FROM_FLOAT(AS_FLOAT(yr[c]) + acc[c]);          \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        free(t);                                                                                               \
    }

DEFINE_LORA_ADD(lora_add_f32, float, AS_FLOAT_F32, FROM_FLOAT_F32)
DEFINE_LORA_ADD(lora_add_bf16, uint16_t, AS_FLOAT_BF16, FROM_FLOAT_BF16)
