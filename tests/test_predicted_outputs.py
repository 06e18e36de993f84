"""Predicted outputs (OpenAI's `prediction`): drafts from text the client expects back, the output unchanged."""

from __future__ import annotations

import pytest

from ember.engine.engine import LLM
from ember.engine.request import Request
from ember.engine.sampling_params import SamplingParams
from ember.spec.prediction import PredictedOutput
from tests.test_speculative import (
    BLOCK_SIZE,
    generate_all,
    greedy,
    prompts,
    reference,  # noqa: F401 (a fixture)
)


def replying(output: list[int]) -> Request:
    """A request whose reply so far is `output`."""
    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=100), [], max_tokens=100)
    request.all_token_ids += output
    return request


def test_drafts_follow_the_reply_and_find_their_place_again_after_an_edit() -> None:
    prediction = PredictedOutput([10, 11, 12, 13, 14, 15, 16, 17, 11, 12, 18, 19])
    assert prediction.drafts(replying([10]), 3) == [11, 12, 13]
    assert prediction.drafts(replying([10, 11, 12]), 3) == [13, 14, 15]  # two drafts accepted
    # the reply departs (an edit), then rejoins further on
    assert prediction.drafts(replying([10, 11, 12, 13, 50]), 3) == []
    assert prediction.drafts(replying([10, 11, 12, 13, 50, 51, 16]), 3) == []  # one token is not enough
    assert prediction.drafts(replying([10, 11, 12, 13, 50, 51, 16, 17]), 3) == [11, 12, 18]
    # "11 12" occurs twice: the occurrence after where the reply left the prediction is taken, else the first
    twice = PredictedOutput([11, 12, 20, 30, 31, 11, 12, 21])
    assert twice.drafts(replying([11, 12, 20, 40]), 2) == []
    assert twice.drafts(replying([11, 12, 20, 40, 11, 12]), 2) == [21]
    assert twice.drafts(replying([11, 12, 20, 40, 11, 12, 21, 41, 11, 12]), 2) == [20, 30]  # left at its end
    assert PredictedOutput([5, 6]).drafts(replying([7]), 4) == []


def edited(tokens: list[int]) -> list[int]:
    """The tokens with one changed, one inserted and one dropped: a prediction partly right."""
    return [*tokens[:5], 200, *tokens[6:12], 201, *tokens[12:18], *tokens[19:]]


@pytest.mark.parametrize("speculative", [None, "ngram"])
def test_greedy_output_is_unchanged_by_a_prediction_right_or_partly_wrong(
    tiny_models: dict,
    reference: list[list[int]],  # noqa: F811
    speculative: str | None,
) -> None:
    """Without `--speculative` a prediction still drafts; with a proposer, the requests without one use it. Tight
    memory preempts requests mid-prediction."""
    llm = LLM(
        str(tiny_models["qwen3"][0]),
        num_blocks=40,
        block_size=BLOCK_SIZE,
        max_num_batched_tokens=48,
        dtype="float32",
        speculative=speculative,
        speculative_max_batch_size=16,
    )
    predictions = [reference[0], edited(reference[1]), edited(reference[2]), None, *reference[4:]]
    params = [SamplingParams(**{**greedy().__dict__, "prediction": p}) for p in predictions]
    assert generate_all(llm, params) == reference
    assert llm.engine.scheduler.num_preemptions > 0
    stats = llm.engine.speculator.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    pool = llm.engine.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks and not any(pool.ref_counts)


def test_a_right_prediction_is_all_accepted_and_counted_per_request(
    tiny_models: dict,
    reference: list[list[int]],  # noqa: F811
) -> None:
    llm = LLM(str(tiny_models["qwen3"][0]), num_blocks=256, block_size=BLOCK_SIZE, dtype="float32")
    right, plain = llm.generate(
        [prompts()[0], prompts()[1]],
        [SamplingParams(**{**greedy().__dict__, "prediction": reference[0]}), greedy()],
    )
    assert right.outputs[0].token_ids == reference[0]
    assert right.num_draft_tokens == right.num_accepted_tokens >= len(reference[0]) // 2
    assert plain.num_draft_tokens == 0


def test_bad_predictions_are_clear_errors(tiny_models: dict) -> None:
    llm = LLM(str(tiny_models["qwen3"][0]), num_blocks=64, dtype="float32")
    with pytest.raises(ValueError, match="prediction must hold token ids below the vocabulary size 256"):
        llm.generate([5, 6], SamplingParams(prediction=[5, 300]))
    with pytest.raises(ValueError, match="a prediction as text needs the model's tokenizer"):
        llm.generate([5, 6], SamplingParams(prediction="text"))
    with pytest.raises(ValueError, match="prediction must be a string or a list of token ids"):
        SamplingParams(prediction=[1, -2])
