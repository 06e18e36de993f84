"""Speculative decoding: greedy outputs never change, rejection sampling is exact, KV rollback keeps the
block invariants, and the proposers draft what they should."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from ember.config import SpeculativeConfig
from ember.engine.engine import LLM
from ember.engine.request import Request
from ember.engine.sampling_params import SamplingParams
from ember.server.launch import running_server
from ember.spec.ngram import NgramProposer
from ember.spec.speculator import Speculator
from ember.spec.suffix import SuffixIndex
from ember.spec.verify import accept_greedy, rejection_sample
from tests.conftest import make_tiny_hf_model

BLOCK_SIZE = 4


def prompts() -> list[list[int]]:
    """Repetitive prompts (drafts get accepted) mixed with random ones (drafts get rejected)."""
    generator = torch.Generator().manual_seed(3)
    random = [torch.randint(3, 256, (n,), generator=generator).tolist() for n in (5, 17, 33, 9)]
    repetitive = [[10, 11, 12, 13, 14] * 5, [40, 41] * 9 + [7, 8, 9] * 4, list(range(50, 70)) * 2]
    return [*repetitive, *random, [99] * 12, [3, 4, 5, 6] * 6 + [101]]


def greedy(max_tokens: int = 24) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_models: dict) -> list[list[int]]:
    llm = LLM(str(tiny_models["qwen3"][0]), num_blocks=512, block_size=BLOCK_SIZE, dtype="float32")
    return [o.outputs[0].token_ids for o in llm.generate(prompts(), greedy())]


def check_block_invariants(llm: LLM) -> None:
    """Every running request holds exactly the blocks of its computed tokens; cached blocks hold committed
    tokens only; reference counts equal the holders."""
    engine = llm.engine
    manager, pool = engine.kv_cache, engine.kv_cache.pool
    holders = [0] * pool.num_blocks
    for request in engine.scheduler.running:
        assert len(request.block_ids) == manager.blocks_for(request.num_computed_tokens)
        hashes = manager.block_hashes(request)
        for i in range(request.num_cached_blocks):
            assert pool.block_hashes[request.block_ids[i]] == hashes[i]
        for block in request.block_ids:
            holders[block] += 1
    assert holders == pool.ref_counts
    for block_hash, block in pool.cached.items():
        assert pool.block_hashes[block] == block_hash


def generate_all(llm: LLM, params: list[SamplingParams]) -> list[list[int]]:
    """Every prompt with its parameters, stepped to the end with the block invariants checked at each step."""
    engine = llm.engine
    ids = [engine.add_request(p, q) for p, q in zip(prompts(), params, strict=True)]
    outputs: dict[str, list[int]] = {i: [] for i in ids}
    for _ in range(2000):  # bounded
        for out in engine.step():
            outputs[out.request_id].extend(out.outputs[0].token_ids)
        check_block_invariants(llm)
        if not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests()
    return [outputs[i] for i in ids]


@pytest.mark.parametrize("method", ["ngram", "suffix", "draft:same", "draft:other"])
def test_greedy_output_is_unchanged_with_preemption(tiny_models: dict, reference: list[list[int]], method: str) -> None:
    target = tiny_models["qwen3"][0]
    kind = method
    if method.startswith("draft:"):  # the target itself (all accepted) or another random model (all rejected)
        method = f"draft:{target if method == 'draft:same' else tiny_models['qwen2'][0]}"
    llm = LLM(
        str(target),
        num_blocks=40,  # 160 slots for 12 requests of up to 65 tokens: preemption is frequent
        block_size=BLOCK_SIZE,
        max_num_batched_tokens=48,
        dtype="float32",
        speculative=method,
        num_speculative_tokens=4,
        speculative_max_batch_size=16,
    )
    engine = llm.engine
    assert generate_all(llm, [greedy()] * len(prompts())) == reference
    stats = engine.speculator.stats
    assert engine.scheduler.num_preemptions > 0
    assert stats.num_draft_tokens > 0
    if kind == "draft:same":
        assert stats.num_accepted_tokens == stats.num_draft_tokens  # the target drafting for itself
    elif kind != "draft:other":
        assert stats.num_accepted_tokens > 0
    pool = engine.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks and not any(pool.ref_counts)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Upper tail of Pearson's chi-square statistic (cells with expected count >= 5)."""
    expected = probs * counts.sum()
    keep = expected >= 5
    statistic = (((counts - expected) ** 2) / expected)[keep].sum()
    dof = int(keep.sum()) - 1
    return float(1 - torch.special.gammainc(torch.tensor(dof / 2), statistic / 2))


