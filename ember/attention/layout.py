"""The paged KV cache's memory layout, shared by the PyTorch, C and Triton attention paths.

One layer, with P values packed together: keys [kv_heads, num_blocks, head_dim / P, block_size, P] (each
block transposed in groups of P dims), values [kv_heads, num_blocks, block_size / P, head_dim, P] (P tokens
interleaved per dim). On the CPU a group is one 32-bit word (P = 2 for bf16): the two elements one
AVX512-BF16 dot product consumes. On CUDA it is one 16-byte vector (P = 8 for bf16), the widest load a
thread issues: a key tile loads as 16-byte vectors along dims, a value tile along tokens (vLLM's original
paged-attention key layout). Every kernel reads P from the cache's shape.
"""

from __future__ import annotations

import torch


def pack_factor(dtype: torch.dtype, device: torch.device) -> int:
    """Elements of `dtype` in one packed group: a 32-bit word on the CPU, a 16-byte vector on CUDA."""
    group_bytes = 16 if device.type == "cuda" else 4
    return max(1, group_bytes // torch.empty(0, dtype=dtype).element_size())


def cache_views(layer_cache: torch.Tensor, pack: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views, in the cache layout, of one layer's storage [2, kv_heads, blocks, block_size, dim];
    `pack` defaults to the storage's device's `pack_factor`."""
    _, kv_heads, num_blocks, block_size, head_dim = layer_cache.shape
    pack = pack or pack_factor(layer_cache.dtype, layer_cache.device)
    if block_size % pack or head_dim % pack:
        raise ValueError(f"block_size and head_dim must be multiples of {pack} for a {layer_cache.dtype} KV cache")
    keys = layer_cache[0].view(kv_heads, num_blocks, head_dim // pack, block_size, pack)
    values = layer_cache[1].view(kv_heads, num_blocks, block_size // pack, head_dim, pack)
    return keys, values


def to_cache_layout(
    keys: torch.Tensor, values: torch.Tensor, pack: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache-layout copies of plain blocks [kv_heads, blocks, block_size, dim] (for tests and tools)."""
    storage = torch.stack((keys, values)).contiguous()
    k_view, v_view = cache_views(storage, pack)
    pack = k_view.shape[-1]
    k_view.copy_(keys.unflatten(3, (-1, pack)).permute(0, 1, 3, 2, 4))
    v_view.copy_(values.unflatten(2, (-1, pack)).permute(0, 1, 2, 4, 3))
    return k_view, v_view


def cache_geometry(v_cache: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(kv_heads, num_blocks, block_size, head_dim, pack) of a value cache in this layout."""
    kv_heads, num_blocks, block_words, head_dim, pack = v_cache.shape
    return kv_heads, num_blocks, block_words * pack, head_dim, pack
