"""Property tests of the block pool and scheduler on a real (tiny) engine: random arrivals, lengths,
aborts and preemption under a tiny KV cache. Afterwards every block is free, every request ended exactly
once, and greedy outputs equal those of a roomy cache that never preempts or chunks."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember.engine.block_pool import BlockPool
from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams

BLOCK_SIZE = 4
TINY_BLOCKS = 12  # 48 token slots: a few requests at a time, preemption is frequent


@pytest.fixture(scope="module")
def engines(tiny_models: dict) -> tuple[LLM, LLM]:
    path: Path = tiny_models["qwen3"][0]
    tight = LLM(
        str(path),
        num_blocks=TINY_BLOCKS,
        block_size=BLOCK_SIZE,
        max_num_batched_tokens=10,
        max_num_seqs=4,
        dtype="float32",
    )
    roomy = LLM(str(path), num_blocks=512, block_size=BLOCK_SIZE, max_num_batched_tokens=4096, dtype="float32")
    return tight, roomy


request_strategy = st.fixed_dictionaries(
    {
        "prompt": st.lists(st.integers(3, 255), min_size=1, max_size=30),
        "max_tokens": st.integers(1, 16),
        "arrival": st.integers(0, 12),
        "abort_at": st.one_of(st.none(), st.integers(0, 25)),
    }
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(request_strategy, min_size=1, max_size=10))
def test_random_streams_free_every_block(engines: tuple[LLM, LLM], requests: list[dict]) -> None:
    tight, roomy = engines
    engine = tight.engine
    fitting = [r for r in requests if -(-(len(r["prompt"]) + r["max_tokens"]) // BLOCK_SIZE) <= TINY_BLOCKS]
    finishes: dict[str, list[str]] = {}
    tokens: dict[str, list[int]] = {}
    ids: dict[int, str] = {}
    for step in range(400):  # bounded: a stuck scheduler fails the test instead of hanging it
        for i, r in enumerate(fitting):
            if r["arrival"] == step:
                params = SamplingParams(max_tokens=r["max_tokens"], temperature=0, ignore_eos=True)
                ids[i] = engine.add_request(r["prompt"], params)
            if r["abort_at"] == step and i in ids:
                final = engine.abort_request(ids[i])
                if final is not None:
                    finishes.setdefault(ids[i], []).append("abort")
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids if out.outputs else [])
            if out.finished:
                finishes.setdefault(out.request_id, []).append(out.outputs[0].finish_reason or "")
        if len(ids) == len(fitting) and not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests(), "requests left unfinished after 400 steps"
    pool = engine.kv_cache.pool
    assert pool.num_free_blocks == TINY_BLOCKS and all(c == 0 for c in pool.ref_counts)
    assert sorted(finishes) == sorted(ids.values())
    assert all(len(f) == 1 for f in finishes.values()), finishes
    completed = [i for i in ids if finishes[ids[i]] == ["length"]]
    if completed:  # preemption, chunking and batching never change a greedy output
        params = [
            SamplingParams(max_tokens=fitting[i]["max_tokens"], temperature=0, ignore_eos=True) for i in completed
        ]
        reference = roomy.generate([fitting[i]["prompt"] for i in completed], params)
        for i, ref in zip(completed, reference, strict=True):
            assert tokens[ids[i]] == ref.outputs[0].token_ids


def test_preemption_happens_and_is_recovered(engines: tuple[LLM, LLM]) -> None:
    tight, roomy = engines
    prompts = [[7 + i] * 20 for i in range(4)]  # 4 x (20 + 16) tokens cannot share 48 slots
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    before = tight.engine.scheduler.num_preemptions
    outputs = tight.generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > before
    expected = roomy.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]


def test_request_larger_than_the_whole_cache_is_rejected(engines: tuple[LLM, LLM]) -> None:
    tight, _ = engines
    with pytest.raises(ValueError, match="KV-cache blocks"):
        tight.generate([5] * 40, SamplingParams(max_tokens=16))
    assert tight.engine.kv_cache.pool.num_free_blocks == TINY_BLOCKS


def test_block_pool_frees_tail_first_and_counts_references() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    b = pool.allocate(2)
    assert pool.num_free_blocks == 0
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    pool.free(a)
    assert pool.allocate(1) == [a[1]]  # the sequence's tail went back first, so it is reused first
    pool.free(b)
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free(b)


def test_a_one_sequence_cache_holds_one_whole_context(tiny_models: dict) -> None:
    """max_sequences=1 (`ember generate`, `ember chat`): a cache of one context and a block to spare, instead of
    the memory budget's, and a request filling the context runs to the end in it, speculating too."""
    path = str(tiny_models["llama3"][0])
    for speculative in (None, "ngram"):
        llm = LLM(path, dtype="float32", block_size=8, max_model_len=64, max_sequences=1, speculative=speculative)
        assert llm.engine.kv_cache.num_blocks == 64 // 8 + 1
        prompt = [5, 6, 7, 8] * 10
        [out] = llm.generate([prompt], SamplingParams(max_tokens=23, temperature=0, ignore_eos=True))
        assert len(out.outputs[0].token_ids) == 23 and out.outputs[0].finish_reason == "length"
        assert llm.engine.kv_cache.pool.num_free_blocks == llm.engine.kv_cache.num_blocks