@pytest.mark.parametrize("deterministic_drafts", [False, True])
def test_rejection_sampling_is_exact(deterministic_drafts: bool) -> None:
    """First and second emitted tokens follow the target's rows, whatever the draft distributions."""
    generator = torch.Generator().manual_seed(11)
    vocab, k, trials = 6, 2, 30000
    target = torch.softmax(2 * torch.randn(k + 1, vocab, generator=generator), dim=-1)
    drafter = torch.softmax(2 * torch.randn(k, vocab, generator=generator), dim=-1)
    first = torch.zeros(vocab)
    second = torch.zeros(vocab)
    for _ in range(trials):
        drafts = [int(torch.multinomial(drafter[j], 1, generator=generator)) for j in range(k)]
        out = rejection_sample(target, drafts, None if deterministic_drafts else drafter, generator)
        assert 1 <= len(out) <= k + 1 and out[:-1] == drafts[: len(out) - 1]
        first[out[0]] += 1
        if len(out) > 1:  # the first draft was accepted: the next token follows the target's second row
            second[out[1]] += 1
    assert chi_square_p_value(first, target[0]) > 1e-3
    assert second.sum() > 1000 and chi_square_p_value(second, target[1]) > 1e-3


def test_rejection_sampling_test_detects_a_wrong_sampler() -> None:
    """The chi-square check above has power: the draft's own distribution is rejected."""
    generator = torch.Generator().manual_seed(5)
    target = torch.softmax(2 * torch.randn(6, generator=generator), dim=-1)
    drafter = torch.softmax(2 * torch.randn(6, generator=generator), dim=-1)
    counts = torch.bincount(torch.multinomial(drafter, 30000, replacement=True, generator=generator), minlength=6)
    assert chi_square_p_value(counts.float(), target) < 1e-3


def test_greedy_acceptance_takes_the_matching_prefix() -> None:
    assert accept_greedy([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]  # all accepted, plus the bonus token
    assert accept_greedy([5, 9, 7, 8], [5, 6, 7]) == [5, 9]  # second draft rejected: the target's token
    assert accept_greedy([4, 6, 7, 8], [5, 6, 7]) == [4]


def test_sampled_requests_speculate_and_finish(tiny_models: dict) -> None:
    path = tiny_models["qwen3"][0]
    llm = LLM(str(path), num_blocks=256, dtype="float32", speculative="ngram", speculative_max_batch_size=16)
    params = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True, logprobs=2)
    outputs = llm.generate(prompts(), params)
    for out in outputs:
        sample = out.outputs[0]
        assert len(sample.token_ids) == 30 and len(sample.logprobs) == 30
        assert all(lp.token_id == t for lp, t in zip(sample.logprobs, sample.token_ids, strict=True))
    assert sum(o.num_draft_tokens for o in outputs) > 0
    assert llm.engine.speculator.stats.num_draft_tokens == sum(o.num_draft_tokens for o in outputs)


