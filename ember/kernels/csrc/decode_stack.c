// A whole decode step of a Llama-family model for a few rows, in one call: embedding rows, every layer
// (RMSNorm, QKV from the GGUF blocks, Qwen3's per-head q/k RMSNorm, rotary, paged attention that also stores
// the new K/V, O, RMSNorm, gate/up, SiLU-and-mul, down), then the final norm. Rows of LoRA adapters add their
// deltas after each linear. Gemma's layers too: scaled embeddings, each sublayer's output normalized before
// it joins the residual stream, GELU, a rotary table of their own in local layers, soft-capped scores.
//
// Each stage calls the same kernel the PyTorch model calls (passed in as function pointers, so this file
// needs no ISA of its own), on the same inputs, in the same order: the hidden states are bit-identical to
// the model's forward. What it removes is Python: at one row a SmolLM2 step made ~270 calls from Python,
// which cost about half the step.

#include "common.h"
#include <stdint.h>
#include <string.h>

typedef void (*quantized_linear_fn)(const void* quants, const void* scales, const void* mins, const void* bias,
                                    const void* x, void* out, int64_t M, int64_t N, int64_t K, int64_t ldo);
typedef void (*rms_norm_fn)(const void* x, void* residual, const void* weight, void* out, int64_t rows, int64_t H,
                            int64_t x_stride, float eps);
typedef void (*rotary_fn)(void* x, const float* cos, const float* sin, int64_t rows, int64_t heads, int64_t d,
                          int64_t head_stride, int64_t row_stride);
typedef void (*dequantize_fn)(const void* quants, const void* scales, const void* mins, float* out, int64_t N,
                              int64_t K);
typedef void (*act_and_mul_fn)(const void* gate_up, void* out, int64_t rows, int64_t I);
typedef void (*scale_fn)(void* x, int64_t n, float scale);
typedef void (*write_kv_fn)(const void* k, const void* v, void* k_cache, void* v_cache, const int64_t* slots,
                            int64_t T, int64_t KVH, int64_t NB, int64_t BS, int64_t d, int64_t elem_size);
typedef void (*paged_decode_fn)(const void* q, const void* k_new, const void* v_new, void* k_cache, void* v_cache,
                                const int64_t* block_tables, const int64_t* row_tables, const int64_t* context_lens,
                                void* out, int64_t D, int64_t H, int64_t KVH, int64_t NB, int64_t BS, int64_t d,
                                int64_t MAXB, float scale, int64_t window, float softcap);

typedef void (*lora_add_fn)(const void* x, void* y, const void* const* a, const void* const* b,
                            const int64_t* const* cols, const int64_t* ranks, const int64_t* slots, int64_t M,
                            int64_t N, int64_t K);

typedef struct {
    const void* const* a;  // per adapter slot: A, B transposed, B^T's column spans, rank (lora.c); NULL: none
    const void* const* b;
    const int64_t* const* cols;
    const int64_t* ranks;
} LoRATable;

typedef struct {
    const void *quants, *scales, *mins, *bias;  // mins and bias may be NULL
    quantized_linear_fn fn;                     // the kernel of its format (q4/q5/q6/q8) and activation dtype
    quantized_linear_fn many_rows_fn;           // the same for steps past the linear's few_rows (AMX's), or fn
    int64_t out_features;
} QuantizedSegment;

#define MAX_SEGMENTS 3  // a fused projection's parts (q, k, v), each in a format of its own in Q4_K_M files

typedef struct {
    QuantizedSegment segments[MAX_SEGMENTS];  // consecutive output columns, the first num_segments used
    int64_t num_segments, out_features, in_features;
    int64_t few_rows;  // steps of up to this many rows call each segment's fn, larger ones its many_rows_fn
    LoRATable lora;
} QuantizedLinear;

typedef struct {
    const void *input_norm, *pre_mlp_norm;              // pre_mlp_norm: Llama's post-attention norm
    const void *attention_out_norm, *mlp_out_norm;      // Gemma's norms of each sublayer's output; NULL: none
    QuantizedLinear qkv, o, gate_up, down;
    void *k_cache, *v_cache;
    const void *q_norm, *k_norm;  // Qwen3's and Gemma 3's per-head RMSNorm weights [head_dim]; NULL: none
    int64_t window;               // its sliding attention window; 0: whole contexts
    const float *cos, *sin;       // its rotary tables [max_positions, rotary_dim / 2] (Gemma 3's local layers: own)
} DecoderLayer;

