"""Paged attention in plain PyTorch: the CPU backend and the reference for the GPU kernels.

The KV cache of one layer is a pair of tensors shaped [num_kv_heads, num_blocks, block_size, head_dim]:
heads outermost, so gathering a request's blocks yields [kv_heads, context, head_dim] with no further
copy, the layout both SDPA and batched matmul read directly. Memory traffic, not FLOPs, bounds decode
attention on the CPU, so the context is copied once (the gather) and read once.
A step's tokens arrive flattened; decodes (one query token each) come first and are attended in one
batched matmul over their gathered blocks, prefill chunks follow, one SDPA call each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    """One request's chunk of query tokens: rows [start, start+length) attend to `context_len` keys."""

    start: int
    length: int
    context_len: int
    block_table: torch.Tensor  # [num_blocks_for_context] block ids
    causal_mask: torch.Tensor | None  # [length, context_len] bool, None when the chunk has no prefix


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot of every new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks], padded with block 0
    decode_bias: torch.Tensor | None  # [1, num_decodes, 1, max_blocks * block_size], 0 or -inf
    prefills: list[PrefillSpan]


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter the step's new keys/values ([num_tokens, kv_heads, head_dim]) into their cache slots."""
    kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(kv_heads, -1, head_dim).index_copy_(1, slot_mapping, k.transpose(0, 1))
    v_cache.view(kv_heads, -1, head_dim).index_copy_(1, slot_mapping, v.transpose(0, 1))


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """One request's first `context_len` cached rows: [kv_heads, context_len, head_dim]."""
    return cache.index_select(1, block_table).flatten(1, 2)[:, :context_len]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Single-token queries [D, heads, head_dim] over their paged contexts, GQA without repeating K/V."""
    num_decodes, num_heads, head_dim = q.shape
    kv_heads, _, block_size, _ = k_cache.shape
    group = num_heads // kv_heads
    shape = (kv_heads, num_decodes, block_tables.shape[1] * block_size, head_dim)
    k = k_cache.index_select(1, block_tables.flatten()).view(shape)  # [kv_heads, D, L, head_dim]
    v = v_cache.index_select(1, block_tables.flatten()).view(shape)
    qg = q.view(num_decodes, kv_heads, group, head_dim).transpose(0, 1)  # [kv_heads, D, group, head_dim]
    scores = torch.matmul(qg, k.transpose(2, 3)).float() * scale  # [kv_heads, D, group, L]
    probs = torch.softmax(scores + bias, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)  # [kv_heads, D, group, head_dim]
    return out.transpose(0, 1).reshape(num_decodes, num_heads, head_dim)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Causal attention of one chunk ([Lq, heads, d]) over its keys ([kv_heads, Lk, d])."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.unsqueeze(0),
        v.unsqueeze(0),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(0).transpose(0, 1)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend every query token to its request's context.

    q: [num_tokens, heads, head_dim]; k, v: [num_tokens, kv_heads, head_dim]. Returns q's shape.
    """
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    num_decodes = meta.num_decode_tokens
    if not meta.prefills:
        assert meta.decode_block_tables is not None and meta.decode_bias is not None
        return decode_attention(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_bias, scale)
    out = torch.empty_like(q)
    if num_decodes:
        assert meta.decode_block_tables is not None and meta.decode_bias is not None
        out[:num_decodes] = decode_attention(
            q[:num_decodes], k_cache, v_cache, meta.decode_block_tables, meta.decode_bias, scale
        )
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.length)
        if span.causal_mask is None:  # the whole context is this chunk: use the fresh K/V directly
            keys, values = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
        else:
            keys = gather_context(k_cache, span.block_table, span.context_len)
            values = gather_context(v_cache, span.block_table, span.context_len)
        out[rows] = prefill_attention(q[rows], keys, values, span.causal_mask, scale)
    return out
