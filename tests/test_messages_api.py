"""Anthropic's Messages API on the real server, driven by Anthropic's own client: the same replies as the chat
API, streamed or not, tool use round trips, stop sequences, JSON output, and Anthropic-shaped errors."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from ember.server.launch import ServerProcess
from ember.server.messages import MessageBuilder
from ember.server.tools import HERMES

MODEL = "SmolLM2-135M-Instruct"
GREEDY = {"extra_body": {"temperature": 0}}  # the SDK no longer sends temperature; raw requests still may
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def chat(server: ServerProcess, messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    body = {"messages": messages, "temperature": 0, **fields}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()


def test_a_message_is_the_chat_apis_reply_streamed_or_not(server: ServerProcess, client: anthropic.Anthropic) -> None:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.messages.create(model=MODEL, max_tokens=16, messages=question, system="Be brief.", **GREEDY)
    expected = chat(server, [{"role": "system", "content": "Be brief."}, *question], max_tokens=16)
    assert [block.type for block in reply.content] == ["text"] and reply.role == "assistant"
    assert reply.content[0].text == expected["choices"][0]["message"]["content"]
    assert reply.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[expected["choices"][0]["finish_reason"]]
    usage = reply.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == expected["usage"]["prompt_tokens"]
    assert usage.output_tokens == expected["usage"]["completion_tokens"]
    counted = client.messages.count_tokens(model=MODEL, messages=question, system="Be brief.")
    assert counted.input_tokens == expected["usage"]["prompt_tokens"]

    with client.messages.stream(model=MODEL, max_tokens=16, messages=question, system="Be brief.", **GREEDY) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == reply.content[0].text and final.content[0].text == streamed
    assert final.stop_reason == reply.stop_reason and final.usage.output_tokens == usage.output_tokens

    cut = client.messages.create(model=MODEL, max_tokens=2, messages=question, **GREEDY)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2


def test_a_stop_sequence_ends_the_text_before_it_and_is_named(client: anthropic.Anthropic) -> None:
    question = [{"role": "user", "content": "Describe the sea in one sentence."}]
    text = client.messages.create(model=MODEL, max_tokens=24, messages=question, **GREEDY).content[0].text
    word = text.split()[3]
    stopped = client.messages.create(model=MODEL, max_tokens=24, messages=question, stop_sequences=[word], **GREEDY)
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == word
    assert stopped.content[0].text == text[: text.index(word)]


def test_tool_use_and_its_result_round_trip(server: ServerProcess, client: anthropic.Anthropic) -> None:
    """tool_choice any forces a call, which comes back as a tool_use block (streamed: the same, its input
    assembled from input_json_delta); the tool_result sent back reaches the model as the chat API's tool message."""
    question = {"role": "user", "content": "Weather in Paris?"}
    ask = {"model": MODEL, "max_tokens": 60, "tools": [WEATHER], "tool_choice": {"type": "any"}, **GREEDY}
    reply = client.messages.create(messages=[question], **ask)
    assert reply.stop_reason == "tool_use" and [b.type for b in reply.content] == ["tool_use"]
    call = reply.content[0]
    assert call.name == "get_weather" and isinstance(call.input["city"], str) and call.id
    with client.messages.stream(messages=[question], **ask) as s:
        streamed = s.get_final_message()
    assert [(b.type, b.name, b.input) for b in streamed.content] == [("tool_use", call.name, call.input)]

    result = {"type": "tool_result", "tool_use_id": call.id, "content": [{"type": "text", "text": "Sunny, 21 C"}]}
    turns = [question, {"role": "assistant", "content": [call.model_dump()]}, {"role": "user", "content": [result]}]
    answer = client.messages.create(model=MODEL, max_tokens=16, tools=[WEATHER], messages=turns, **GREEDY)
    assert answer.content and answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
    chat_turns = [
        question,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": json.dumps(call.input)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
    ]
    openai_tools = [{"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                                      "parameters": WEATHER["input_schema"]}}]  # fmt: skip
    same = httpx.post(f"{server.url}/tokenize", json={"messages": chat_turns, "tools": openai_tools}).json()
    assert client.messages.count_tokens(model=MODEL, tools=[WEATHER], messages=turns).input_tokens == same["count"]


def test_output_config_format_gives_json_valid_under_the_schema(client: anthropic.Anthropic) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer"}},
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    reply = client.messages.create(
        model=MODEL,
        max_tokens=40,
        messages=[{"role": "user", "content": "Name a big city and its population."}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
        **GREEDY,
    )
    jsonschema.validate(json.loads(reply.content[0].text), schema)


@pytest.mark.parametrize(
    ("body", "status", "kind", "message"),
    [
        ({"messages": [{"role": "user", "content": "Hi"}]}, 400, "invalid_request_error", "max_tokens"),
        (
            {"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            400,
            "invalid_request_error",
            "content blocks of type 'image' are not supported",
        ),
        (
            {"max_tokens": 4, "model": "claude-nope", "messages": [{"role": "user", "content": "Hi"}]},
            404,
            "not_found_error",
            "claude-nope",
        ),
        (
            {"max_tokens": 4, "mcp_servers": [{"url": "http://x"}], "messages": [{"role": "user", "content": "Hi"}]},
            400,
            "invalid_request_error",
            "'mcp_servers' is not supported",
        ),
        ({"max_tokens": 4, "messages": []}, 400, "invalid_request_error", "messages"),
        (
            {
                "max_tokens": 4,
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
                "messages": [{"role": "user", "content": "Hi"}],
            },
            400,
            "invalid_request_error",
            "server tools such as 'web_search_20250305' are not supported",
        ),
    ],
)
def test_bad_requests_get_anthropics_error_object(
    server: ServerProcess, body: dict[str, Any], status: int, kind: str, message: str
) -> None:
    reply = httpx.post(f"{server.url}/v1/messages", json=body, timeout=30)
    error = reply.json()
    assert reply.status_code == status and error["type"] == "error", error
    assert error["error"]["type"] == kind and message in error["error"]["message"], error


def test_a_thinking_models_reply_becomes_thinking_text_and_tool_use_blocks() -> None:
    """The builder on a reply that thinks, answers and calls a tool, fed in pieces that split the tags: each part
    becomes its block, announced by start, deltas and stop, and the blank between thinking and text opens none."""
    builder = MessageBuilder("m", prompt_tokens=10, tool_format=HERMES, opens_thinking=False)
    pieces = [
        "<thi",
        "nk>plan",
        "</think>\n\n",
        "Hi",
        ' <tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>',
    ]
    events = [event for i, piece in enumerate(pieces) for event in builder.feed(piece, i == len(pieces) - 1)]
    events += builder.finish("stop", None, output_tokens=12, cached=4)
    kinds = [(e["type"], e.get("content_block", e.get("delta", {})).get("type")) for e in events]
    assert kinds == [
        ("content_block_start", "thinking"),
        ("content_block_delta", "thinking_delta"),
        ("content_block_stop", None),
        ("content_block_start", "text"),
        ("content_block_delta", "text_delta"),
        ("content_block_delta", "text_delta"),
        ("content_block_stop", None),
        ("content_block_start", "tool_use"),
        ("content_block_delta", "input_json_delta"),
        ("content_block_stop", None),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert events[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert builder.result is not None
    thinking, text, call = builder.result["content"]
    assert thinking["thinking"] == "plan" and text["text"] == "Hi " and (call["name"], call["input"]) == ("f", {"x": 1})
    assert builder.result["usage"] == {
        "input_tokens": 6,
        "cache_read_input_tokens": 4,
        "cache_creation_input_tokens": 0,
        "output_tokens": 12,
    }
