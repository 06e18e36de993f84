"""From a step's fused QKV projection to attention's inputs in one Triton kernel (the CUDA path): the per-head
q/k RMSNorms (Qwen3's, Gemma 3's), the rotary embedding of q and k, and the store of the new keys and values
into the paged cache; the queries come back contiguous.

Apart, that is up to eight launches a layer (the norms' input copies, two norms, two rotations, the value copy,
the cache write), each reading and writing the step's heads again; in a decode step of a small model at batch
256 they are small kernels whose launch gaps and extra trips through memory add up over the layers. Same fp32
math and rounding points as the separate kernels (`triton_elementwise`, `triton_attention.write_kv`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ember.attention.layout import cache_geometry
from ember.kernels.triton_attention import slot_key_offsets, slot_value_offsets, to_cache_dtype
from ember.kernels.triton_elementwise import rotate_first, rotate_second, scale_normalized


@triton.jit
def _qkv_to_cache_kernel(
    qkv, q_out, q_weight, k_weight, cos, sin, k_cache, v_cache, slots, row_stride, eps, H, KVH, NB,
    HALF: tl.constexpr, QK_PAD: tl.constexpr, KV_PAD: tl.constexpr, BS: tl.constexpr, P: tl.constexpr,
    NORM: tl.constexpr, UNIT_OFFSET: tl.constexpr,
):  # fmt: skip
    """One program per token: its query and key heads as a [heads, head_dim / 2] tile per half (the rows of a
    QKV projection hold the q heads, then the k heads, then the v heads), then its value heads."""
    t = tl.program_id(0)
    D: tl.constexpr = 2 * HALF
    dtype = q_out.dtype.element_ty
    head = tl.arange(0, QK_PAD)[:, None]  # q heads, then k heads
    i = tl.arange(0, HALF)[None, :]
    qk_ok = head < H + KVH
    is_query = head < H
    first = qkv + t * row_stride + head * D + i
    x1 = tl.load(first, mask=qk_ok, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=qk_ok, other=0.0).to(tl.float32)
    if NORM:  # each head normalized over its dims, scaled by the q or the k weight
        inv = (1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps))[:, None]
        w1 = tl.where(is_query, tl.load(q_weight + i), tl.load(k_weight + i))
        w2 = tl.where(is_query, tl.load(q_weight + HALF + i), tl.load(k_weight + HALF + i))
        x1 = scale_normalized(x1 * inv, w1, UNIT_OFFSET, dtype).to(tl.float32)
        x2 = scale_normalized(x2 * inv, w2, UNIT_OFFSET, dtype).to(tl.float32)
    c = tl.load(cos + t * HALF + i)
    s = tl.load(sin + t * HALF + i)
    r1 = rotate_first(x1, x2, c, s).to(dtype)
    r2 = rotate_second(x1, x2, c, s).to(dtype)
    q_rows = q_out + (t * H + head) * D + i
    tl.store(q_rows, r1, mask=is_query)
    tl.store(q_rows + HALF, r2, mask=is_query)
    # slot -1 (a padding row of a CUDA-graph batch) stores nothing; the test is a tensor for Triton's interpreter
    slot = tl.load(slots + t)
    block = slot // BS
    offset = slot % BS
    is_key = qk_ok & (head >= H) & (i * 0 + slot >= 0)
    key_block = k_cache + ((head - H) * NB + block) * D * BS
    cache_dtype = k_cache.dtype.element_ty
    tl.store(key_block + slot_key_offsets(offset, i, BS, P), to_cache_dtype(r1, cache_dtype), mask=is_key)
    tl.store(key_block + slot_key_offsets(offset, i + HALF, BS, P), to_cache_dtype(r2, cache_dtype), mask=is_key)
    kv_head = tl.arange(0, KV_PAD)[:, None]
    dims = tl.arange(0, D)[None, :]
    is_value = (kv_head < KVH) & (dims * 0 + slot >= 0)
    values = to_cache_dtype(tl.load(qkv + t * row_stride + (H + KVH + kv_head) * D + dims, mask=is_value), cache_dtype)
    value_block = v_cache + (kv_head * NB + block) * D * BS
    tl.store(value_block + slot_value_offsets(offset, dims, D, P), values, mask=is_value)


def qkv_to_cache(
    qkv: torch.Tensor,
    num_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    unit_offset: bool = False,
) -> torch.Tensor:
    """Queries [T, heads, head_dim] from QKV rows [T, (heads + 2 kv_heads) * head_dim] (unit stride along a row):
    q and k normalized per head when the norms' weights are given (`unit_offset`: Gemma's), both rotated over the
    whole head by cos/sin [T, head_dim / 2], keys and values stored at their slots (negative slots: none)."""
    kv_heads, num_blocks, block_size, head_dim, pack = cache_geometry(v_cache)
    tokens = qkv.shape[0]
    assert qkv.stride(1) == 1 and qkv.shape[1] == (num_heads + 2 * kv_heads) * head_dim
    q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q
    norm = q_weight is not None and k_weight is not None
    _qkv_to_cache_kernel[(tokens,)](
        qkv, q, q_weight if norm else qkv, k_weight if norm else qkv, cos.contiguous(), sin.contiguous(),
        k_cache, v_cache, slot_mapping, qkv.stride(0), eps, num_heads, kv_heads, num_blocks,
        HALF=head_dim // 2, QK_PAD=triton.next_power_of_2(num_heads + kv_heads),
        KV_PAD=triton.next_power_of_2(kv_heads), BS=block_size, P=pack, NORM=norm, UNIT_OFFSET=unit_offset,
    )  # fmt: skip
    return q
