"""Reasoning models: thinking (`<think>...</think>`) apart from the answer, and `chat_template_kwargs`."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from ember.engine.engine import LLM
from ember.engine.structured_output import StructuredOutputs
from ember.server.launch import ServerProcess
from ember.server.protocol import Tool
from ember.server.reasoning import (
    ReasoningParser,
    after_thinking,
    prompt_closes_thinking,
    prompt_opens_thinking,
    split_reasoning,
    template_thinks,
)
from ember.server.tools import HERMES, tool_call_constraint

MODEL = "SmolLM2-135M-Instruct"
# DeepSeek-R1's way: the prompt opens the think block; with enable_thinking false (Qwen3's switch), it also
# closes it, empty
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n"
    "{% if enable_thinking is defined and not enable_thinking %}\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.mark.parametrize(
    ("reply", "opened", "expected"),
    [
        ("<think>\nLet me see.\n</think>\n\nThe answer is 4.", False, ("Let me see.", "The answer is 4.")),
        ("Let me see.\n</think>\n\nFour.", True, ("Let me see.", "Four.")),
        ("Just an answer.", False, (None, "Just an answer.")),
        ("  <think>\n\n</think>\n\nHi", False, ("", "Hi")),  # an empty block (thinking switched off)
        ("<think>still thinking at max_tokens", False, ("still thinking at max_tokens", "")),
        ("<thinking>is not the tag", False, (None, "<thinking>is not the tag")),
        ("a < b, and a </ b", False, (None, "a < b, and a </ b")),
        ("x </think", True, ("x </think", "")),
        ("one\n\ntwo  \n</think>three</think>", True, ("one\n\ntwo", "three</think>")),
    ],
)
def test_thinking_and_answer_split_alike_whole_and_streamed(
    reply: str, opened: bool, expected: tuple[str | None, str]
) -> None:
    assert split_reasoning(reply, opened) == expected
    for piece in (1, 2, 3, 7):
        parser, thinking, answer = ReasoningParser(opened), "", ""
        for start in range(0, len(reply), piece):
            more_thinking, more_answer = parser.feed(reply[start : start + piece])
            thinking, answer = thinking + more_thinking, answer + more_answer
        more_thinking, more_answer = parser.finish()
        assert (thinking + more_thinking if parser.thought else None, answer + more_answer) == expected


def test_which_prompts_open_a_think_block_and_which_templates_think() -> None:
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert prompt_closes_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_closes_thinking("<think>a</think> earlier turn<|im_start|>assistant\n")
    assert not prompt_opens_thinking("<think>a</think> earlier turn<|im_start|>assistant\n")
    assert template_thinks(THINKING_TEMPLATE) and not template_thinks("{{ messages }}") and not template_thinks(None)


@pytest.mark.parametrize("opened", [True, False])
def test_a_constraint_after_thinking_holds_for_the_answer_alone(smollm: LLM, opened: bool) -> None:
    """`after_thinking`: free thinking in a think block (opened by the prompt, or optionally by the model), a few
    blanks, then the answer under the constraint; the answer alone is what the reply parser returns as content."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    spec = after_thinking(StructuredOutputs(json=schema), opened)
    compiler, eos = smollm.engine.compile_grammar(spec), smollm.tokenizer.eos_token_id

    def whole_reply_ok(reply: str) -> bool:
        matcher = compiler.matcher(spec, {eos})
        return matcher.accept_string(reply) and matcher.accept_token(eos)

    opening = "" if opened else "<think>"
    thought = f'{opening}Two and two: four. A tag like <b> is text.</think>\n\n{{"n": 4}}'
    assert whole_reply_ok(thought)
    assert whole_reply_ok('{"n": 4}') is not opened  # a model that may think may also answer at once
    rejected = [f"{opening}x</think>\n\nfour", f'{opening}x</think>\n\n{{"m": 4}}', f"{opening}x <think> y</think>{{}}"]
    assert not any(whole_reply_ok(reply) for reply in rejected)
    assert split_reasoning(thought, opened) == ("Two and two: four. A tag like <b> is text.", '{"n": 4}')
    tool = Tool.model_validate({"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}})
    spec = after_thinking(tool_call_constraint([tool], "required", False, HERMES), opened)  # required calls
    compiler = smollm.engine.compile_grammar(spec)
    assert whole_reply_ok(
        f'{opening}I need the time.</think>\n<tool_call>\n{{"name": "now", "arguments": {{}}}}\n</tool_call>'
    )
    assert not whole_reply_ok(f"{opening}I need the time.</think>\nIt is noon.")


THINKING = {"chat_template": THINKING_TEMPLATE}  # each request's own template: the shared server trusts them


def streamed(client: OpenAI, **kwargs: Any) -> tuple[str, str]:
    """(thinking, answer) reassembled from a stream's deltas."""
    thinking = answer = ""
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        assert extra.get("reasoning") == extra.get("reasoning_content")
        thinking += extra.get("reasoning") or ""
        answer += delta.content or ""
    return thinking, answer


def test_thinking_comes_apart_from_the_answer_and_enable_thinking_reaches_the_template(server: ServerProcess) -> None:
    """On a request's own thinking template (vLLM's `chat_template`, the server trusting request templates)."""
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    kwargs: dict[str, Any] = dict(
        messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=12, temperature=0, extra_body=THINKING
    )

    reply = client.chat.completions.create(model=MODEL, **kwargs)
    thinking = reply.choices[0]
    extra = thinking.message.model_extra or {}
    reasoning_tokens = reply.usage.completion_tokens_details.reasoning_tokens
    assert 0 < reasoning_tokens <= reply.usage.completion_tokens
    assert thinking.message.content is None, thinking  # it never closed the block: all thinking
    assert extra["reasoning"] and extra["reasoning_content"] == extra["reasoning"]
    assert streamed(client, **kwargs) == (extra["reasoning"], "")

    stream = client.chat.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **kwargs)
    assert list(stream)[-1].usage.completion_tokens_details.reasoning_tokens == reasoning_tokens

    off = {**THINKING, "chat_template_kwargs": {"enable_thinking": False}}
    plain = client.chat.completions.create(model=MODEL, **{**kwargs, "extra_body": off})
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0
    answer = plain.choices[0].message
    assert answer.content and "reasoning" not in (answer.model_extra or {})
    assert streamed(client, **{**kwargs, "extra_body": off}) == ("", answer.content)

    # a schema constrains the answer, after the thinking (which this small model never ends); thinking switched
    # off, it holds from the first token
    json_object = {"type": "json_object"}
    thinks = client.chat.completions.create(model=MODEL, response_format=json_object, **kwargs).choices[0].message
    assert thinks.content is None and thinks.model_extra["reasoning"].startswith(extra["reasoning"])  # no end yet
    answers = client.chat.completions.create(model=MODEL, response_format=json_object, **{**kwargs, "extra_body": off})
    assert isinstance(json.loads(answers.choices[0].message.content), dict)
    assert "reasoning" not in (answers.choices[0].message.model_extra or {})

    counts = [
        httpx.post(f"{server.url}/tokenize", json={"messages": kwargs["messages"], **extra}).json()["count"]
        for extra in (THINKING, off)
    ]
    assert counts[1] > counts[0]  # the empty block closed in the prompt
    with pytest.raises(openai.BadRequestError) as info:
        tools = {**THINKING, "chat_template_kwargs": {"tools": []}}
        client.chat.completions.create(model=MODEL, **{**kwargs, "extra_body": tools})
    assert info.value.body["param"] == "chat_template_kwargs" and "'tools'" in info.value.body["message"]
    plain = client.chat.completions.create(model=MODEL, **{**kwargs, "extra_body": {}})  # the server's template
    assert plain.choices[0].message.content and "reasoning" not in (plain.choices[0].message.model_extra or {})


@pytest.mark.parametrize("piece", [1, 4, 100])
def test_responses_get_the_thinking_as_a_reasoning_item_before_the_answer(piece: int) -> None:
    from ember.server.responses import ResponseBuilder, ResponsesRequest

    builder = ResponseBuilder(ResponsesRequest.model_validate({"input": "x"}), MODEL, 0, None, opens_thinking=False)
    reply = "<think>\nTwo and two.\n</think>\n\nFour."
    events = builder.start()
    for start in range(0, len(reply), piece):
        events += builder.feed(reply[start : start + piece], start + piece >= len(reply))
    response = builder.finish("stop", {})[-1]["response"]
    reasoning, message = response["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"] == [
        {"type": "reasoning_text", "text": "Two and two."}
    ]
    assert message["content"][0]["text"] == "Four."
    kinds = [e["type"] for e in events]
    assert kinds.index("response.output_item.done") < kinds.index("response.output_text.delta")  # one item at a time
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    assert deltas == "Two and two."
    assert builder.reply_message().reasoning_content == "Two and two."


def test_responses_of_a_thinking_model(server: ServerProcess) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    kwargs: dict[str, Any] = dict(
        model=MODEL, input="What is 2 + 2?", max_output_tokens=12, temperature=0, extra_body=THINKING
    )
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": kwargs["input"]}],
        max_tokens=12,
        temperature=0,
        extra_body=THINKING,
    )
    thinking = chat.choices[0].message.model_extra["reasoning"]
    response = client.responses.create(**kwargs)
    assert [item.type for item in response.output] == ["reasoning"] and response.output_text == ""
    assert response.output[0].content[0].text == thinking
    assert 0 < response.usage.output_tokens_details.reasoning_tokens <= response.usage.output_tokens
    events = list(client.responses.create(stream=True, **kwargs))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == thinking
    assert events[-1].response.output[0].content[0].text == thinking
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(include=["message.output_text.logprobs"], top_logprobs=2, **kwargs)
    assert info.value.body["param"] == "include"


