"""Property tests of the block pool and scheduler on a real (tiny) engine: random arrivals, lengths, priorities,
aborts and preemption under a tiny KV cache, with either scheduling policy. Afterwards every block is free, every
request ended exactly once, and greedy outputs equal those of a roomy cache that never preempts or chunks."""

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


def tight_engine(path: Path, policy: str = "fcfs") -> LLM:
    return LLM(
        str(path),
        num_blocks=TINY_BLOCKS,
        block_size=BLOCK_SIZE,
        max_num_batched_tokens=10,
        max_num_seqs=4,
        dtype="float32",
        scheduling_policy=policy,
    )


@pytest.fixture(scope="module")
def engines(tiny_models: dict) -> tuple[LLM, LLM]:
    path: Path = tiny_models["qwen3"][0]
    roomy = LLM(str(path), num_blocks=512, block_size=BLOCK_SIZE, max_num_batched_tokens=4096, dtype="float32")
    return tight_engine(path), roomy


@pytest.fixture(scope="module")
def ranked(tiny_models: dict) -> LLM:
    """The tight engine under the priority policy."""
    return tight_engine(tiny_models["qwen3"][0], "priority")


request_strategy = st.fixed_dictionaries(
    {
        "prompt": st.lists(st.integers(3, 255), min_size=1, max_size=30),
        "max_tokens": st.integers(1, 16),
        "arrival": st.integers(0, 12),
        "abort_at": st.one_of(st.none(), st.integers(0, 25)),
        "priority": st.integers(-2, 2),
    }
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(request_strategy, min_size=1, max_size=10), by_priority=st.booleans())
def test_random_streams_free_every_block(
    engines: tuple[LLM, LLM], ranked: LLM, requests: list[dict], by_priority: bool
) -> None:
    tight, roomy = engines
    engine = ranked.engine if by_priority else tight.engine
    fitting = [r for r in requests if -(-(len(r["prompt"]) + r["max_tokens"]) // BLOCK_SIZE) <= TINY_BLOCKS]
    finishes: dict[str, list[str]] = {}
    tokens: dict[str, list[int]] = {}
    ids: dict[int, str] = {}
    for step in range(400):  # bounded: a stuck scheduler fails the test instead of hanging it
        for i, r in enumerate(fitting):
            if r["arrival"] == step:
                params = SamplingParams(max_tokens=r["max_tokens"], temperature=0, ignore_eos=True)
                ids[i] = engine.add_request(r["prompt"], params, priority=r["priority"] if by_priority else 0)
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


def test_the_priority_policy_runs_requests_in_priority_then_arrival_order(tiny_models: dict) -> None:
    """One sequence at a time: requests queued together end in the order of their priorities (lower first),
    ties in their order of arrival."""
    path = str(tiny_models["qwen3"][0])
    llm = LLM(path, dtype="float32", num_blocks=64, max_num_seqs=1, scheduling_policy="priority")
    prompts = [[5 + i, 9, 11] for i in range(5)]
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    ids = [llm.engine.add_request(p, params, priority=rank) for p, rank in zip(prompts, [3, 1, 2, 0, 1], strict=True)]
    ended = []
    for _ in range(100):  # bounded
        ended += [ids.index(out.request_id) for out in llm.engine.step() if out.finished]
        if len(ended) == len(ids):
            break
    assert ended == [3, 1, 4, 2, 0]


def test_an_outranking_request_preempts_the_least_important_running_one(engines: tuple[LLM, LLM], ranked: LLM) -> None:
    """Under the priority policy a request that outranks running ones takes a sequence slot (or blocks) from the
    least important, newest of them at once; one of equal priority waits its turn. Preempted requests recompute
    to the same greedy outputs. The first-come policy refuses priorities."""
    tight, roomy = engines
    engine = ranked.engine
    tokens: dict[str, list[int]] = {}

    def step() -> None:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)

    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[20 + i, 21, 22, 23] for i in range(6)]  # 3 blocks each of the 12: only sequence slots run short
    low = [engine.add_request(p, params, priority=1) for p in prompts[:4]]  # all four sequence slots
    step()
    equal = engine.add_request(prompts[4], params, priority=1)
    step()
    assert [r.request_id for r in engine.scheduler.running] == [f"{i}#0" for i in low]
    urgent = engine.add_request(prompts[5], params, priority=0)
    step()
    running = [r.request_id for r in engine.scheduler.running]
    assert running == [f"{urgent}#0", *[f"{i}#0" for i in low[:3]]]
    assert [r.request_id for r in engine.scheduler.waiting] == [f"{low[3]}#0", f"{equal}#0"]
    for _ in range(200):  # bounded
        step()
        if not engine.has_unfinished_requests():
            break
    long = [engine.add_request([30 + i] * 16, params, priority=1) for i in range(2)]
    for _ in range(7):  # both prompts computed: they hold 11 of the 12 blocks, with two sequence slots free
        step()
    pressing = engine.add_request([40] * 12, params, priority=0)  # its first 8 tokens (the budget left) need 2
    step()
    assert [r.request_id for r in engine.scheduler.running] == [f"{pressing}#0", f"{long[0]}#0"]
    for _ in range(200):  # bounded
        step()
        if not engine.has_unfinished_requests():
            break
    assert engine.kv_cache.pool.num_free_blocks == TINY_BLOCKS
    prompts += [[30] * 16, [31] * 16, [40] * 12]
    expected = roomy.generate(prompts, params)
    order = [*low, equal, urgent, *long, pressing]
    assert [len(tokens[i]) for i in order] == [8] * 9
    assert [tokens[i] for i in order] == [e.outputs[0].token_ids for e in expected]
    with pytest.raises(ValueError, match="--scheduling-policy priority"):
        tight.engine.add_request(prompts[0], params, priority=-1)


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
