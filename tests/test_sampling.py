"""Sampling: seeds reproduce, filters never leak, penalties follow their definitions, stops cut exactly."""

from __future__ import annotations

import math

import pytest
import torch

from ember.engine.engine import LLM, merge_output
from ember.engine.request import Request
from ember.engine.sampler import apply_logit_bias, apply_penalties, draw, sample
from ember.engine.sampling_params import SamplingParams


def make_requests(params: SamplingParams, count: int, outputs: list[int] | None = None) -> list[Request]:
    requests = []
    for i in range(count):
        r = Request(str(i), [1, 2, 3], params, eos_token_ids=[], max_tokens=16)
        r.all_token_ids.extend(outputs or [])
        requests.append(r)
    return requests


def allowed_set(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    """The tokens a filter may emit, computed independently in plain Python."""
    probs = torch.softmax(logits / params.temperature, dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda t: -probs[t])
    keep = order[: params.top_k] if params.top_k else order
    if params.top_p < 1.0:
        total = sum(probs[t] for t in keep)
        nucleus, mass = [], 0.0
        for t in keep:
            nucleus.append(t)
            mass += probs[t] / total
            if mass >= params.top_p:
                break
        keep = nucleus
    if params.min_p > 0:
        keep = [t for t in keep if probs[t] >= params.min_p * max(probs)]
    return set(keep)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=0.7, top_p=0.5),
        SamplingParams(temperature=1.3, min_p=0.2),
        SamplingParams(temperature=1.0, top_k=10, top_p=0.8, min_p=0.05),
    ],
)
def test_filters_never_emit_outside_the_allowed_set(params: SamplingParams) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 64, generator=generator)
    allowed = [allowed_set(row, params) for row in logits]
    seen: list[set[int]] = [set() for _ in range(8)]
    for _ in range(200):
        for row, token in enumerate(sample(logits, make_requests(params, 8)).token_ids):
            assert token in allowed[row]
            seen[row].add(token)
    assert any(len(s) > 1 for s in seen)  # it samples, not just argmax


def test_seeded_sampling_reproduces_regardless_of_batch(smollm: LLM) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234)
    alone = smollm.generate("Write a haiku about the sea.", params)[0].outputs[0].token_ids
    others = SamplingParams(max_tokens=24, temperature=1.0)
    batch = smollm.generate(
        ["Tell me a joke.", "Write a haiku about the sea.", "Count to ten:"], [others, params, others]
    )
    assert batch[1].outputs[0].token_ids == alone
    different = smollm.generate("Write a haiku about the sea.", SamplingParams(max_tokens=24, temperature=0.9, seed=99))
    assert different[0].outputs[0].token_ids != alone


def test_n_samples_share_a_prompt_and_differ(smollm: LLM) -> None:
    out = smollm.generate("My favourite animal is", SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=7))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    again = smollm.generate("My favourite animal is", SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=7))[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]
    # the samples' seeds follow the request's, wrapping at the end of int64 (the largest seed was refused with n > 1)
    last = SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=2**63 - 1)
    assert smollm.generate("My favourite animal is", last)[0].outputs[1].token_ids == (
        smollm.generate("My favourite animal is", SamplingParams(max_tokens=4, temperature=1.0, seed=-(2**63)))[0]
        .outputs[0]
        .token_ids
    )


def test_top_k_one_is_greedy(smollm: LLM) -> None:
    greedy = smollm.generate("The sun rises in the", SamplingParams(max_tokens=16, temperature=0))[0]
    top1 = smollm.generate("The sun rises in the", SamplingParams(max_tokens=16, temperature=1.5, top_k=1))[0]
    assert top1.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_penalties_follow_their_definitions() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    requests = make_requests(params, 1, outputs=[0, 0, 1])  # prompt [1, 2, 3], output [0, 0, 1]
    other = make_requests(SamplingParams(frequency_penalty=1.0), 1, outputs=[3, 3])  # a batch of two rows
    out = apply_penalties(torch.cat([logits, logits]), requests + other).tolist()
    # token 0: seen (/2), 2x in output; token 1: seen (x2), once; tokens 2, 3: in the prompt only (/2)
    assert out[0] == pytest.approx([2.0 / 2 - 0.25 * 2 - 0.5, -1.0 * 2 - 0.25 - 0.5, 0.5 / 2, 3.0 / 2])
    assert out[1] == pytest.approx([2.0, -1.0, 0.5, 3.0 - 1.0 * 2])  # its own output only, no repetition penalty


