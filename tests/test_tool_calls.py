"""Tool calls out of generated text, streamed or whole, and the tools into the prompt."""

from __future__ import annotations

import json

import pytest

from ember.server.chat import ChatFormatter
from ember.server.protocol import ChatMessage, Tool
from ember.server.tools import ToolCallParser, split_tool_calls, template_speaks_tool_calls

REPLY = (
    "Let me check both.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    "<tool_call>not json</tool_call>"
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET", "note": "<tool_call> inside"}}\n</tool_call>'
    " Done <tool"
)


def calls_of(parsed: list) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed]


def test_whole_reply_splits_into_content_and_calls() -> None:
    content, calls = split_tool_calls(REPLY)
    assert calls_of(calls) == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "CET", "note": "<tool_call> inside"}),
    ]
    assert content == "Let me check both.\n\n<tool_call>not json</tool_call> Done <tool"
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_only_calls_give_no_content_and_plain_text_gives_no_calls() -> None:
    content, calls = split_tool_calls(' \n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n')
    assert content is None and calls_of(calls) == [("f", {})]
    assert split_tool_calls("just text") == ("just text", [])


@pytest.mark.parametrize("piece", [1, 2, 3, 7])
def test_streamed_pieces_give_the_same_split_and_hold_back_only_a_possible_tag(piece: int) -> None:
    parser = ToolCallParser()
    content, calls = "", []
    for start in range(0, len(REPLY), piece):
        text, new_calls = parser.feed(REPLY[start : start + piece])
        content += text
        calls += new_calls
        assert len(parser.pending) < len("<tool_call>") or parser.pending.startswith("<tool_call>")
    content += parser.finish()
    whole_content, whole_calls = split_tool_calls(REPLY)
    assert content == whole_content and calls_of(calls) == calls_of(whole_calls)
    assert parser.num_calls == 2


def test_a_call_cut_off_by_max_tokens_is_not_content() -> None:
    call = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
    content, calls = split_tool_calls(call + '<tool_call>\n{"name": "f", "argu')
    assert content is None and calls_of(calls) == [("f", {"a": 1})]
    assert split_tool_calls('Sure. <tool_call>\n{"name": "f", "argu') == ("Sure. ", [])
    assert split_tool_calls("Sure. <tool") == ("Sure. <tool", [])  # not (yet) a call: text


TOOLS = [
    Tool.model_validate(
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    )
]


def test_prompt_of_a_template_without_tools_carries_them_and_the_history(smollm) -> None:
    formatter = ChatFormatter(smollm.tokenizer)
    assert not formatter.native_tools
    messages = [
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage.model_validate(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            }
        ),
        ChatMessage(role="tool", content="18 C, sunny", tool_call_id="c1"),
    ]
    text, ids = formatter.prompt(messages, TOOLS)
    assert smollm.tokenizer.decode(ids) == text
    assert text.index('"name": "get_weather", "description": "Weather in a city"') < text.index("Weather in Paris?")
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    bad = messages[1].model_copy(deep=True)
    bad.tool_calls[0].function.arguments = "{not json"
    with pytest.raises(ValueError, match="not valid JSON"):
        formatter.prompt([messages[0], bad], TOOLS)


def test_template_detection() -> None:
    assert template_speaks_tool_calls("{% if tools %}...<tool_call>...{% endif %}")
    assert not template_speaks_tool_calls("{{ message['content'] }}") and not template_speaks_tool_calls(None)


CALL_WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_TIME = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
TWO_TOOLS = [
    *TOOLS,
    Tool.model_validate({"type": "function", "function": {"name": "get_time", "description": "The time now"}}),
]


@pytest.mark.parametrize(
    ("choice", "parallel", "accepted", "rejected"),
    [
        (
            "auto",
            True,
            ["Just text.", "Let me look.\n" + CALL_WEATHER, CALL_WEATHER + "\n" + CALL_TIME],
            [CALL_WEATHER + " and more text", CALL_WEATHER.replace("get_weather", "get_wether"), CALL_TIME[:-1]],
        ),
        ("auto", False, ["Text " + CALL_TIME], [CALL_WEATHER + "\n" + CALL_TIME]),
        ("required", True, [CALL_TIME, CALL_TIME + "\n" + CALL_WEATHER], ["Just text.", "Sure: " + CALL_TIME, ""]),
        ({"type": "function", "function": {"name": "get_time"}}, True, [CALL_TIME], [CALL_WEATHER, "text"]),
    ],
)
def test_tool_grammar_allows_exactly_well_formed_calls(
    smollm, choice: object, parallel: bool, accepted: list[str], rejected: list[str]
) -> None:
    """The constraint of each tool_choice, checked with xgrammar's matcher on whole replies (then EOS)."""
    from ember.server.protocol import ChatCompletionRequest
    from ember.server.tools import tool_call_constraint

    request = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "x"}],
            "tool_choice": choice,
            "tools": [{"type": "function", "function": {"name": "x"}}],
        }
    )
    spec = tool_call_constraint(TWO_TOOLS, request.tool_choice, parallel)
    compiler = smollm.engine.compile_grammar(spec)
    eos = smollm.tokenizer.eos_token_id

    def whole_reply_ok(reply: str) -> bool:
        matcher = compiler.matcher(spec, {eos})
        return matcher.accept_string(reply) and matcher.accept_token(eos)

    assert all(whole_reply_ok(reply) for reply in accepted)
    assert not any(whole_reply_ok(reply) for reply in rejected)
