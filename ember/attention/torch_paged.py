"""Paged attention in plain PyTorch: the CPU backend and the reference for the GPU kernels.

The KV cache of one layer: values [num_kv_heads, num_blocks, block_size, head_dim], keys
[num_kv_heads, num_blocks, head_dim, block_size] (each block transposed, the layout Ember's C decode
kernel reads best). Heads are outermost so a request's blocks gather into [kv_heads, context, head_dim].
Decode attention is bound by memory traffic: the C kernel reads each cached row once, the PyTorch
fallback here must gather (copy) the context first.
A step's tokens arrive flattened; decodes (one query token each) come first and are attended in one
batched matmul over their gathered blocks, prefill chunks follow, one SDPA call each.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.attention import cpu_kernels


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
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int64, padded with block 0
    decode_context_lens: torch.Tensor | None  # [num_decodes] int64
    prefills: list[PrefillSpan]
    block_size: int
    use_native_decode: bool  # Ember's C kernels (CPU, fp32/bf16) for cache writes and decode attention

    @functools.cached_property
    def slot_blocks(self) -> torch.Tensor:
        """Block of each new token's slot (PyTorch write path only, computed once a step when needed)."""
        return self.slot_mapping // self.block_size

    @functools.cached_property
    def slot_offsets(self) -> torch.Tensor:
        return self.slot_mapping % self.block_size

    @functools.cached_property
    def decode_bias(self) -> torch.Tensor:
        """[1, num_decodes, 1, max_blocks * block_size]: 0 inside each context, -inf past it (built once a step)."""
        assert self.decode_block_tables is not None and self.decode_context_lens is not None
        keys = torch.arange(self.decode_block_tables.shape[1] * self.block_size, device=self.slot_mapping.device)
        bias = torch.zeros(len(self.decode_context_lens), len(keys), device=keys.device)
        bias.masked_fill_(keys.unsqueeze(0) >= self.decode_context_lens.unsqueeze(1), float("-inf"))
        return bias.view(1, len(self.decode_context_lens), 1, -1)


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
) -> None:
    """Scatter the step's new keys/values ([num_tokens, kv_heads, head_dim]) into their cache slots."""
    if meta.use_native_decode:
        cpu_kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return
    kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.transpose(2, 3)[:, meta.slot_blocks, meta.slot_offsets] = k.transpose(0, 1)
    v_cache.view(kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))


def gather_keys(k_cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """One request's first `context_len` cached keys: [kv_heads, context_len, head_dim]."""
    return k_cache.index_select(1, block_table).transpose(2, 3).flatten(1, 2)[:, :context_len]


def gather_values(v_cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """One request's first `context_len` cached values: [kv_heads, context_len, head_dim]."""
    return v_cache.index_select(1, block_table).flatten(1, 2)[:, :context_len]


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
    kv_heads, _, block_size, _ = v_cache.shape
    group = num_heads // kv_heads
    shape = (kv_heads, num_decodes, block_tables.shape[1] * block_size, head_dim)
    k = k_cache.index_select(1, block_tables.flatten()).transpose(2, 3).reshape(shape)  # [kv_heads, D, L, d]
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


def attend_decodes(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
    if meta.use_native_decode:
        return cpu_kernels.paged_decode_attention(
            q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale
        )
    return decode_attention(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_bias, scale)


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
    write_kv(k_cache, v_cache, k, v, meta)
    num_decodes = meta.num_decode_tokens
    if not meta.prefills:
        return attend_decodes(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    if num_decodes:
        out[:num_decodes] = attend_decodes(q[:num_decodes], k_cache, v_cache, meta, scale)
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.length)
        if span.causal_mask is None:  # the whole context is this chunk: use the fresh K/V directly
            keys, values = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
        else:
            keys = gather_keys(k_cache, span.block_table, span.context_len)
            values = gather_values(v_cache, span.block_table, span.context_len)
        out[rows] = prefill_attention(q[rows], keys, values, span.causal_mask, scale)
    return out