def test_logit_bias_applies_to_its_own_row() -> None:
    logits = torch.zeros(3, 5)
    biased = [SamplingParams(logit_bias={4: 2.5, 1: -1.0}), SamplingParams(), SamplingParams(logit_bias={0: 7.0})]
    requests = [make_requests(params, 1)[0] for params in biased]
    assert apply_logit_bias(logits, requests).tolist() == [[0, -1.0, 0, 0, 2.5], [0] * 5, [7.0, 0, 0, 0, 0]]
    assert logits.abs().sum() == 0  # the caller's logits are left as they were


def test_greedy_logprobs_are_the_model_distribution(smollm: LLM) -> None:
    out = smollm.generate("Hello, my name is", SamplingParams(max_tokens=6, temperature=0, logprobs=3))[0]
    completion = out.outputs[0]
    assert completion.logprobs is not None and len(completion.logprobs) == 6
    for token, lp in zip(completion.token_ids, completion.logprobs, strict=True):
        assert lp.token_id == token and lp.rank == 1 and lp.top[0][0] == token
        assert len(lp.top) == 3 and lp.logprob <= 0 and math.isclose(lp.top[0][1], lp.logprob)


def test_stop_strings_cut_exactly_and_never_stream_partially(smollm: LLM) -> None:
    prompt = "Write the numbers from one to twenty in words, separated by commas:"
    free = smollm.generate(prompt, SamplingParams(max_tokens=48, temperature=0))[0].outputs[0].text
    cut = len(free) // 2
    stop = free[cut : cut + 4]
    assert len(stop.strip()) >= 2
    expected = free[: free.index(stop)]
    params = SamplingParams(max_tokens=48, temperature=0, stop=[stop, "<never-appears>"])
    streamed = ""
    for delta in smollm.stream(prompt, params):
        streamed += delta.outputs[0].text if delta.outputs else ""
        assert expected.startswith(streamed)  # no partial stop string ever shown
        if delta.finished:
            assert delta.outputs[0].finish_reason == "stop" and delta.outputs[0].stop_reason == stop
    assert streamed == expected
    assert smollm.generate(prompt, params)[0].outputs[0].text == expected


def test_final_only_request_returns_one_whole_output(smollm: LLM) -> None:
    """What `LLM.generate` asks for: no delta per step, one output at the end equal to the merged deltas."""
    prompt, params = "Once upon a time", SamplingParams(n=2, max_tokens=12, temperature=0.8, seed=3, logprobs=2)
    streamed = None
    for delta in smollm.stream(prompt, params):
        streamed = merge_output(streamed, delta)
    assert streamed is not None
    engine = smollm.engine
    request_id = engine.add_request(prompt, params, final_only=True)
    outputs = []
    for _ in range(100):  # 12 tokens take 12 steps after the prefill
        outputs.extend(engine.step())
        if not engine.has_unfinished_requests():
            break
    assert len(outputs) == 1 and outputs[0].request_id == request_id and outputs[0].finished
    assert len(outputs[0].outputs) == 2
    for final, merged in zip(outputs[0].outputs, streamed.outputs, strict=True):
        assert final.token_ids == merged.token_ids and len(final.token_ids) == 12
        assert final.text == merged.text and final.finish_reason == merged.finish_reason == "length"
        assert [lp.token_id for lp in final.logprobs or []] == final.token_ids


def test_stop_token_ids_and_eos(smollm: LLM) -> None:
    greedy = smollm.generate("The capital of France is", SamplingParams(max_tokens=16, temperature=0))[0]
    token = greedy.outputs[0].token_ids[3]
    out = smollm.generate(
        "The capital of France is", SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[token])
    )
    completion = out[0].outputs[0]
    assert completion.token_ids == greedy.outputs[0].token_ids[: completion.token_ids.index(token) + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == token


def test_min_tokens_holds_back_stop_tokens_and_stop_strings(smollm: LLM) -> None:
    """vLLM's min_tokens: below it the stop tokens cannot be sampled (greedy or not) and stop strings do not
    end the output; from it on, both end it as usual."""
    prompt = "The capital of France is"
    free = smollm.generate(prompt, SamplingParams(max_tokens=24, temperature=0))[0].outputs[0]
    assert free.text.startswith(" Paris.")
    early_stop = SamplingParams(max_tokens=24, temperature=0, stop=["."])
    assert smollm.generate(prompt, early_stop)[0].outputs[0].text == " Paris"
    held = smollm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, stop=["."], min_tokens=6))[0]
    assert held.outputs[0].token_ids == free.token_ids and held.outputs[0].finish_reason == "length"
    token = free.token_ids[2]  # the greedy choice at position 2 is masked there: the output takes another way
    out = smollm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[token], min_tokens=6))
    completion = out[0].outputs[0]
    assert len(completion.token_ids) >= 6 and token not in completion.token_ids[:6]
    assert completion.finish_reason == "stop" and completion.token_ids[-1] == completion.stop_reason == token
    chat = smollm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True
    )
    eos = smollm.engine.eos_token_ids
    for min_tokens in (0, 12):
        params = SamplingParams(n=4, max_tokens=24, temperature=0.8, seed=1, min_tokens=min_tokens)
        samples = smollm.generate(chat, params)[0].outputs
        lengths = [len(c.token_ids) for c in samples]
        assert min(lengths) < 12 if min_tokens == 0 else min(lengths) >= 12, lengths  # the seed ends one early
        assert not any(set(c.token_ids[:min_tokens]) & set(eos) for c in samples)
    assert smollm.engine.kv_cache.pool.num_free_blocks == smollm.engine.kv_cache.num_blocks


