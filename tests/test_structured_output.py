"""Structured output on the real SmolLM2: every constrained sample is valid, whatever the sampling; the
constraint touches only its own rows; bad constraints are clear errors that leak nothing."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest

from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams
from ember.engine.structured_output import StructuredOutputs

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
PROMPTS = ["Describe a person as JSON.", "The weather today is", "def main():", "Once upon a time"]


def check_valid(spec: StructuredOutputs, text: str) -> None:
    if spec.json is not None:
        jsonschema.validate(json.loads(text), spec.json if isinstance(spec.json, dict) else json.loads(spec.json))
    elif spec.json_object:
        assert isinstance(json.loads(text), dict)
    elif spec.regex is not None:
        assert re.fullmatch(spec.regex, text), text
    elif spec.choice is not None:
        assert text in spec.choice
    else:
        raise AssertionError(f"no check for {spec}")


SPECS = [
    StructuredOutputs(json=PERSON),
    StructuredOutputs(json=json.dumps(PERSON)),
    StructuredOutputs(regex=r"(\d{3}-\d{4}|[A-Z][a-z]{1,8})"),
    StructuredOutputs(choice=["yes", "no", 'it "depends"']),
]


@pytest.mark.parametrize("spec", SPECS, ids=["schema", "schema-text", "regex", "choice"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_sample_matches_its_constraint(smollm: LLM, spec: StructuredOutputs, temperature: float) -> None:
    """Bounded constraints: every sample ends on its own, and is valid."""
    params = SamplingParams(max_tokens=80, temperature=temperature, seed=7, n=2, structured_outputs=spec)
    for out in smollm.generate(PROMPTS, params):
        for sample in out.outputs:
            assert sample.finish_reason == "stop", (sample.text, sample.finish_reason)
            check_valid(spec, sample.text)
    assert smollm.engine.kv_cache.usage() == 0


def test_json_object_samples_are_json_or_a_valid_start(smollm: LLM) -> None:
    """Any JSON object has no length bound (a small model can write one long string): a sample that ends on
    its own is an object; one cut by max_tokens is still a start that xgrammar's own matcher accepts."""
    spec = StructuredOutputs(json_object=True)
    params = SamplingParams(max_tokens=120, temperature=1.0, seed=11, n=4, structured_outputs=spec)
    samples = [s for out in smollm.generate(PROMPTS, params) for s in out.outputs]
    for sample in samples:
        if sample.finish_reason == "stop":
            check_valid(spec, sample.text)
        else:
            matcher = smollm.engine.compile_grammar(spec).matcher(spec, set())
            assert sample.finish_reason == "length" and matcher.accept_string(sample.text), sample.text
    assert sum(s.finish_reason == "stop" for s in samples) >= len(samples) // 2


def test_constraint_leaves_other_rows_of_the_batch_alone(smollm: LLM) -> None:
    free = SamplingParams(max_tokens=24, temperature=0)
    alone = [o.outputs[0].token_ids for o in smollm.generate(PROMPTS, free)]
    constrained = SamplingParams(max_tokens=24, temperature=0, structured_outputs=StructuredOutputs(regex="[a-z ]+"))
    mixed = smollm.generate(PROMPTS, [constrained, free, constrained, free])
    assert [mixed[1].outputs[0].token_ids, mixed[3].outputs[0].token_ids] == [alone[1], alone[3]]
    assert re.fullmatch("[a-z ]+", mixed[0].outputs[0].text) and mixed[0].outputs[0].token_ids != alone[0]


def test_greedy_constrained_token_is_the_best_allowed_one(smollm: LLM) -> None:
    """With the choices "Paris" and "Lyon" the model's own preference decides: the logprob of the first token
    it writes must be the higher of the two choices' first tokens."""
    prompt = "Q: What is the capital of France?\nA:"
    params = SamplingParams(
        max_tokens=4, temperature=0, logprobs=20, structured_outputs=StructuredOutputs(choice=[" Paris", " Lyon"])
    )
    out = smollm.generate(prompt, params)[0].outputs[0]
    assert out.text == " Paris"
    first = out.logprobs[0]
    lyon = smollm.tokenizer(" Lyon", add_special_tokens=False)["input_ids"][0]
    assert all(token != lyon or value < first.logprob for token, value in first.top)


def test_grammar_end_stops_without_eos(smollm: LLM) -> None:
    params = SamplingParams(
        max_tokens=30, temperature=1.0, seed=3, ignore_eos=True, structured_outputs=StructuredOutputs(regex="a{2,4}")
    )
    out = smollm.generate("Say a few a's:", params)[0].outputs[0]
    assert re.fullmatch("a{2,4}", out.text) and out.finish_reason == "stop"