def test_stop_token_inside_accepted_drafts_ends_the_request(tiny_models: dict, reference: list[list[int]]) -> None:
    """A stop token among the accepted drafts ends the output there, as without speculation."""
    target = tiny_models["qwen3"][0]
    llm = LLM(str(target), num_blocks=256, block_size=BLOCK_SIZE, dtype="float32", speculative=f"draft:{target}")
    expected = reference[0]
    stop = expected[10]
    out = llm.generate(prompts()[0], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop]))[0]
    assert out.outputs[0].token_ids == expected[: expected.index(stop) + 1]
    assert out.outputs[0].finish_reason == "stop"
    pool = llm.engine.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_min_tokens_gives_the_output_of_plain_decoding(tiny_models: dict, reference: list[list[int]]) -> None:
    """Below min_tokens a request does not speculate (each draft position would need its own stop-token mask);
    from there on it does, and the output equals plain decoding's: here a stop token right at min_tokens,
    which drafts verified from below min_tokens would have masked."""
    target = str(tiny_models["qwen3"][0])
    expected = reference[2][:15]
    stop = expected[-1]
    assert stop not in expected[:-1]
    params = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop], min_tokens=len(expected) - 1)
    llm = LLM(target, num_blocks=256, block_size=BLOCK_SIZE, dtype="float32", speculative=f"draft:{target}")
    out = llm.generate(prompts()[2], params)[0]
    assert out.outputs[0].token_ids == expected and out.outputs[0].finish_reason == "stop"
    assert out.num_draft_tokens > 0


def test_allowed_token_ids_hold_at_every_draft_position(tiny_models: dict) -> None:
    """A speculating request with allowed_token_ids gives plain decoding's output (the mask applies to each
    verified row alike), though the drafter proposes tokens outside the set."""
    target = str(tiny_models["qwen3"][0])
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, allowed_token_ids=list(range(10, 20)))
    plain = LLM(target, num_blocks=256, block_size=BLOCK_SIZE, dtype="float32").generate(prompts()[0], params)[0]
    llm = LLM(target, num_blocks=256, block_size=BLOCK_SIZE, dtype="float32", speculative=f"draft:{target}")
    out = llm.generate(prompts()[0], params)[0]
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids and set(out.outputs[0].token_ids) <= set(
        range(10, 20)
    )
    assert out.num_draft_tokens > 0


def test_requests_with_bad_words_do_not_speculate() -> None:
    """Each draft position's bad-word mask would depend on the drafts before it: such requests decode plainly."""
    speculator = Speculator(SpeculativeConfig(method="ngram"), NgramProposer(), max_model_len=1000)
    loop = [1, 2, 3, 4, 5, 6, 7, 8] * 4
    requests = [decoding_request(str(i), [*loop, 1, 2, 3]) for i in range(2)]
    requests[1].bad_words_token_ids = [[9, 9]]
    speculator.propose(requests)
    assert [len(r.spec_token_ids) for r in requests] == [5, 0]


def test_ngram_lookup_proposes_what_followed_the_latest_match() -> None:
    proposer = NgramProposer(max_ngram=3, min_ngram=2)
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3]
    assert proposer.lookup(tokens, 3) == [4, 5, 9]  # the longest suffix, "1 2 3", wins over "2 3"
    assert proposer.lookup([5, 2, 3, 7, 8, 2, 3, 6, 2, 3], 2) == [6, 2]  # "2 3": its latest earlier match
    assert proposer.lookup([1, 2, 3, 4], 3) == []
    assert proposer.lookup(tokens, 0) == []


def decoding_request(request_id: str, tokens: list[int]) -> Request:
    """A request mid-decode: its last token is still to be computed."""
    request = Request(request_id, tokens[:4], SamplingParams(max_tokens=100), [], max_tokens=100)
    request.all_token_ids = list(tokens)
    request.num_computed_tokens = len(tokens) - 1
    return request


@pytest.mark.parametrize(
    ("num_requests", "max_rows", "drafts"),
    [(1, 8, [5]), (2, 8, [3, 3]), (3, 8, [2, 2, 1]), (4, 8, [1, 1, 1, 1]), (5, 8, [0] * 5), (2, None, [5, 5])],
)
def test_drafts_are_cut_to_the_step_row_limit(num_requests: int, max_rows: int | None, drafts: list[int]) -> None:
    """With a row limit (the CPU's one-call step holds 8 rows), running requests plus drafts stay within it:
    drafts shrink evenly, and stop when not every request can keep one."""
    config = SpeculativeConfig(method="ngram", num_speculative_tokens=5)
    speculator = Speculator(config, NgramProposer(), max_model_len=1000, max_rows=max_rows)
    loop = [1, 2, 3, 4, 5, 6, 7, 8] * 4  # every suffix has a match with at least 5 tokens after it
    requests = [decoding_request(str(i), [*loop, 1, 2, 3]) for i in range(num_requests)]
    speculator.propose(requests)
    assert [len(r.spec_token_ids) for r in requests] == drafts