// A GGUF embedding table held as its blocks (`quantized.QuantizedEmbedding`): a row looked up is dequantized.
typedef struct {
    const char* quants;  // NULL: the table is dense (`embedding`)
    const char *scales, *mins;
    dequantize_fn dequantize;  // its format's, to fp32
    int64_t row_bytes, row_scales_bytes, row_mins_bytes;
    float* row;  // scratch [hidden]
} EmbeddingBlocks;

typedef struct {
    int64_t num_layers, hidden, heads, kv_heads, head_dim, intermediate, num_blocks, block_size, elem_size;
    int64_t rotary_dim;  // the leading dims of each head that rotate: head_dim, or fewer (Phi-4-mini: 3/4)
    float eps, scale;
    float embedding_scale;  // embeddings are multiplied by it (Gemma: sqrt(hidden) rounded to the dtype); 1: not
    float softcap;          // attention scores' soft cap (Gemma 2); 0: none
    float residual_scale;   // each sublayer's output is multiplied by it as it joins the residual stream (Granite)
    const DecoderLayer* layers;
    const void* embedding;   // [vocab, hidden], unless held as blocks (`embedding_blocks`)
    const void* final_norm;  // [hidden]
    rms_norm_fn rms_norm;    // the model's: Llama's, or Gemma's (scaling by 1 + weight)
    rotary_fn rotary;
    act_and_mul_fn act_and_mul;  // SiLU's or GELU's
    scale_fn scale_elements;
    paged_decode_fn paged_decode;
    write_kv_fn write_kv;
    lora_add_fn lora_add;
    // scratch for `max_rows` rows
    void *x, *h, *residual, *qkv, *q, *k, *v, *attn, *gate_up, *act;
    float *cos_rows, *sin_rows;
    EmbeddingBlocks embedding_blocks;
} DecodeStack;

// The embedding of token t into out (a row of the stack's dtype).
static void embed(const DecodeStack* s, int64_t t, void* out) {
    const EmbeddingBlocks* e = &s->embedding_blocks;
    const int64_t H = s->hidden;
    if (!e->quants) {
        memcpy(out, (const char*)s->embedding + t * H * s->elem_size, H * s->elem_size);
        return;
    }
    e->dequantize(e->quants + t * e->row_bytes, e->scales + t * e->row_scales_bytes,
                  e->mins ? e->mins + t * e->row_mins_bytes : NULL, e->row, 1, H);
    if (s->elem_size == sizeof(float)) {
        memcpy(out, e->row, H * sizeof(float));
    } else {
        for (int64_t i = 0; i < H; i++) ((uint16_t*)out)[i] = float_to_bf16(e->row[i]);
    }
}

static inline char* row(void* base, int64_t r, int64_t width, int64_t elem) { return (char*)base + r * width * elem; }

// out = p(x), plus each row's LoRA delta when the step has adapter rows (`lora_slots`, -1: none)
static inline void linear(const DecodeStack* s, const QuantizedLinear* p, const void* x, void* out, int64_t rows,
                          const int64_t* lora_slots) {
    char* columns = out;
    for (int64_t i = 0; i < p->num_segments; i++) {
        const QuantizedSegment* g = &p->segments[i];
        const quantized_linear_fn fn = rows <= p->few_rows ? g->fn : g->many_rows_fn;
        fn(g->quants, g->scales, g->mins, g->bias, x, columns, rows, g->out_features, p->in_features, p->out_features);
        columns += g->out_features * s->elem_size;
    }
    if (lora_slots && p->lora.a) {
        s->lora_add(x, out, p->lora.a, p->lora.b, p->lora.cols, p->lora.ranks, lora_slots, rows, p->out_features,
                    p->in_features);
    }
}

