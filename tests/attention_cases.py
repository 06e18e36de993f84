"""Decode-attention test cases shared by the C and Triton kernel tests: random block tables for ragged
context lengths, and the fp32 PyTorch reference output."""

from __future__ import annotations

import torch

from ember.attention.torch_paged import decode_attention


def decode_case(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: list[int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(block tables [len(lengths), max_blocks], context lengths, reference output in fp32 on the CPU)."""
    num_blocks, block_size = k_cache.shape[1], k_cache.shape[3]
    max_blocks = -(-max(lengths) // block_size)
    tables = torch.randperm(num_blocks, generator=generator)[: len(lengths) * max_blocks].view(len(lengths), -1)
    lens = torch.tensor(lengths)
    keys = torch.arange(max_blocks * block_size)
    bias = torch.zeros(len(lengths), len(keys)).masked_fill_(keys >= lens.unsqueeze(1), float("-inf"))
    caches = (k_cache.float().cpu(), v_cache.float().cpu())
    scale = q.shape[-1] ** -0.5
    reference = decode_attention(q.float().cpu(), *caches, tables, bias.view(1, len(lengths), 1, -1), scale)
    return tables, lens, reference
