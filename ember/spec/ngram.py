"""Prompt lookup (n-gram) drafting: find the request's last n tokens earlier in its own prompt or output,
and propose what followed them there. Free to run, and strong whenever the output quotes its context
(code being edited, JSON being echoed, tool results being cited)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ember.engine.request import Request


class NgramProposer:
    def __init__(self, max_ngram: int = 4, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, requests: list[Request], max_lengths: list[int]) -> list[list[int]]:
        return [self.lookup(r.all_token_ids, k) for r, k in zip(requests, max_lengths, strict=True)]

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Continuation of the most recent earlier occurrence of the longest matching suffix (n-gram)."""
        if k <= 0 or len(tokens) <= self.min_ngram:
            return []
        array = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            windows = sliding_window_view(array[:-1], n)  # every earlier n-gram, the suffix itself excluded
            hits = np.flatnonzero((windows == array[-n:]).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return tokens[start : start + k]
        return []

    def finish(self, request: Request) -> None:
        pass
