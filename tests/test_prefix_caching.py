"""Automatic prefix caching: reuse is exact, eviction is LRU, and shared prompts share blocks."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.engine.block_pool import BlockPool, hash_block
from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams

BLOCK_SIZE = 4
TINY_BLOCKS = 16
PREFIXES = [[random.Random(i).randrange(3, 256) for _ in range(n)] for i, n in enumerate((0, 9, 17, 26))]


@pytest.fixture(scope="module")
def engines(tiny_models: dict) -> tuple[LLM, LLM]:
    path: Path = tiny_models["llama3"][0]
    cached = LLM(
        str(path),
        num_blocks=TINY_BLOCKS,
        block_size=BLOCK_SIZE,
        max_num_batched_tokens=12,
        max_num_seqs=4,
        dtype="float32",
    )
    uncached = LLM(str(path), num_blocks=512, block_size=BLOCK_SIZE, dtype="float32", enable_prefix_caching=False)
    return cached, uncached


def prefixed_requests(suffix_len: int, third: st.SearchStrategy) -> st.SearchStrategy:
    """Up to 8 requests: (one of PREFIXES, a suffix of 1 to `suffix_len` tokens, a value drawn from `third`)."""
    suffix = st.lists(st.integers(3, 255), min_size=1, max_size=suffix_len)
    return st.lists(st.tuples(st.sampled_from(range(len(PREFIXES))), suffix, third), min_size=1, max_size=8)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=prefixed_requests(8, st.integers(1, 10)), waves=st.integers(1, 3))
def test_greedy_outputs_equal_with_and_without_caching(engines: tuple[LLM, LLM], requests: list, waves: int) -> None:
    """Streams of requests sharing, partly sharing and not sharing prefixes, in several waves so later
    waves hit blocks cached (and partly evicted) by earlier ones, under a cache small enough to preempt."""
    cached, uncached = engines
    prompts = [PREFIXES[p] + suffix for p, suffix, _ in requests]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, _, n in requests]
    expected = [o.outputs[0].token_ids for o in uncached.generate(prompts, params)]
    for _ in range(waves):
        outputs = cached.generate(prompts, params)
        assert [o.outputs[0].token_ids for o in outputs] == expected
    pool = cached.engine.kv_cache.pool
    assert pool.num_free_blocks == TINY_BLOCKS and all(c == 0 for c in pool.ref_counts)
    for block_hash, block in pool.cached.items():  # the map and the blocks agree
        assert pool.block_hashes[block] == block_hash


def assert_same_prompt_logprobs(got: list, expected: list) -> None:
    assert len(got) == len(expected) and got[0] is None and expected[0] is None
    for ours, theirs in zip(got[1:], expected[1:], strict=True):
        assert (ours.token_id, ours.rank, [t for t, _ in ours.top]) == (
            theirs.token_id,
            theirs.rank,
            [t for t, _ in theirs.top],
        )
        assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=prefixed_requests(6, st.sampled_from([None, 0, 1, 3])), waves=st.integers(1, 3))
def test_prompt_logprobs_equal_with_and_without_caching(engines: tuple[LLM, LLM], requests: list, waves: int) -> None:
    """Requests asking for prompt logprobs (with different numbers of alternatives) among plain ones: a hit on
    blocks whose logprobs are cached gives exactly what computing the whole prompt gives, under preemption."""
    cached, uncached = engines
    prompts = [PREFIXES[p] + suffix for p, suffix, _ in requests]
    params = [SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=k) for *_, k in requests]
    expected = uncached.generate(prompts, params)
    for _ in range(waves):
        for ours, theirs, (*_, k) in zip(cached.generate(prompts, params), expected, requests, strict=True):
            assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
            if k is None:
                assert ours.prompt_logprobs is None
            else:
                assert_same_prompt_logprobs(ours.prompt_logprobs, theirs.prompt_logprobs)
    pool = cached.engine.kv_cache.pool
    assert pool.num_free_blocks == TINY_BLOCKS and set(pool.prompt_logprobs) <= set(pool.cached)


def test_prompt_logprobs_hit_blocks_cached_with_as_many_alternatives(tiny_models: dict) -> None:
    """lm-evaluation-harness's pattern: one context, several continuations, each scored by its prompt logprobs."""
    llm = LLM(str(tiny_models["llama3"][0]), num_blocks=64, block_size=BLOCK_SIZE, dtype="float32")
    reference = LLM(str(tiny_models["llama3"][0]), num_blocks=64, block_size=BLOCK_SIZE, dtype="float32",
                    enable_prefix_caching=False)  # fmt: skip
    context = PREFIXES[3][:22]
    runs = [([7, 8], 1, 0), ([9], 1, 20), ([10, 11, 12], 0, 20), ([13], 2, 0), ([14], 2, 20)]
    for continuation, k, cached_tokens in runs:  # (the context's 5 full blocks, 20 tokens, once cached with >= k)
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=k)
        ours = llm.generate(context + continuation, params)[0]
        assert ours.num_cached_tokens == cached_tokens
        assert all(len(entry.top) == k for entry in ours.prompt_logprobs[1:])
        assert_same_prompt_logprobs(
            ours.prompt_logprobs, reference.generate(context + continuation, params)[0].prompt_logprobs
        )
    whole, params = [*context[:20], 5], SamplingParams(max_tokens=1, prompt_logprobs=2)
    ours = llm.generate(whole, params)[0]
    assert ours.num_cached_tokens == 20  # all but the last token from the cache: only the boundary is scored
    assert_same_prompt_logprobs(ours.prompt_logprobs, reference.generate(whole, params)[0].prompt_logprobs)
    assert llm.engine.reset_prefix_cache() and not llm.engine.kv_cache.pool.prompt_logprobs


