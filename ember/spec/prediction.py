"""Drafts from a predicted output: OpenAI's `prediction`, the text a client expects the reply to repeat.

A code editor that asks for a file back with a few lines changed knows most of the reply already. Its
prediction becomes the drafts of speculative decoding, so the target model verifies several tokens per step
instead of writing one; the output is the model's own either way. Where the reply follows the prediction, a
cursor moves along it and the drafts are what comes next. Where the reply departs from it (the edited lines),
the cursor is lost until the reply's last tokens are found in the prediction again: the first occurrence
after the point it left, since an edited file rejoins its old text further on.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ember.engine.request import Request

MAX_NGRAM = 4  # the longest tail of the reply looked for in the prediction to find its place again
MIN_NGRAM = 2  # one common token (a blank, a bracket) would find many false places


class PredictedOutput:
    """One sample's prediction and its place in it."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.array = np.asarray(token_ids, dtype=np.int64)
        self.cursor: int | None = 0  # the prediction's next token, while the reply follows it; None when lost
        self.resume_from = 0  # where the reply last followed it: its place is looked for from here on first
        self.num_seen = 0  # output tokens already walked

    def drafts(self, request: Request, k: int) -> list[int]:
        """Up to `k` tokens of the prediction that would follow the request's output so far."""
        start = request.num_prompt_tokens + self.num_seen
        new = request.all_token_ids[start : request.num_committed_tokens]
        self.num_seen += len(new)
        for token in new:
            if self.cursor is not None and self.cursor < len(self.token_ids) and self.token_ids[self.cursor] == token:
                self.cursor += 1
            elif self.cursor is not None:
                self.resume_from, self.cursor = self.cursor, None
        if self.cursor is None:
            end = request.num_committed_tokens
            self.cursor = self.find_place(request.all_token_ids[max(request.num_prompt_tokens, end - MAX_NGRAM) : end])
        return self.token_ids[self.cursor : self.cursor + k] if self.cursor is not None else []

    def find_place(self, tail: list[int]) -> int | None:
        """Just after the longest end of `tail` (the output's last tokens, at least MIN_NGRAM of them) found in the
        prediction: its first occurrence from `resume_from` on, else its first anywhere; None when none occurs."""
        last = np.asarray(tail, dtype=np.int64)
        for n in range(min(len(last), len(self.token_ids)), MIN_NGRAM - 1, -1):
            hits = np.flatnonzero((sliding_window_view(self.array, n) == last[-n:]).all(axis=1)) + n
            if len(hits):
                ahead = hits[hits >= self.resume_from]
                return int(ahead[0] if len(ahead) else hits[0])
        return None
