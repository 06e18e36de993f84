"""Maps requests onto KV blocks: reuses cached prefix blocks, grows block tables as tokens are scheduled."""

from __future__ import annotations

from collections.abc import Sequence

from ember.engine.block_pool import BlockHash, BlockPool, hash_block
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
            hashes.append(hash_block(hashes[-1] if hashes else None, tuple(tokens[i * bs : (i + 1) * bs])))
        return hashes

    def get_computed_blocks(self, request: Request) -> list[int]:
        """The longest cached prefix of a new request, as blocks. The last token is always left to
        compute (its logits are needed), and requests asking for prompt logprobs compute everything."""
        if not self.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return []
        blocks = []
        for block_hash in self.block_hashes(request)[: (request.num_tokens - 1) // self.block_size]:
            block = self.pool.lookup(block_hash)
            if block is None:
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
        total = request.num_computed_tokens + len(computed_blocks) * bs + num_new_tokens
        needed = -(-total // bs) - len(request.block_ids) - len(computed_blocks)
        if computed_blocks:  # a new request's cached prefix: blocks no one uses are evictable, not free for it
            evictable_hits = sum(1 for b in computed_blocks if self.pool.ref_counts[b] == 0)
            if needed > self.pool.num_free_blocks - evictable_hits:
                return False
            self.pool.touch(list(computed_blocks))
            request.block_ids.extend(computed_blocks)
        elif needed > self.pool.num_free_blocks:
            return False
        if needed > 0:
            request.block_ids.extend(self.pool.allocate(needed))
        if self.enable_prefix_caching:  # only blocks full of committed tokens: drafts may still be rejected
            full = min(total, request.num_committed_tokens) // bs
            if full > request.num_cached_blocks:
                self._cache_full_blocks(request, full)
        return True

    def _cache_full_blocks(self, request: Request, full: int) -> None:
        """Register the request's blocks up to `full` (counted from the start) in the prefix cache."""
        hashes = self.block_hashes(request)
        for i in range(request.num_cached_blocks, full):
            self.pool.cache(request.block_ids[i], hashes[i])
        request.num_cached_blocks = full

    def num_new_blocks(self, request: Request, num_new_tokens: int) -> int:
        """Blocks `allocate_slots` would take for `num_new_tokens` more tokens (no cached prefix)."""
        return max(0, self.blocks_for(request.num_computed_tokens + num_new_tokens) - len(request.block_ids))

    def trim(self, request: Request) -> None:
        """Free the request's blocks beyond its computed tokens (after rejected drafts)."""
        keep = self.blocks_for(request.num_computed_tokens)
        if len(request.block_ids) > keep:
            self.pool.free(request.block_ids[keep:])
            del request.block_ids[keep:]

    def free(self, request: Request) -> None:
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.num_cached_blocks = 0

    def usage(self) -> float:
        return self.pool.usage()

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