def test_ebnf_grammar(smollm: LLM) -> None:
    grammar = 'root ::= "(" expr ")"\nexpr ::= [0-9]+ (("+" | "*") [0-9]+)*'
    params = SamplingParams(
        max_tokens=40, temperature=1.0, seed=5, structured_outputs=StructuredOutputs(grammar=grammar)
    )
    for out in smollm.generate(PROMPTS, params):
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop" and re.fullmatch(r"\(\d+([+*]\d+)*\)", text), text


def test_token_masks_yield_to_the_grammar_where_it_allows_nothing_else(smollm: LLM) -> None:
    """bad_words, allowed_token_ids and min_tokens steer the output within a grammar; where the grammar allows only
    tokens they take away (its end below min_tokens, no allowed token it accepts), the grammar wins: the output
    stays valid and ends, instead of a step with nothing to sample."""
    choice = StructuredOutputs(choice=[" Paris", " London"])

    def complete(**fields: Any) -> tuple[str, str | None, int]:
        params = SamplingParams(max_tokens=12, temperature=0, structured_outputs=choice, **fields)
        out = smollm.generate("The capital of France is", params)[0].outputs[0]
        return out.text, out.finish_reason, len(out.token_ids)

    london = smollm.tokenizer(" London", add_special_tokens=False)["input_ids"]
    yes = smollm.tokenizer(" yes", add_special_tokens=False)["input_ids"]
    assert complete() == (" Paris", "stop", 2)
    assert complete(bad_words=["Paris"])[:2] == (" London", "stop")
    assert complete(allowed_token_ids=london + smollm.engine.eos_token_ids)[:2] == (" London", "stop")
    assert complete(allowed_token_ids=yes) == (" Paris", "stop", 2)  # nothing allowed is in the grammar
    assert complete(min_tokens=5) == (" Paris", "stop", 2)  # the grammar's end comes first
    assert smollm.engine.kv_cache.usage() == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (dict(json={"type": "objekt"}), "invalid structured output constraint"),
        (dict(regex="(unclosed"), "invalid structured output constraint"),
        (dict(grammar="root ::= undefined_rule"), "undefined_rule"),
        (dict(json={**PERSON, "properties": {"tags": {"type": "array", "uniqueItems": True}}}), "'uniqueItems' at"),
        (dict(json='{"not": {"type": "string"}}'), "does not enforce"),
    ],
)
def test_bad_constraint_is_a_clear_error_and_leaks_nothing(smollm: LLM, spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        smollm.generate("hi", SamplingParams(structured_outputs=StructuredOutputs(**spec)))
    assert not smollm.engine.has_unfinished_requests()
    assert smollm.engine.kv_cache.usage() == 0


@pytest.mark.parametrize(
    "fields", [{}, {"json": {"type": "object"}, "regex": "a"}, {"choice": []}, {"regex": ""}, {"json": 3}]
)
def test_malformed_spec_is_rejected(fields: dict) -> None:
    with pytest.raises(ValueError, match="structured output"):
        StructuredOutputs(**fields)


def test_speculative_engine_keeps_constrained_output_exact() -> None:
    """Constrained requests do not speculate: greedy output equals the plain engine's, and it is valid."""
    spec = StructuredOutputs(json=PERSON)
    params = SamplingParams(max_tokens=80, temperature=0, structured_outputs=spec)
    plain = LLM(dtype="float32", num_blocks=256).generate(PROMPTS[:2], params)
    speculative = LLM(dtype="float32", num_blocks=256, speculative="ngram").generate(PROMPTS[:2], params)
    assert [o.outputs[0].text for o in speculative] == [o.outputs[0].text for o in plain]
    for out in plain:
        check_valid(spec, out.outputs[0].text)


def test_constrained_requests_survive_preemption() -> None:
    """A preempted request recomputes its tokens; its matcher keeps its state, so its output stays valid."""
    llm = LLM(dtype="float32", num_blocks=10, max_num_seqs=8)
    spec = StructuredOutputs(json=PERSON)
    params = SamplingParams(max_tokens=80, temperature=1.0, seed=1, structured_outputs=spec)
    outputs = llm.generate([f"Person number {i}, as JSON:" for i in range(8)], params)
    assert llm.engine.scheduler.num_preemptions > 0
    for out in outputs:
        assert out.outputs[0].finish_reason == "stop"
        check_valid(spec, out.outputs[0].text)
    assert llm.engine.kv_cache.usage() == 0
