"""The oracle of the top-k/top-p filters: the whole vocabulary sorted, written out as plainly as possible."""

from __future__ import annotations

import torch


def drop_by_sorting(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """True for every token outside its row's top-k (0 or more than the vocabulary: none), or outside the top-p
    nucleus (1.0: none) of its renormalized top-k distribution, by ranks of a sort."""
    vocab = logits.shape[1]
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=logits.device).unsqueeze(1)
    ps = torch.tensor([p if p < 1.0 else float("inf") for p in top_ps], device=logits.device).unsqueeze(1)
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    drop_sorted = torch.arange(vocab, device=logits.device).unsqueeze(0) >= ks
    probs = torch.softmax(sorted_logits.masked_fill(drop_sorted, float("-inf")), dim=-1)
    drop_sorted |= probs.cumsum(dim=-1) - probs >= ps
    return torch.zeros_like(drop_sorted).scatter_(1, sorted_ids, drop_sorted)


def kept_by_sorting(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """Tokens at or above the smallest logit the sort keeps (a sort keeps an arbitrary k of the tokens tied at
    the threshold; the threshold filters keep them all); rows with no filter keep everything."""
    smallest = logits.masked_fill(drop_by_sorting(logits, top_ks, top_ps), float("inf")).min(dim=1, keepdim=True)
    return logits >= smallest.values