// Hidden states after the final norm, [rows, hidden] into `out`, of `rows` query rows: token_ids and positions
// per row; row b attends through block table b (max_blocks wide), or row_tables[b] when given, to the first
// context_lens[b] tokens of its sequence, its own included. Without row_tables each row is its sequence's
// one new token, whose K/V the attention kernel stores at context_lens[b] - 1; with them, rows of one
// sequence (drafts being verified, a prefill chunk) read each other's new K/V, so all are first stored at
// their `slots`. `lora_slots` (NULL: none) gives each row's LoRA adapter slot.
void decode_stack(const DecodeStack* s, const int64_t* token_ids, const int64_t* positions,
                  const int64_t* block_tables, const int64_t* row_tables, const int64_t* context_lens,
                  const int64_t* slots, const int64_t* lora_slots, int64_t rows, int64_t max_blocks, void* out) {
    const int64_t E = s->elem_size, H = s->hidden, d = s->head_dim, rd = s->rotary_dim, half = rd / 2;
    const int64_t Q = s->heads * d, KV = s->kv_heads * d, QKV = Q + 2 * KV;
    for (int64_t r = 0; r < rows; r++) embed(s, token_ids[r], row(s->residual, r, H, E));
    if (s->embedding_scale != 1.0f) s->scale_elements(s->residual, rows * H, s->embedding_scale);
    const float* rows_of = NULL;  // the table cos_rows and sin_rows hold this step's positions of
    for (int64_t i = 0; i < s->num_layers; i++) {
        const DecoderLayer* L = &s->layers[i];
        if (L->cos != rows_of) {
            for (int64_t r = 0; r < rows; r++) {
                memcpy(s->cos_rows + r * half, L->cos + positions[r] * half, half * sizeof(float));
                memcpy(s->sin_rows + r * half, L->sin + positions[r] * half, half * sizeof(float));
            }
            rows_of = L->cos;
        }
        if (i == 0) {  // the residual stream starts as the embeddings
            s->rms_norm(s->residual, NULL, L->input_norm, s->h, rows, H, H, s->eps);
        } else {  // residual += x, h = norm(residual)
            s->rms_norm(s->x, s->residual, L->input_norm, s->h, rows, H, H, s->eps);
        }
        linear(s, &L->qkv, s->h, s->qkv, rows, lora_slots);
        if (L->q_norm) {  // each head of q and k normalized into q and k, which rotate apart (the model's order)
            for (int64_t r = 0; r < rows; r++) {
                const char* src = row(s->qkv, r, QKV, E);
                s->rms_norm(src, NULL, L->q_norm, row(s->q, r, Q, E), s->heads, d, d, s->eps);
                s->rms_norm(src + Q * E, NULL, L->k_norm, row(s->k, r, KV, E), s->kv_heads, d, d, s->eps);
                memcpy(row(s->v, r, KV, E), src + (Q + KV) * E, KV * E);
            }
            s->rotary(s->q, s->cos_rows, s->sin_rows, rows, s->heads, rd, d, Q);
            s->rotary(s->k, s->cos_rows, s->sin_rows, rows, s->kv_heads, rd, d, KV);
        } else {
            s->rotary(s->qkv, s->cos_rows, s->sin_rows, rows, s->heads + s->kv_heads, rd, d, QKV);
            for (int64_t r = 0; r < rows; r++) {  // the kernel takes q, k and v each contiguous
                const char* src = row(s->qkv, r, QKV, E);
                memcpy(row(s->q, r, Q, E), src, Q * E);
                memcpy(row(s->k, r, KV, E), src + Q * E, KV * E);
                memcpy(row(s->v, r, KV, E), src + (Q + KV) * E, KV * E);
            }
        }
        if (row_tables) {
            s->write_kv(s->k, s->v, L->k_cache, L->v_cache, slots, rows, s->kv_heads, s->num_blocks, s->block_size, d,
                        E);
        }
        s->paged_decode(s->q, row_tables ? NULL : s->k, row_tables ? NULL : s->v, L->k_cache, L->v_cache, block_tables,
                        row_tables, context_lens, s->attn, rows, s->heads, s->kv_heads, s->num_blocks, s->block_size, d,
                        max_blocks, s->scale, L->window, s->softcap);
        linear(s, &L->o, s->attn, s->x, rows, lora_slots);
        if (L->attention_out_norm) s->rms_norm(s->x, NULL, L->attention_out_norm, s->x, rows, H, H, s->eps);
        if (s->residual_scale != 1.0f) s->scale_elements(s->x, rows * H, s->residual_scale);
        s->rms_norm(s->x, s->residual, L->pre_mlp_norm, s->h, rows, H, H, s->eps);
        linear(s, &L->gate_up, s->h, s->gate_up, rows, lora_slots);
        s->act_and_mul(s->gate_up, s->act, rows, s->intermediate);
        linear(s, &L->down, s->act, s->x, rows, lora_slots);
        if (L->mlp_out_norm) s->rms_norm(s->x, NULL, L->mlp_out_norm, s->x, rows, H, H, s->eps);
        if (s->residual_scale != 1.0f) s->scale_elements(s->x, rows * H, s->residual_scale);
    }
    s->rms_norm(s->x, s->residual, s->final_norm, out, rows, H, H, s->eps);
}