def test_reasoning_parser_none_leaves_the_reply_whole() -> None:
    from ember.server.chat import ChatFormatter
    from ember.server.serve import REASONING_PARSERS

    assert ChatFormatter(None, THINKING_TEMPLATE).thinks
    assert not ChatFormatter(None, THINKING_TEMPLATE, REASONING_PARSERS["none"]).thinks
    assert ChatFormatter(None, "{{ messages }}", REASONING_PARSERS["qwen3"]).thinks


def test_reasoning_items_sent_back_reach_the_next_assistant_turn() -> None:
    """The Responses API's input may carry earlier reasoning items (the Agents SDK sends them back): each one's
    thinking goes to the assistant turn after it, as the chat API's `reasoning_content`."""
    from ember.server.responses import input_messages

    def reasoning(text: str, field: str = "content") -> dict[str, Any]:
        return {"type": "reasoning", field: [{"type": "reasoning_text", "text": text}]}

    items = [
        {"role": "user", "content": "Weather?"},
        reasoning("Call the tool."),
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        reasoning("It is sunny.", field="summary"),
        {"role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]},
        reasoning("An orphan: no assistant turn follows."),
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]
    messages = input_messages(items)
    assert [m.role for m in messages] == ["user", "assistant", "tool", "assistant", "user", "assistant"]
    assert messages[1].reasoning_content == "Call the tool." and messages[1].tool_calls
    assert messages[3].reasoning_content == "It is sunny." and messages[3].content == "Sunny."
    assert messages[5].reasoning_content is None
