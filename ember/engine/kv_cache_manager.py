"""Maps requests onto KV blocks: reuses cached prefix blocks, grows block tables as tokens are scheduled."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ember.engine.block_pool import BlockHash, BlockPool, BlockPromptLogprobs, hash_block
from ember.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found cached

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def block_hashes(self, request: Request) -> list[BlockHash]:
        """Hashes of the request's full blocks of committed tokens, extended incrementally as they grow."""
        hashes, bs = request.block_hashes, self.block_size
        tokens = request.all_token_ids
        while len(hashes) < request.num_committed_tokens // bs:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            block = tuple(tokens[i * bs : (i + 1) * bs])
            hashes.append(hash_block(parent, block, request.lora_id, request.cache_salt))
        return hashes

    def get_computed_blocks(self, request: Request) -> list[int]:
        """The longest cached prefix of a new request, as blocks. The last token is always left to
        compute (its logits or, for an embedding, its hidden state are needed); a request asking for prompt
        logprobs takes only blocks whose
        logprobs are cached with at least as many alternatives."""
        if not self.enable_prefix_caching or request.pooling == "mean":  # a mean needs every position's state
            return []
        num_top = request.params.prompt_logprobs
        blocks = []
        for block_hash in self.block_hashes(request)[: (request.num_tokens - 1) // self.block_size]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            if num_top is not None:
                logprobs = self.pool.prompt_logprobs.get(block_hash)
                if logprobs is None or logprobs.num_top < num_top:
                    break
            blocks.append(block)
        return blocks

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()) -> bool:
        """Make room for `num_new_tokens` more tokens of `request` after its computed (cached) blocks.

        Returns False, changing nothing, when the pool is short. Blocks that this step fills are
        registered in the prefix cache at once: their KV is written before any attention reads it.
        """
        bs = self.block_size
        if self.num_blocks_taken(request, num_new_tokens, computed_blocks) > self.pool.num_free_blocks:
            return False
        total = request.num_computed_tokens + len(computed_blocks) * bs + num_new_tokens
        needed = -(-total // bs) - len(request.block_ids) - len(computed_blocks)
        if computed_blocks:
            self.pool.touch(list(computed_blocks))
            request.block_ids.extend(computed_blocks)
            if request.params.prompt_logprobs is not None:
                self._restore_prompt_logprobs(request, len(computed_blocks))
        if needed > 0:
            request.block_ids.extend(self.pool.allocate(needed))
        if self.enable_prefix_caching:  # only blocks full of committed tokens: drafts may still be rejected
            full = min(total, request.num_committed_tokens) // bs
            if full > request.num_cached_blocks:
                self._cache_full_blocks(request, full)
        return True

    def allocate_decode_slots(self, requests: Sequence[Request]) -> bool:
        """`allocate_slots(request, 1)` for each of `requests` (decoding: no cached prefix to take), all or none:
        False, changing nothing, when the pool is short. One pass and one allocation for a step of decodes, where
        per request calls cost more than a decode's usual case (no new block, nothing to cache) does."""
        bs = self.block_size
        growing = [r for r in requests if r.num_computed_tokens >= len(r.block_ids) * bs]
        if len(growing) > self.pool.num_free_blocks:
            return False
        if growing:
            for request, block in zip(growing, self.pool.allocate(len(growing)), strict=True):
                request.block_ids.append(block)
        if self.enable_prefix_caching:  # only blocks full of committed tokens: drafts may still be rejected
            for request in requests:
                full = min(request.num_computed_tokens + 1, request.num_committed_tokens) // bs
                if full > request.num_cached_blocks:
                    self._cache_full_blocks(request, full)
        return True

    def _cache_full_blocks(self, request: Request, full: int) -> None:
        """Register the request's blocks up to `full` (counted from the start) in the prefix cache."""
        hashes = self.block_hashes(request)
        for i in range(request.num_cached_blocks, full):
            self.pool.cache(request.block_ids[i], hashes[i])
        request.num_cached_blocks = full

    def _restore_prompt_logprobs(self, request: Request, num_blocks: int) -> None:
        """A cache hit of a request asking for prompt logprobs: the cached blocks' logprobs become its own (top
        alternatives cut to its count), and the last block's hidden state will score the first computed token."""
        num_top = request.params.prompt_logprobs
        assert num_top is not None
        cached = [self.pool.prompt_logprobs[h] for h in request.block_hashes[:num_blocks]]
        entries = [entry for block in cached for entry in block.entries]  # num_blocks * block_size - 1 of them
        known = len(request.prompt_logprobs)  # a preempted request keeps what it computed
        request.prompt_logprobs.extend(
            entry if len(entry.top) <= num_top else dataclasses.replace(entry, top=entry.top[:num_top])
            for entry in entries[known:]
        )
        boundary_needed = len(request.prompt_logprobs) == len(entries)
        request.prompt_boundary_hidden = cached[-1].last_hidden if boundary_needed else None

    def cache_prompt_logprobs(self, request: Request) -> None:
        """Attach the prompt logprobs of the request's full prompt blocks, once all are known, to their cached
        prefixes (after the step that computed them)."""
        if not self.enable_prefix_caching:
            request.prompt_block_hidden.clear()
            return
        bs, num_top = self.block_size, request.params.prompt_logprobs
        assert num_top is not None
        hashes = self.block_hashes(request)
        for index in sorted(request.prompt_block_hidden):
            end = (index + 1) * bs - 1  # entries of the block's tokens: [index * bs - 1, end), none for token 0
            if index >= len(hashes) or len(request.prompt_logprobs) < end:
                break
            entries = request.prompt_logprobs[max(index * bs - 1, 0) : end]
            hidden = request.prompt_block_hidden.pop(index)
            self.pool.cache_prompt_logprobs(hashes[index], BlockPromptLogprobs(num_top, entries, hidden))

    def num_blocks_taken(self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()) -> int:
        """Free blocks `allocate_slots` would take: the new ones, and the cached prefix's blocks no one holds
        (evictable, so counted among the free)."""
        total = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        needed = self.blocks_for(total) - len(request.block_ids) - len(computed_blocks)
        return max(0, needed) + sum(1 for b in computed_blocks if self.pool.ref_counts[b] == 0)

    def trim(self, request: Request) -> None:
        """Free the request's blocks beyond its computed tokens (after rejected drafts)."""
        keep = self.blocks_for(request.num_computed_tokens)
        if len(request.block_ids) > keep:
            self.pool.free(request.block_ids[keep:])
            request.block_ids = request.block_ids[:keep]  # a new list: see Request.block_ids

    def free(self, request: Request) -> None:
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.num_cached_blocks = 0

    def usage(self) -> float:
        return self.pool.usage()

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
