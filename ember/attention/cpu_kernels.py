"""Ctypes wrappers of Ember's C paged-attention kernels (`ember/kernels/csrc/paged_attention.c`)."""

from __future__ import annotations

import torch

from ember.attention.layout import cache_geometry
from ember.kernels.native import load


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new keys/values [T, kv_heads, head_dim] at their slots (caches in the layout of `torch_paged`)."""
    library = load()
    assert library is not None and slot_mapping.dtype == torch.int64
    k, v = k.contiguous(), v.contiguous()
    kv_heads, num_blocks, block_size, head_dim, _ = cache_geometry(v_cache)
    library.write_kv(
        k.data_ptr(),
        v.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slot_mapping.data_ptr(),
        k.shape[0],
        kv_heads,
        num_blocks,
        block_size,
        head_dim,
        k.element_size(),
    )


def fast_bf16_attention(block_size: int, head_dim: int) -> bool:
    """Whether the bf16 kernel runs its AVX512-BF16 path for this cache shape."""
    library = load()
    return library is not None and bool(library.has_avx512bf16()) and block_size % 16 == 0 and head_dim % 64 == 0


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    row_tables: torch.Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Query rows [D, heads, head_dim], row b attending to the first context_lens[b] cached tokens (their last
    `window` under a sliding window; 0: all), scores soft-capped at `softcap` (Gemma 2's; 0: not).

    Row b reads block table `row_tables[b]` (default: table b). With `k_new`/`v_new` ([D, kv_heads,
    head_dim]) each row's new K/V are first stored at its last position (context_len - 1); rows that
    share a table must have theirs stored beforehand instead.
    """
    library = load()
    assert library is not None
    kernel = library.paged_decode_bf16 if q.dtype == torch.bfloat16 else library.paged_decode_f32
    if q.dtype not in (torch.bfloat16, torch.float32) or k_cache.dtype != q.dtype:
        raise TypeError(f"paged decode kernel supports float32 and bfloat16, got {q.dtype} / {k_cache.dtype}")
    q = q.contiguous()
    out = torch.empty_like(q)
    num_decodes, num_heads, head_dim = q.shape
    kv_heads, num_blocks, block_size, _, _ = cache_geometry(v_cache)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert block_tables.dtype == torch.int64 and context_lens.dtype == torch.int64
    if k_new is not None and v_new is not None:
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    kernel(
        q.data_ptr(),
        None if k_new is None else k_new.data_ptr(),
        None if v_new is None else v_new.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        None if row_tables is None else row_tables.data_ptr(),
        context_lens.data_ptr(),
        out.data_ptr(),
        num_decodes,
        num_heads,
        kv_heads,
        num_blocks,
        block_size,
        head_dim,
        block_tables.shape[1],
        scale,
        window,
        softcap,
    )
    return out
