"""Decode-attention test cases shared by the C and Triton kernel tests: random block tables for ragged
context lengths, and the fp32 PyTorch reference output."""

from __future__ import annotations

import torch

from ember.attention.torch_paged import decode_attention


def context_bias(lens: torch.Tensor, num_keys: int, window: int = 0) -> torch.Tensor:
    """[1, rows, 1, num_keys]: 0 where row b sees key j (j < lens[b], and j >= lens[b] - window under a sliding
    window), -inf elsewhere: the reference's mask, written out key by key."""
    bias = torch.full((len(lens), num_keys), float("-inf"))
    for b, length in enumerate(lens.tolist()):
        first = max(0, length - window) if window else 0
        bias[b, first:length] = 0.0
    return bias.view(1, len(lens), 1, -1)


def decode_case(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: list[int],
    generator: torch.Generator,
    window: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(block tables [len(lengths), max_blocks], context lengths, reference output in fp32 on the CPU), each row
    seeing its last `window` tokens under a sliding window (0: all), scores capped at `softcap` (0: not)."""
    num_blocks, block_size = k_cache.shape[1], k_cache.shape[3]
    max_blocks = -(-max(lengths) // block_size)
    tables = torch.randperm(num_blocks, generator=generator)[: len(lengths) * max_blocks].view(len(lengths), -1)
    lens = torch.tensor(lengths)
    bias = context_bias(lens, max_blocks * block_size, window)
    caches = (k_cache.float().cpu(), v_cache.float().cpu())
    scale = q.shape[-1] ** -0.5
    reference = decode_attention(q.float().cpu(), *caches, tables, bias, scale, softcap)
    return tables, lens, reference
