"""Paged attention on Ember's Triton kernels: the CUDA backend of `torch_paged.paged_attention`.

One step is three launches whatever the batch: the KV write, flash-decoding over all decode rows, and
one ragged causal prefill over all prefill chunks (their cached prefixes read through the block tables).
"""

from __future__ import annotations

import torch

from ember.attention.torch_paged import AttentionMetadata


def triton_paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    from ember.kernels import triton_attention as kernels

    kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    decodes = meta.num_decode_tokens
    if decodes:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        out[:decodes] = kernels.paged_decode_attention(
            q[:decodes],
            k_cache,
            v_cache,
            meta.decode_row_block_tables,
            meta.decode_context_lens,
            scale,
            window=window,
            softcap=softcap,
        )
    if meta.prefills:
        launch = meta.prefill_launch
        out[decodes:] = kernels.paged_prefill_attention(
            q[decodes:], k_cache, v_cache, meta.prefill_block_tables, launch, scale, window, softcap
        )
    return out
