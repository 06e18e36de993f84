"""Paged attention on Ember's Triton kernels: the CUDA backend of `torch_paged.paged_attention`.

One step is three launches whatever the batch: the KV write (or none: `triton_qkv` stores them with the
rotary embedding), flash-decoding over all decode rows, and one ragged causal prefill over all prefill chunks
(their cached prefixes read through the block tables).
"""

from __future__ import annotations

import torch

from ember.attention.torch_paged import AttentionMetadata


def triton_paged_attention(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """k, v None: this step's keys and values are in the cache already (`triton_qkv.qkv_to_cache`)."""
    from ember.kernels import triton_attention as kernels

    if k is not None and v is not None:
        kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    decodes = meta.num_decode_tokens
    # each kernel writes its rows of `out` (decodes first, then the prefill chunks): no copies
    out = q.new_empty(q.shape)
    if decodes:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        kernels.paged_decode_attention(
            q[:decodes],
            k_cache,
            v_cache,
            meta.decode_row_block_tables,
            meta.decode_context_lens,
            scale,
            window=window,
            softcap=softcap,
            out=out[:decodes],
            order=meta.decode_order,
        )
    if meta.prefills:
        launch = meta.prefill_launch
        kernels.paged_prefill_attention(
            q[decodes:], k_cache, v_cache, meta.prefill_block_tables, launch, scale, window, softcap, out=out[decodes:]
        )
    return out