def test_suffix_index_learns_across_requests_and_stays_bounded() -> None:
    index = SuffixIndex(max_depth=4, max_tokens=40)
    index.extend("a", [1, 2, 3, 4, 5, 6, 7, 8])
    assert index.draft([9, 2, 3, 4], 3, min_probability=0.3) == [5, 6, 7]  # another request's continuation
    index.extend("b", [2, 3, 4, 20, 21])  # now "2 3 4" has two continuations, each half of the time
    assert index.draft([9, 2, 3, 4], 3, min_probability=0.6) == []
    for i in range(10):
        index.extend(f"filler{i}", [100 + i] * 10)
    assert index.num_tokens <= 40 and "a" not in index.sequences
    assert index.draft([9, 2, 3, 4], 3, min_probability=0.3) == []  # forgotten with its request
    assert all(child.total > 0 or child.children for child in index.root.children.values())


def test_bad_speculative_settings_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="speculative method"):
        SpeculativeConfig(method="medusa")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=0)


def test_draft_model_with_another_vocabulary_is_refused(tiny_models: dict, tmp_path: Path) -> None:
    other = tmp_path / "other"
    make_tiny_hf_model("llama3", other, vocab_size=300)
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        LLM(str(tiny_models["qwen3"][0]), num_blocks=64, dtype="float32", speculative=f"draft:{other}")


def test_draft_model_kv_cache_shares_the_memory_budget(tiny_models: dict) -> None:
    """The target and its draft each get the same number of blocks, and together they fit the KV budget."""
    from ember.engine.model_runner import kv_cache_bytes_per_block

    target, draft = tiny_models["qwen3"][0], tiny_models["qwen2"][0]
    budget = 1 << 20
    llm = LLM(str(target), kv_cache_memory=budget, dtype="float32", speculative=f"draft:{draft}")
    engine = llm.engine
    proposer = engine.speculator.proposer
    per_block = sum(kv_cache_bytes_per_block(m.config, 16, torch.float32) for m in (engine.loaded, proposer.loaded))
    assert engine.kv_cache.num_blocks == proposer.kv_cache.num_blocks == budget // per_block
    assert LLM(str(target), kv_cache_memory=budget, dtype="float32").engine.kv_cache.num_blocks > budget // per_block


def test_server_speculates_with_the_same_output_and_reports_metrics(smollm: LLM) -> None:
    """SmolLM2 behind `ember serve --speculative suffix` answers exactly as offline greedy without it."""
    texts = [
        "Copy this list exactly: apple, banana, cherry, date, elderberry, fig, grape.\nCopy: apple, banana,",
        "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n",
    ]
    expected = [o.outputs[0].text for o in smollm.generate(texts, SamplingParams(max_tokens=24, temperature=0))]
    with running_server("--dtype", "float32", "--speculative", "suffix") as server:
        for text, reference_text in zip(texts, expected, strict=True):
            body = {"model": "SmolLM2-135M-Instruct", "prompt": text, "max_tokens": 24, "temperature": 0}
            response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == reference_text
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert server.stop() == 0
    lines = [line for line in metrics.splitlines() if line.startswith("ember:spec")]
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in lines}
    assert values["ember:spec_decode_num_draft_tokens_total"] > 0
    assert values["ember:spec_decode_num_accepted_tokens_total"] > 0
    assert 0 < values["ember:spec_decode_acceptance_rate"] <= 1
    assert values["ember:spec_decode_mean_accepted_length"] > 1
