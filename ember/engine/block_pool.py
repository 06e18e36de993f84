"""The pool of fixed-size KV-cache blocks: reference counts, an LRU free queue, and the prefix cache.

Blocks, not sequences, own memory. A full block may carry a hash that chains its parent's hash with its
token ids, so equal hashes mean equal whole prefixes; `cached` maps each hash to the block holding it.
A freed block goes to the tail of the free queue and keeps its hash, so a later request with the same
prefix can take it back (`touch`). Allocation takes from the head: the least recently freed block is
evicted first, and only then does it lose its hash. A block in use (ref count > 0) is never evicted.
A cached prefix may also carry its prompt logprobs, so that requests asking for them can hit the cache too.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ember.engine.request import TokenLogprob

BlockHash = int


@dataclass(frozen=True)
class BlockPromptLogprobs:
    """What a request asking for prompt logprobs needs of a cached block: the logprob (and `num_top` best
    alternatives) of each of its tokens under the prefix before it (the first block's first token has none),
    and the final hidden state of its last position, which scores whichever token comes next."""

    num_top: int
    entries: list[TokenLogprob]
    last_hidden: torch.Tensor


def hash_block(
    parent: BlockHash | None, token_ids: tuple[int, ...], lora_id: int = 0, salt: str | None = None
) -> BlockHash:
    """The hash of a full block: its parent's hash chained with its tokens. A first block (no parent) of a
    request with a LoRA adapter also hashes the adapter's id (the same tokens make other KV under it), and one
    with a cache salt the salt (its prefixes are found only by requests of that salt)."""
    root = ("namespace", lora_id, salt) if parent is None and (lora_id or salt is not None) else parent
    return hash((root, token_ids))


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[BlockHash | None] = [None] * num_blocks
        self.cached: dict[BlockHash, int] = {}
        self.prompt_logprobs: dict[BlockHash, BlockPromptLogprobs] = {}  # of cached prefixes, dropped with them
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request uses (some still hold a cached prefix until evicted)."""
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks in use by some request."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} KV blocks with only {len(self._free)} free")
        blocks = [self._free.popitem(last=False)[0] for _ in range(count)]
        for block in blocks:
            self._evict(block)
            self.ref_counts[block] = 1
        return blocks

    def _evict(self, block: int) -> None:
        block_hash = self.block_hashes[block]
        if block_hash is not None:
            if self.cached.get(block_hash) == block:
                del self.cached[block_hash]
                self.prompt_logprobs.pop(block_hash, None)
            self.block_hashes[block] = None

    def touch(self, blocks: list[int]) -> None:
        """Take a reference to cached blocks (a prefix-cache hit), pulling free ones off the free queue."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; tail blocks of a sequence go back first (evicted first)."""
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise RuntimeError(f"KV block {block} freed more often than allocated")
            if self.ref_counts[block] == 0:
                self._free[block] = None

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self.cached.get(block_hash)

    def cache(self, block: int, block_hash: BlockHash) -> None:
        """Record that `block` holds the prefix `block_hash` (the first block holding a prefix keeps it)."""
        if self.block_hashes[block] is None and block_hash not in self.cached:
            self.block_hashes[block] = block_hash
            self.cached[block_hash] = block

    def cache_prompt_logprobs(self, block_hash: BlockHash, data: BlockPromptLogprobs) -> None:
        """Attach prompt logprobs to a cached prefix (kept if they have as many alternatives already)."""
        held = self.prompt_logprobs.get(block_hash)
        if block_hash in self.cached and (held is None or held.num_top < data.num_top):
            self.prompt_logprobs[block_hash] = data

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; refused (False) while any block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        self.cached.clear()
        self.prompt_logprobs.clear()
        self.block_hashes = [None] * self.num_blocks
        return True
