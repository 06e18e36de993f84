"""Incremental detokenization and stop-string matching for one output sequence.

Decoding every new token alone breaks multi-byte characters and word-piece spacing, and decoding the
whole output each step is quadratic; this keeps a small window (`prefix_offset`..) and emits text only
once it is complete (no trailing U+FFFD).
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Any, stop: list[str], include_stop: bool = False, skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop  # the text ends after the stop string instead of before it
        self.hold_back = max((len(s) for s in stop), default=1) - 1
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.sent = 0  # characters of `text` already handed out by `take_delta`

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int, find_stop: bool = True) -> str | None:
        """Append a token; return the stop string it completed, if any (the text is cut before it, or after it
        with `include_stop`). Without `find_stop` (below `min_tokens`), stop strings in the text so far are
        let through."""
        self.tokens.append(token_id)
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        new_text = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        search_from = max(0, len(self.text) - self.hold_back)
        self.text += new_text
        return self._find_stop(search_from) if find_stop else None

    def _find_stop(self, search_from: int) -> str | None:
        best: tuple[int, str] | None = None
        for stop in self.stop:
            at = self.text.find(stop, search_from)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        self.text = self.text[: at + len(stop) if self.include_stop else at]
        return stop

    def take_delta(self, finished: bool) -> str:
        """New text since the last call; while running, holds back what could still begin a stop string."""
        end = len(self.text) if finished else max(self.sent, len(self.text) - self.hold_back)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta
