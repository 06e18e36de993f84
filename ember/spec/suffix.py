"""Suffix drafting across requests: what agent loops re-generate most is what other requests already said.

A depth-bounded suffix trie over the prompts and outputs of recent requests, keyed backwards: the path
root -> t[i-1] -> t[i-2] -> ... reaches a node for every context of up to `max_depth` tokens that
preceded position i, and that node counts which tokens followed the context. Drafting walks the
request's own tail down the trie, takes the deepest matching context, and extends the draft greedily
with the most frequent continuation. The draft stops when its estimated probability (the product of
each step's frequency share) falls below `min_probability`, so a context seen once and always
continued the same way drafts long, and a context with diverse continuations drafts short or not at all.

Memory is bounded: once more than `max_tokens` tokens are indexed, the oldest request's tokens are
removed from the counts (and empty nodes pruned).
"""

from __future__ import annotations

from collections import OrderedDict

from ember.engine.request import Request


class Node:
    __slots__ = ("children", "counts", "total")

    def __init__(self) -> None:
        self.children: dict[int, Node] = {}
        self.counts: dict[int, int] = {}
        self.total = 0


class SuffixIndex:
    def __init__(self, max_depth: int = 8, max_tokens: int = 65536) -> None:
        self.max_depth = max_depth
        self.max_tokens = max_tokens
        self.root = Node()
        self.sequences: OrderedDict[str, list[int]] = OrderedDict()  # indexed tokens per sequence, oldest first
        self.num_tokens = 0

    def extend(self, key: str, tokens: list[int]) -> None:
        """Index the tokens of sequence `key` that are new since the last call (sequences only grow)."""
        indexed = self.sequences.setdefault(key, [])
        self.sequences.move_to_end(key)
        start = len(indexed)
        indexed.extend(tokens[start:])
        for i in range(start, len(indexed)):
            self._insert(indexed, i)
        self.num_tokens += len(indexed) - start
        while self.num_tokens > self.max_tokens and len(self.sequences) > 1:
            self._forget_oldest()

    def _insert(self, tokens: list[int], i: int) -> None:
        """Count tokens[i] under each of its contexts (the hot path: runs for every indexed token)."""
        node, token = self.root, tokens[i]
        for context_token in reversed(tokens[max(0, i - self.max_depth) : i]):
            child = node.children.get(context_token)
            if child is None:
                child = node.children[context_token] = Node()
            node = child
            counts = node.counts
            counts[token] = counts.get(token, 0) + 1
            node.total += 1

    def _remove(self, tokens: list[int], i: int) -> None:
        """Undo `_insert(tokens, i)`, pruning the nodes it leaves empty."""
        node, token = self.root, tokens[i]
        path = []
        for context_token in reversed(tokens[max(0, i - self.max_depth) : i]):
            child = node.children.get(context_token)
            if child is None:
                break
            path.append((node, context_token, child))
            node = child
            count = node.counts.get(token, 0) - 1
            if count > 0:
                node.counts[token] = count
            else:
                node.counts.pop(token, None)
            node.total -= 1
        for parent, context_token, child in reversed(path):  # deepest first
            if child.total <= 0 and not child.children:
                del parent.children[context_token]

    def _forget_oldest(self) -> None:
        _, tokens = self.sequences.popitem(last=False)
        for i in range(len(tokens)):
            self._remove(tokens, i)
        self.num_tokens -= len(tokens)

    def forget(self, key: str) -> None:
        """Stop extending `key`; its tokens stay indexed (as history for other requests) until evicted."""
        tokens = self.sequences.pop(key, None)
        if tokens is not None:
            self.sequences[f"done:{key}:{id(tokens)}"] = tokens

    def continuation(self, context: list[int]) -> tuple[int, float] | None:
        """Most frequent next token after the deepest indexed suffix of `context`, and its frequency share."""
        node, best = self.root, None
        for depth in range(1, min(self.max_depth, len(context)) + 1):
            node = node.children.get(context[-depth])
            if node is None:
                break
            if node.total > 0:
                best = node
        if best is None:
            return None
        token, count = max(best.counts.items(), key=lambda item: item[1])
        return token, count / best.total

    def draft(self, context: list[int], max_length: int, min_probability: float) -> list[int]:
        tail = context[-self.max_depth :]
        draft: list[int] = []
        probability = 1.0
        while len(draft) < max_length:
            found = self.continuation(tail)
            if found is None:
                break
            token, share = found
            probability *= share
            if probability < min_probability:
                break
            draft.append(token)
            tail = [*tail[1:], token] if len(tail) >= self.max_depth else [*tail, token]
        return draft


class SuffixProposer:
    def __init__(self, max_depth: int = 8, max_tokens: int = 65536, min_probability: float = 0.3) -> None:
        self.index = SuffixIndex(max_depth, max_tokens)
        self.min_probability = min_probability

    def propose(self, requests: list[Request], max_lengths: list[int]) -> list[list[int]]:
        drafts = []
        for request, k in zip(requests, max_lengths, strict=True):
            self.index.extend(request.request_id, request.all_token_ids)
            drafts.append(self.index.draft(request.all_token_ids, k, self.min_probability) if k > 0 else [])
        return drafts

    def finish(self, request: Request) -> None:
        self.index.extend(request.request_id, request.all_token_ids)
        self.index.forget(request.request_id)
