"""Draft-model drafting: a smaller model with the target's tokenizer proposes greedily.

The draft runs on Ember's own engine pieces: a ModelRunner with its own paged KV cache, and one shadow
request per target request whose tokens mirror the target's. Before each proposal the shadow takes
the target's committed tokens, keeps the KV of the prefix they share (the drafts that were accepted)
and rolls back the rest, then catches up in one batched step and decodes the drafts greedily, batched
over all speculating requests.
"""

from __future__ import annotations

import torch

from ember.engine.kv_cache_manager import KVCacheManager
from ember.engine.model_runner import ModelRunner
from ember.engine.request import Request
from ember.engine.sampling_params import SamplingParams
from ember.engine.scheduler import ScheduledRequest
from ember.models.loader import LoadedModel

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class DraftModelProposer:
    def __init__(
        self,
        loaded: LoadedModel,
        target_vocab_size: int,
        num_blocks: int,
        block_size: int,
        device: str,
        dtype: torch.dtype,
    ) -> None:
        if loaded.config.vocab_size != target_vocab_size:
            raise ValueError(
                f"draft model {loaded.name!r} has a vocabulary of {loaded.config.vocab_size} tokens, the target "
                f"{target_vocab_size}: a draft model must share the target's tokenizer"
            )
        self.loaded = loaded
        self.kv_cache = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(loaded.model, num_blocks, block_size, device, dtype, gguf_blocks=loaded.gguf_blocks)
        self.shadows: dict[str, Request] = {}

    def _sync(self, request: Request) -> Request:
        """The request's shadow, holding the target's committed tokens and the KV still valid for them."""
        shadow = self.shadows.get(request.request_id)
        if shadow is None:
            shadow = Request(request.request_id, list(request.all_token_ids), GREEDY, [], max_tokens=1 << 30)
            self.shadows[request.request_id] = shadow
            return shadow
        keep = common_prefix_length(shadow.all_token_ids, request.all_token_ids)
        shadow.all_token_ids = list(request.all_token_ids)
        # the last token is always (re)computed: its logits give the first draft
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, keep, shadow.num_tokens - 1)
        self.kv_cache.trim(shadow)
        return shadow

    def propose(self, requests: list[Request], max_lengths: list[int]) -> list[list[int]]:
        drafts: dict[str, list[int]] = {r.request_id: [] for r in requests}
        wanted = {r.request_id: k for r, k in zip(requests, max_lengths, strict=True) if k > 0}
        shadows = [self._sync(r) for r in requests if r.request_id in wanted]
        while shadows:
            scheduled = []
            for shadow in shadows:
                num_new = shadow.num_tokens - shadow.num_computed_tokens
                if not self.kv_cache.allocate_slots(shadow, num_new):  # the draft cache is full: skip this one
                    self._drop(shadow.request_id)
                    continue
                scheduled.append(ScheduledRequest(shadow, shadow.num_computed_tokens, num_new))
                shadow.num_computed_tokens += num_new
            if not scheduled:
                break
            result = self.runner.execute(scheduled)
            for s in scheduled:
                token = result.sampled[s.request.request_id][0][0]
                s.request.all_token_ids.append(token)
                drafts[s.request.request_id].append(token)
            shadows = [s.request for s in scheduled if len(drafts[s.request.request_id]) < wanted[s.request.request_id]]
        return [drafts[r.request_id] for r in requests]

    def _drop(self, request_id: str) -> None:
        shadow = self.shadows.pop(request_id, None)
        if shadow is not None:
            self.kv_cache.free(shadow)

    def finish(self, request: Request) -> None:
        self._drop(request.request_id)