def test_repeated_prompt_is_served_from_cache_but_recomputes_its_last_token(engines: tuple[LLM, LLM]) -> None:
    cached, uncached = engines
    prompt = PREFIXES[3][:24]  # exactly 6 full blocks
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    cached.engine.reset_prefix_cache()
    first = cached.generate(prompt, params)[0]
    second = cached.generate(prompt, params)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 20  # 5 of 6 blocks: the last token's block is computed again
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert uncached.generate(prompt, params)[0].num_cached_tokens == 0


def test_a_cache_salt_keeps_its_requests_prefixes_apart(engines: tuple[LLM, LLM]) -> None:
    """vLLM's `cache_salt`: a prefix is found only by requests of the salt it was computed under (none: by
    unsalted ones), so a tenant cannot time another's cache hits; the outputs are the same either way."""
    cached, _ = engines
    engine = cached.engine
    engine.reset_prefix_cache()
    prompt = PREFIXES[3][:24]  # 6 full blocks: a hit reuses 5
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    def run(salt: str | None) -> tuple[int, list[int]]:
        request_id = engine.add_request(prompt, params, cache_salt=salt)
        for _ in range(50):  # bounded
            for out in engine.step():
                if out.request_id == request_id and out.finished:
                    return out.num_cached_tokens, out.outputs[0].token_ids
        raise AssertionError("the request did not finish")

    runs = [run(salt) for salt in ("tenant-a", "tenant-b", "tenant-a", "tenant-b", None, None)]
    assert [hits for hits, _ in runs] == [0, 0, 20, 20, 0, 20]
    assert all(tokens == runs[0][1] for _, tokens in runs)
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        engine.add_request(prompt, params, cache_salt="")


def test_parallel_samples_share_the_prompt_blocks(tiny_models: dict) -> None:
    llm = LLM(str(tiny_models["qwen3"][0]), num_blocks=64, block_size=8, dtype="float32")
    engine = llm.engine
    engine.add_request(list(range(3, 67)), SamplingParams(n=3, max_tokens=4, temperature=1.0, seed=1))
    engine.step()  # all three samples admitted in one step
    used = engine.kv_cache.num_blocks - engine.kv_cache.pool.num_free_blocks
    assert used == 8 + 2  # 8 prompt blocks once, plus one block for each other sample's recomputed tail
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_cache.pool.num_free_blocks == 64


def test_eviction_is_lru_and_never_touches_blocks_in_use() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    hashes = [hash_block(None, (i,)) for i in range(4)]
    for block, block_hash in zip(blocks, hashes, strict=True):
        pool.cache(block, block_hash)
    pool.free([blocks[2]])
    pool.free([blocks[0]])
    pool.free([blocks[1]])  # free order: 2, 0, 1; block 3 stays in use
    assert pool.allocate(1) == [blocks[2]]  # least recently freed goes first, losing its hash
    assert pool.lookup(hashes[2]) is None and pool.lookup(hashes[0]) == blocks[0]
    pool.touch([blocks[0]])  # a cache hit takes block 0 back off the free queue
    assert pool.allocate(1) == [blocks[1]]
    with pytest.raises(RuntimeError):
        pool.allocate(1)  # blocks 0 and 3 are in use: never evicted
    assert pool.lookup(hashes[3]) == blocks[3]
    assert not pool.reset_prefix_cache()  # refused while blocks are in use