def test_abandoned_stream_frees_its_blocks(smollm: LLM) -> None:
    stream = smollm.stream(["Tell me a long story."] * 4, SamplingParams(max_tokens=200, temperature=0))
    next(stream)
    next(stream)
    stream.close()
    assert not smollm.engine.has_unfinished_requests()
    assert smollm.engine.kv_cache.pool.num_free_blocks == smollm.engine.kv_cache.num_blocks


def test_interrupted_generate_frees_its_requests(smollm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the middle of `generate` (raised here from its third engine step) leaves nothing running."""
    engine, step, calls = smollm.engine, smollm.engine.step, []

    def interrupted_step() -> list:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(engine, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        smollm.generate(["Tell me a long story."] * 4, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    monkeypatch.undo()
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.pool.num_free_blocks == engine.kv_cache.num_blocks


def test_logit_bias_forces_and_bans_tokens(smollm: LLM) -> None:
    forced = smollm.tokenizer(" banana")["input_ids"][0]
    out = smollm.generate("Hello", SamplingParams(max_tokens=4, temperature=0, logit_bias={forced: 100.0}))[0]
    assert out.outputs[0].token_ids == [forced] * 4
    greedy = smollm.generate("The capital of France is", SamplingParams(max_tokens=1, temperature=0))[0]
    banned = greedy.outputs[0].token_ids[0]
    params = SamplingParams(max_tokens=1, temperature=0, logit_bias={banned: -100.0})
    assert smollm.generate("The capital of France is", params)[0].outputs[0].token_ids[0] != banned
    with pytest.raises(ValueError, match="below the vocabulary size"):
        smollm.generate("Hello", SamplingParams(max_tokens=1, logit_bias={10**7: 1.0}))


def contains(tokens: list[int], word: list[int]) -> bool:
    return any(tokens[i : i + len(word)] == word for i in range(len(tokens) - len(word) + 1))


def test_allowed_token_ids_and_bad_words(smollm: LLM) -> None:
    """vLLM's allowed_token_ids: nothing else is generated, greedy or sampled. Its bad_words: a one-token word
    never comes out; a longer one is cut where its last token would complete it, and the output before that
    point is the free output."""
    prompt = "The capital of France is"
    free = smollm.generate(prompt, SamplingParams(max_tokens=24, temperature=0))[0].outputs[0]
    allowed = [smollm.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" yes", " no", " maybe")]
    for params in (
        SamplingParams(max_tokens=8, temperature=0, allowed_token_ids=allowed),
        SamplingParams(n=4, max_tokens=8, temperature=2.0, seed=0, allowed_token_ids=allowed),
    ):
        for choice in smollm.generate(prompt, params)[0].outputs:
            assert set(choice.token_ids) <= set(allowed) and len(choice.token_ids) == 8, choice

    paris = smollm.engine.bad_words_token_ids(["Paris"])  # "Paris" and " Paris", one token each
    assert [len(word) for word in paris] == [1, 1] and free.token_ids[0] == paris[1][0]
    for params in (
        SamplingParams(max_tokens=24, temperature=0, bad_words=["Paris"]),
        SamplingParams(n=4, max_tokens=24, temperature=1.0, seed=0, bad_words=["Paris"]),
    ):
        for choice in smollm.generate(prompt, params)[0].outputs:
            assert not any(contains(choice.token_ids, word) for word in paris), choice.text

    newline = smollm.engine.bad_words_token_ids(["\n"])  # blanks only: as they are, not stripped to nothing
    assert (
        newline == [smollm.tokenizer("\n", add_special_tokens=False)["input_ids"]]
        and free.token_ids[2] == newline[0][0]
    )
    unbroken = smollm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, bad_words=["\n"]))[0].outputs[0]
    assert "\n" not in unbroken.text and unbroken.token_ids[:2] == free.token_ids[:2]

    answer = smollm.engine.bad_words_token_ids(["The answer"])
    word = next(word for word in answer if contains(free.token_ids, word))
    assert len(word) == 2
    at = next(i for i in range(len(free.token_ids)) if free.token_ids[i : i + 2] == word) + 1
    cut = smollm.generate(prompt, SamplingParams(max_tokens=24, temperature=0, bad_words=["The answer"]))[0]
    tokens = cut.outputs[0].token_ids
    assert tokens[:at] == free.token_ids[:at] and tokens[at] != word[1]
    assert not any(contains(tokens, word) for word in answer)
    assert smollm.engine.kv_cache.pool.num_free_blocks == smollm.engine.kv_cache.num_blocks


def test_tiny_temperatures_are_greedy_and_never_overflow(smollm: LLM) -> None:
    """Below 1e-5 the temperature is greedy (dividing by 1e-38 made every logit infinite: the draw returned the
    vocabulary's size as a token id); from 1e-5 on it samples, with every filter, inside the vocabulary."""
    prompt = "The capital of France is"
    greedy = smollm.generate(prompt, SamplingParams(max_tokens=6, temperature=0))[0].outputs[0].token_ids
    for temperature in (1e-38, 1e-40, 9e-6):
        assert (
            smollm.generate(prompt, SamplingParams(max_tokens=6, temperature=temperature))[0].outputs[0].token_ids
            == greedy
        )
    vocab = smollm.engine.model_config.vocab_size
    for params in (
        SamplingParams(n=4, max_tokens=6, temperature=1e-5, seed=0),
        SamplingParams(n=4, max_tokens=6, temperature=1e-5, seed=0, top_p=0.5, top_k=5, min_p=0.1),
    ):
        for choice in smollm.generate(prompt, params)[0].outputs:
            assert all(0 <= t < vocab for t in choice.token_ids) and choice.token_ids[0] == greedy[0]


def test_a_draw_stays_inside_the_vocabulary_whatever_the_weights() -> None:
    weights = torch.tensor([[float("nan")] * 10, [0.0] * 9 + [1.0]])
    assert draw(weights, [None, None]).tolist() == [9, 9]


def test_windowed_top_k_top_p_keeps_what_sorting_the_vocabulary_keeps() -> None:
    """The top-k/top-p thresholds come from a window of the likeliest tokens instead of a sorted vocabulary; they
    keep what the sort keeps for a mixed batch: peaked rows (the nucleus inside the window), flat rows (wider: the
    sorted fallback), top-k wider than the window, ties at the top-k threshold (all kept), and a row with no
    filter (keeps everything)."""
    from ember.engine.sampler import NUCLEUS_WINDOW, top_k_top_p_thresholds
    from tests.sampling_reference import kept_by_sorting

    vocab = 3 * NUCLEUS_WINDOW
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([[8.0], [8.0], [0.5], [8.0], [1.0], [8.0], [3.0]])
    logits = torch.randn(7, vocab, generator=generator) * scales
    logits[6] = logits[6].round()  # about 20 distinct values
    top_ks = [0, 40, 0, 0, 7, 2 * NUCLEUS_WINDOW, 25]
    top_ps = [0.9, 0.8, 0.9, 1.0, 0.5, 0.95, 1.0]
    expected = kept_by_sorting(logits, top_ks, top_ps)
    assert expected[0].sum() < NUCLEUS_WINDOW < expected[2].sum()  # peaked and flat nuclei, as meant
    assert expected[3].all() and expected[6].sum() > 25
    for rows in ([0, 1, 2, 3, 4, 5, 6], [0, 1, 3, 4, 5, 6]):  # with the flat row (the sorted fallback), without it
        thresholds = top_k_top_p_thresholds(logits[rows], [top_ks[i] for i in rows], [top_ps[i] for i in rows])
        assert torch.equal(logits[rows] >= thresholds.unsqueeze(1), expected[rows])


def test_draws_follow_the_distribution() -> None:
    """Inverting the CDF samples exactly from p (chi-square), zero-probability tokens never come out, and a
    seeded row draws the same token whatever the rest of the batch."""
    from ember.engine.sampler import draw

    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    counts = torch.bincount(draw(probs.expand(20000, -1), [None] * 20000), minlength=6).double()
    expected = probs.double() * 20000
    assert counts[probs == 0].sum() == 0
    chi_square = ((counts - expected)[probs > 0] ** 2 / expected[probs > 0]).sum().item()
    assert chi_square < 13.8  # 2 degrees of freedom, p = 0.001
    alone = draw(probs.unsqueeze(0), [torch.Generator().manual_seed(5)])
    batch: list[torch.Generator | None] = [None] * 7
    assert draw(probs.expand(8, -1), [*batch[:3], torch.Generator().manual_seed(5), *batch[3:]])[3] == alone[0]
