"""Tool calls out of generated text, streamed or whole, and the tools into the prompt."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from openai import OpenAI

from ember.server.chat import ChatFormatter
from ember.server.launch import ServerProcess
from ember.server.protocol import ChatMessage, Tool
from ember.server.tool_stream import ToolCallDelta, ToolCallParser, merged_openai_deltas, split_tool_calls
from ember.server.tools import (
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    MISTRAL_V11,
    PYTHONIC,
    QWEN3_CODER,
    TOOL_CALL_FORMATS,
    ParsedToolCall,
    ToolCallFormat,
    tool_call_format,
)
from tests.test_server import MODEL, QUESTION, streamed_reply
from tests.test_server import TOOLS as API_TOOLS

# A chat template in the manner of Llama 3.1-3.3's: tools as JSON in the system turn, a call as the assistant's
# whole turn, one per turn, results in an "ipython" turn
LLAMA3_TEMPLATE = (
    "{{- bos_token }}<|start_header_id|>system<|end_header_id|>\n\n"
    "{%- if tools %}Environment: ipython\nAnswer a question a function can answer with a call, as JSON: "
    '{"name": function name, "parameters": its arguments}.\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}'
    "{%- endif %}"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content }}{% set messages = messages[1:] %}{% endif %}"
    "<|eot_id|>"
    "{%- for m in messages %}"
    "{%- if m.tool_calls %}"
    "{%- if m.tool_calls | length != 1 %}{{ raise_exception('one tool call per turn') }}{% endif %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    '{"name": "{{ m.tool_calls[0].function.name }}", "parameters": {{ m.tool_calls[0].function.arguments | tojson }}}'
    "<|eot_id|>"
    "{%- elif m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
    "{%- else %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# A chat template in the manner of Mistral-7B-Instruct-v0.3's: tools in [AVAILABLE_TOOLS] before the last user
# turn, a turn's calls as [TOOL_CALLS] and a JSON array, results in [TOOL_RESULTS]; call ids of 9 characters only
MISTRAL_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}"
    "{%- if m.role == 'user' %}"
    "{%- if loop.last and tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "[INST]{{ m.content }}[/INST]"
    "{%- elif m.tool_calls %}[TOOL_CALLS]["
    "{%- for c in m.tool_calls %}{% if c.id | length != 9 %}{{ raise_exception('call ids of 9, please') }}{% endif %}"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}, "id": "{{ c.id }}"}'
    "{%- if not loop.last %}, {% endif %}{% endfor %}]{{ eos_token }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if m.tool_call_id | length != 9 %}{{ raise_exception('call ids of 9, please') }}{% endif %}"
    '[TOOL_RESULTS]{"content": {{ m.content | tojson }}, "call_id": "{{ m.tool_call_id }}"}[/TOOL_RESULTS]'
    "{%- elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
)
# A chat template in the manner of Qwen3.5's (and Qwen3-Coder's): tools as JSON lines in the system turn, a call as
# <function=...> with a <parameter=...> element per argument (strings bare, Python's spelling of other scalars,
# JSON for objects and lists), results in a user turn
QWEN_XML_TEMPLATE = (  # (apply_chat_template trims the newline after a block tag: newlines there are {{ nl }})
    "{%- set nl = '\\n' %}"
    "{%- if tools %}<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>"
    "{%- for t in tools %}{{ nl }}{{ t | tojson }}{% endfor %}{{ nl }}</tools>\n\nIf you choose to call a function "
    "ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n"
    "<parameter=example_parameter_1>\nvalue_1\n</parameter>\n</function>\n</tool_call><|im_end|>{{ nl }}{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>{{ nl }}"
    "{%- elif m.tool_calls %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{%- for c in m.tool_calls %}{{ nl }}<tool_call>\n<function={{ c.function.name }}>{{ nl }}"
    "{%- for key, value in c.function.arguments | items %}<parameter={{ key }}>{{ nl }}"
    "{%- if value is mapping or (value is sequence and value is not string) %}{{ value | tojson }}"
    "{%- else %}{{ value | string }}{% endif %}{{ nl }}</parameter>{{ nl }}{% endfor %}</function>\n</tool_call>"
    "{%- endfor %}<|im_end|>{{ nl }}"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{{ nl }}{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant{{ nl }}{% endif %}"
)
# A chat template in the manner of Mistral Small 3.2's (v11 tokenizers): a turn's calls as [TOOL_CALLS], the name,
# [ARGS] and the arguments, back to back
MISTRAL_V11_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}"
    "{%- if m.role == 'user' %}"
    "{%- if loop.last and tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "[INST]{{ m.content }}[/INST]"
    "{%- elif m.tool_calls %}"
    "{%- for c in m.tool_calls %}[TOOL_CALLS]{{ c.function.name }}[ARGS]{{ c.function.arguments | tojson }}"
    "{%- endfor %}{{ eos_token }}"
    "{%- elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]"
    "{%- elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
)
V11_REPLY = (
    'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris [ARGS]}[TOOL_CALLS]"}[TOOL_CALLS]get_time[ARGS] {}'
    "[TOOL_CALLS]get time[ARGS]{}[TOOL_CALLS]get_ti"
)
MISTRAL_REPLY = (
    'Checking. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris ]\\"}, {"}}, '
    '{"name": "get_time", "arguments": {}}][TOOL_CALLS][{"name": "get_ti'
)

REPLY = (
    "Let me check both.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    "<tool_call>not json</tool_call>"
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET", "note": "<tool_call> inside"}}\n</tool_call>'
    " Done <tool"
)


def xml_call(name: str, **arguments: str) -> str:
    """A call as Qwen3-Coder and Qwen3.5 write it, each argument's text given as it is written."""
    elements = "".join(f"<parameter={key}>\n{text}\n</parameter>\n" for key, text in arguments.items())
    return f"<tool_call>\n<function={name}>\n{elements}</function>\n</tool_call>"


XML_REPLY = (
    "I'll look.\n"
    + xml_call("get_weather", city="Paris </function> & <b>", days="3")
    + "\n<tool_call>\n<function=get_date>\nchat</function>\n</tool_call>"  # not a call: text beside elements
    + xml_call("get_time")
    + "\n<tool_call>\n<function=get_wea"
)

XML_WITHOUT_NEWLINES = (  # values without the newlines around them, a closing tag's start inside one
    "<tool_call>\n<function=get_weather>\n<parameter=city>Paris</para</parameter>\n</function>\n</tool_call>\n"
    "<tool_call>\n<function=get_time>\n<parameter=zone>\nCET</parameter></function>\n</tool_call>"
)


def calls_of(parsed: list) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed]


def test_whole_reply_splits_into_content_and_calls() -> None:
    content, calls = split_tool_calls(REPLY, HERMES)
    assert calls_of(calls) == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "CET", "note": "<tool_call> inside"}),
    ]
    assert content == "Let me check both.\n<tool_call>not json</tool_call> Done <tool"  # a call's separator is not text
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_only_calls_give_no_content_and_plain_text_gives_no_calls() -> None:
    content, calls = split_tool_calls(' \n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n', HERMES)
    assert content is None and calls_of(calls) == [("f", {})]
    assert split_tool_calls("just text", HERMES) == ("just text", [])


# the pythonic format: a Python list of calls; brackets, quotes and separators inside strings are no call's
PY_REPLY = """[get_weather(city="Paris; [x](\\"y", days=[1, 2]), get_time(zone='CET', note="), ]")]"""
# Llama 3's format: the reply is the calls, joined by "; "; braces and the separator inside strings are no call
LLAMA_REPLY = (
    ' {"name": "get_weather", "parameters": {"city": "Paris; {\\"name\\"", "days": [1, {"a": "}}"}]}}; '
    '{"name": "get_time", "arguments": {}}; {"name": "get_time", "param'
)


@pytest.mark.parametrize(
    ("fmt", "reply"),
    [
        (HERMES, REPLY),
        (LLAMA3_JSON, LLAMA_REPLY),
        (MISTRAL, MISTRAL_REPLY),
        (QWEN3_CODER, XML_REPLY),
        (QWEN3_CODER, XML_WITHOUT_NEWLINES),
        (MISTRAL_V11, V11_REPLY),
        (PYTHONIC, PY_REPLY),
    ],
)
@pytest.mark.parametrize("piece", [1, 2, 3, 7])
@pytest.mark.parametrize("bound", [False, True])
def test_streamed_pieces_give_the_same_split_and_hold_back_only_a_possible_call(
    fmt: ToolCallFormat, reply: str, piece: int, bound: bool
) -> None:
    """Streamed or whole, the same content and calls. Bound to the request's tools, a call of one streams: its
    first piece names it, its pieces of arguments join up to the whole call's (a call written otherwise than
    the grammar writes them is read whole)."""
    fmt = fmt.for_tools(TWO_TOOLS) if bound else fmt
    parser = ToolCallParser(fmt)
    content, deltas = "", []
    for start in range(0, len(reply), piece):
        text, new_deltas = parser.feed(reply[start : start + piece])
        content += text
        deltas += new_deltas
        pending = parser.pending
        if parser.call is not None:
            # a call's text goes out as it comes, but a tag's start (its closing text, an element's)
            assert len(pending) < max(len(parser.call.end), len("\n</parameter>")) + 1
        else:
            assert (
                len(pending) < len(fmt.trigger) or pending.startswith((fmt.trigger, fmt.separator)) or parser.in_group
            )
    rest, last = parser.finish()
    content, deltas = content + rest, deltas + last
    whole_content, whole_calls = split_tool_calls(reply, fmt)
    calls = streamed_calls(deltas)
    assert (content if content.strip() else None) == whole_content and calls_of(calls) == calls_of(whole_calls)
    assert parser.num_calls == 2 and [c.name for c in calls] == ["get_weather", "get_time"]
    streamed = [d for d in deltas if d.index == 0]
    assert len(streamed) > 2 if bound else len(streamed) == 1  # streamed in pieces, or read whole


def streamed_calls(deltas: list[ToolCallDelta]) -> list:
    """The calls of a stream's pieces, each checked against its pieces: first the id and name, then arguments
    that join up to the whole call's."""
    calls = []
    for index in sorted({d.index for d in deltas}):
        pieces = [d for d in deltas if d.index == index]
        first, last = pieces[0], pieces[-1]
        assert first.id is not None and all(d.id is None for d in pieces[1:]) and last.done is not None
        assert last.done.id == first.id and last.done.name == first.name
        assert "".join(d.arguments for d in pieces) == last.done.arguments
        calls.append(last.done)
    return calls


def test_a_bound_call_streams_its_name_then_its_arguments_as_they_are_written() -> None:
    """A long call's text goes out as it comes: the name once the opening tag is complete, a string parameter's
    text as written (less a possible closing tag's start), JSON arguments as written; OpenAI deltas of a
    chunk's pieces are one per call."""
    write = Tool.model_validate(
        {"type": "function", "function": {"name": "write", "parameters": {"type": "object", "properties": {
            "path": {"type": "string"}, "mode": {"type": "integer"}, "content": {"type": "string"}}}}}
    )  # fmt: skip
    xml = ToolCallParser(QWEN3_CODER.for_tools([write]))
    _, deltas = xml.feed("<tool_call>\n<function=wri")
    assert deltas == []
    _, deltas = xml.feed("te>\n<parameter=path>\na.py\n</parameter>\n<parameter=mode>\n6")
    assert [(d.name, d.arguments) for d in deltas] == [("write", ""), (None, '{"path": "a.py", "mode": ')]
    _, deltas = xml.feed('44\n</parameter>\n<parameter=content>\nprint("hi")\n\nx = 1\n</para')
    assert "".join(d.arguments for d in deltas) == '644, "content": "print(\\"hi\\")\\n\\nx = 1'
    _, deltas = xml.feed("meter>\n</function>\n</tool_call>")
    assert deltas[-1].done is not None and json.loads(deltas[-1].done.arguments) == {
        "path": "a.py", "mode": 644, "content": 'print("hi")\n\nx = 1'
    }  # fmt: skip

    hermes = ToolCallParser(HERMES.for_tools([write]))
    _, deltas = hermes.feed('<tool_call>\n{"name": "write", "arguments": {"content": "a\\nb')
    assert merged_openai_deltas(deltas) == [
        {
            "index": 0,
            "id": deltas[0].id,
            "type": "function",
            "function": {"name": "write", "arguments": '{"content": "a\\nb'},
        }
    ]
    _, deltas = hermes.feed('"}}\n</tool_call>')
    assert merged_openai_deltas(deltas) == [{"index": 0, "function": {"arguments": '"}'}}]
    assert deltas[-1].done is not None and json.loads(deltas[-1].done.arguments) == {"content": "a\nb"}


def test_a_streamed_call_cut_off_by_max_tokens_ends_with_what_was_written() -> None:
    parser = ToolCallParser(HERMES.for_tools(TOOLS))
    _, deltas = parser.feed('Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par')
    rest, last = parser.finish()
    assert rest == "" and [d.done for d in last] == [ParsedToolCall(deltas[0].id, "get_weather", '{"city": "Par')]


def test_llama3_json_replies_split_into_calls_or_text() -> None:
    content, calls = split_tool_calls(LLAMA_REPLY, LLAMA3_JSON)
    assert calls_of(calls) == [
        ("get_weather", {"city": 'Paris; {"name"', "days": [1, {"a": "}}"}]}),
        ("get_time", {}),  # "arguments" is read too, as vLLM's parser does
    ]
    assert content is None  # only calls (the last, cut off by max_tokens, is dropped)
    assert split_tool_calls('Use {"x": 1} or {"name', LLAMA3_JSON) == ('Use {"x": 1} or {"name', [])
    assert split_tool_calls('{"name": 7, "parameters": {}}', LLAMA3_JSON) == ('{"name": 7, "parameters": {}}', [])
    only_call = '{"name": "f", "parameters": {"a": 1}}'
    assert LLAMA3_JSON.render([("f", {"a": 1})]) == only_call
    assert LLAMA3_JSON.tag("f") == ('{"name": "f", "parameters": ', "}")


def test_mistral_calls_are_one_json_array_after_the_trigger_with_short_ids() -> None:
    content, calls = split_tool_calls(MISTRAL_REPLY, MISTRAL)
    assert content == "Checking. "  # the second group, cut off by max_tokens, is no text
    assert calls_of(calls) == [("get_weather", {"city": 'Paris ]"}, {'}), ("get_time", {})]
    assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)  # Mistral's templates take no other ids
    assert MISTRAL.template_id("call_0123456789abcdef") == MISTRAL.template_id("call_0123456789abcdef")
    assert len(MISTRAL.template_id("call_x")) == 9 and MISTRAL.template_id("abcDEF123") == "abcDEF123"
    assert HERMES.template_id("call_x") == "call_x"
    assert (
        MISTRAL.render([("f", {"a": 1}), ("g", {})])
        == '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]'
    )


def test_mistral_v11_calls_are_the_name_then_the_arguments_after_each_trigger() -> None:
    content, calls = split_tool_calls(V11_REPLY, MISTRAL_V11)
    assert content == "Sure. [TOOL_CALLS]get time[ARGS]{}"  # a name with a blank is no call; the last is cut off
    assert calls_of(calls) == [("get_weather", {"city": "Paris [ARGS]}[TOOL_CALLS]"}), ("get_time", {})]
    assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)
    assert MISTRAL_V11.render([("f", {"a": 1}), ("g", {})]) == '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{}'
    assert split_tool_calls("[TOOL_CALLS]f[ARGS][1]", MISTRAL_V11) == ("[TOOL_CALLS]f[ARGS][1]", [])


TYPED = Tool.model_validate(
    {
        "type": "function",
        "function": {
            "name": "edit",
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "line": {"type": "integer"},
                    "scale": {"type": "number"},
                    "force": {"type": "boolean"},
                    "note": {"type": ["string", "null"]},
                    "options": {"type": "object"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "anything": {},
                },
            },
        },
    }
)


def test_qwen_xml_calls_read_each_value_by_its_parameters_schema() -> None:
    """A value's text says no type: a string parameter keeps the text as written (digits and code too, blank
    lines and indents kept), the others are read as JSON or as the Python literals Qwen's templates write; a
    parameter the schema does not know stays text, and text that is no value of its type stays text."""
    code = "def f():\n\n    return '</para'\n"
    reply = xml_call(
        "edit", path="007", line="12", scale="1.5", force="True", note="None", options='{"a": [1]}',
        tags="['x', 'y']", anything="[1, 2]", extra="42", code=code,
    )  # fmt: skip
    content, calls = split_tool_calls(XML_REPLY, QWEN3_CODER.for_tools(TOOLS))
    assert content == "I'll look.\n<tool_call>\n<function=get_date>\nchat</function>\n</tool_call>"
    assert calls_of(calls) == [("get_weather", {"city": "Paris </function> & <b>", "days": "3"}), ("get_time", {})]
    fmt = QWEN3_CODER.for_tools([TYPED])
    content, calls = split_tool_calls(reply, fmt)
    assert content is None
    assert calls_of(calls) == [
        (
            "edit",
            {
                "path": "007", "line": 12, "scale": 1.5, "force": True, "note": None, "options": {"a": [1]},
                "tags": ["x", "y"], "anything": [1, 2], "extra": "42", "code": code,
            },
        )
    ]  # fmt: skip
    assert calls_of(split_tool_calls(xml_call("edit", line="twelve", force="yes"), fmt)[1]) == [
        ("edit", {"line": "twelve", "force": "yes"})
    ]
    sets = calls_of(split_tool_calls(xml_call("edit", tags="{'x', 'y'}", options="b'x'"), fmt)[1])
    assert sets == [("edit", {"tags": "{'x', 'y'}", "options": "b'x'"})]  # Python values that JSON has not: text
    unbound = calls_of(split_tool_calls(xml_call("edit", line="12"), QWEN3_CODER)[1])
    assert unbound == [("edit", {"line": "12"})]  # no schema given: text
    assert QWEN3_CODER.render([("f", {"a": 1, "s": "x\ny", "o": {"k": None}})]) == (
        "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n<parameter=s>\nx\ny\n</parameter>\n"
        '<parameter=o>\n{"k": null}\n</parameter>\n</function>\n</tool_call>'
    )
    with pytest.raises(ValueError, match="must be a JSON object"):
        QWEN3_CODER.render([("f", [1])])


def test_a_call_cut_off_by_max_tokens_is_not_content() -> None:
    call = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
    content, calls = split_tool_calls(call + '<tool_call>\n{"name": "f", "argu', HERMES)
    assert content is None and calls_of(calls) == [("f", {"a": 1})]
    assert split_tool_calls('Sure. <tool_call>\n{"name": "f", "argu', HERMES) == ("Sure. ", [])
    assert split_tool_calls("Sure. <tool", HERMES) == ("Sure. <tool", [])  # not (yet) a call: text
    llama_call = '{"name": "f", "parameters": {"a": 1}}'
    assert calls_of(split_tool_calls(llama_call + "; ", LLAMA3_JSON)[1]) == [("f", {"a": 1})]
    assert split_tool_calls(llama_call + ";", LLAMA3_JSON)[0] is None  # the separator's start, cut off


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


def test_prompt_of_a_llama3_template_and_llama3_json_without_one(smollm) -> None:
    """A template that speaks Llama 3's format renders the tools, the call and its result itself (and refuses two
    calls in a turn, a 400 upstream); a template that knows no tools gets Ember's instructions in the format named."""
    formatter = ChatFormatter(smollm.tokenizer, LLAMA3_TEMPLATE)
    assert formatter.native_tools and formatter.tool_format is LLAMA3_JSON
    messages = [ChatMessage(role="user", content="Weather in Paris?"), call_message("get_weather"), RESULT]
    text, _ = formatter.prompt(messages, TOOLS)
    assert '{"type": "function", "function": {"name": "get_weather"' in text and "<tool_call>" not in text
    assert '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": ' in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n18 C, sunny<|eot_id|>" in text
    two_calls = call_message("get_weather", "get_weather")
    with pytest.raises(ValueError, match="one tool call per turn"):
        formatter.prompt([messages[0], two_calls, RESULT], TOOLS)

    plain = ChatFormatter(smollm.tokenizer, tool_call_parser="llama3_json")
    assert not plain.native_tools and plain.tool_format is LLAMA3_JSON
    text, _ = plain.prompt([messages[0], two_calls, RESULT], TOOLS)
    assert 'a JSON object like this one for each call:\n{"name": "<function name>", "parameters": {<arg' in text
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert f"{call}; {call}" in text and "<tool_response>\n18 C, sunny\n</tool_response>" in text


def test_prompt_of_a_mistral_template_gets_call_ids_it_takes(smollm) -> None:
    """Mistral's templates refuse call ids other than 9 letters and digits: the client's ids (OpenAI's, or
    another server's) reach the template mapped, a call and its result alike."""
    formatter = ChatFormatter(smollm.tokenizer, MISTRAL_TEMPLATE)
    assert formatter.native_tools and formatter.tool_format is MISTRAL
    messages = [ChatMessage(role="user", content="Weather in Paris?"), call_message("get_weather"), RESULT]
    text, _ = formatter.prompt(messages, TOOLS)
    short = MISTRAL.template_id("c1")
    assert f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {{"city": "Paris"}}, "id": "{short}"}}]' in text
    assert f'"call_id": "{short}"}}[/TOOL_RESULTS]' in text and "[AVAILABLE_TOOLS]" not in text  # not the last turn
    assert "[AVAILABLE_TOOLS]" in formatter.prompt(messages[:1], TOOLS)[0]


def call_message(*names: str) -> ChatMessage:
    """An assistant turn that calls `names`, each with city Paris."""
    calls = [
        {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": '{"city":"Paris"}'}}
        for i, name in enumerate(names, start=1)
    ]
    return ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": calls})


RESULT = ChatMessage(role="tool", content="18 C, sunny", tool_call_id="c1")


def test_prompt_of_a_qwen_xml_template_and_qwen3_coder_without_one(smollm) -> None:
    """A Qwen3.5-style template renders the tools and the calls sent back itself (their arguments as objects); a
    template that knows no tools gets Ember's instructions and history in that format when it is named."""
    formatter = ChatFormatter(smollm.tokenizer, QWEN_XML_TEMPLATE)
    assert formatter.native_tools and formatter.tool_format is QWEN3_CODER
    messages = [ChatMessage(role="user", content="Weather in Paris?"), call_message("get_weather"), RESULT]
    text, _ = formatter.prompt(messages, TOOLS)
    assert '\n{"type": "function", "function": {"name": "get_weather"' in text
    assert "<|im_start|>assistant\n\n" + xml_call("get_weather", city="Paris") + "<|im_end|>" in text
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in text

    plain = ChatFormatter(smollm.tokenizer, tool_call_parser="qwen3_coder")
    assert not plain.native_tools and plain.tool_format is QWEN3_CODER
    text, _ = plain.prompt(messages, TOOLS)
    assert "<tool_call>\n<function=<function name>>\n<parameter=<parameter name>>\n<its value>\n</parameter>" in text
    assert xml_call("get_weather", city="Paris") in text


def test_template_detection() -> None:
    hermes_template = "{% if tools %}...<tool_call>...{% endif %}"
    assert HERMES.speaks(hermes_template) and not LLAMA3_JSON.speaks(hermes_template)
    assert LLAMA3_JSON.speaks(LLAMA3_TEMPLATE) and not HERMES.speaks(LLAMA3_TEMPLATE)
    assert not HERMES.speaks("{{ message['content'] }}") and not HERMES.speaks(None)
    assert tool_call_format("auto", hermes_template) is HERMES
    assert tool_call_format("auto", LLAMA3_TEMPLATE) is LLAMA3_JSON
    assert tool_call_format("auto", "{{ messages }}") is HERMES  # no format spoken: Ember's instructions for Hermes
    assert tool_call_format("llama3_json", hermes_template) is LLAMA3_JSON
    assert tool_call_format("auto", QWEN_XML_TEMPLATE) is QWEN3_CODER  # it holds <tool_call> too
    assert tool_call_format("auto", MISTRAL_V11_TEMPLATE) is MISTRAL_V11 and not MISTRAL_V11.speaks(MISTRAL_TEMPLATE)
    assert tool_call_format("auto", MISTRAL_TEMPLATE) is MISTRAL
    # vLLM's `mistral` is either form: the one the template speaks, else the JSON array
    assert tool_call_format("mistral", MISTRAL_V11_TEMPLATE) is MISTRAL_V11
    assert tool_call_format("mistral", MISTRAL_TEMPLATE) is tool_call_format("mistral", None) is MISTRAL
    assert not QWEN3_CODER.speaks(hermes_template)


def test_the_command_line_offers_every_format() -> None:
    """serve.py lists the formats by hand (the command line loads no server module before it runs)."""
    from ember.server.serve import TOOL_CALL_PARSERS

    assert set(TOOL_CALL_PARSERS) == {"auto", *TOOL_CALL_FORMATS}


CALL_WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_TIME = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
TWO_TOOLS = [
    *TOOLS,
    Tool.model_validate({"type": "function", "function": {"name": "get_time", "description": "The time now"}}),
]


LLAMA_WEATHER = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
MISTRAL_WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
MISTRAL_TIME = '{"name": "get_time", "arguments": {}}'
LLAMA_TIME = '{"name": "get_time", "parameters": {}}'
XML_WEATHER = xml_call("get_weather", city="Paris")
V11_WEATHER = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'
V11_TIME = "[TOOL_CALLS]get_time[ARGS]{}"
XML_TIME = xml_call("get_time")
PY_WEATHER = 'get_weather(city="Paris")'
PY_TIME = "get_time()"


@pytest.mark.parametrize(
    ("fmt", "choice", "parallel", "accepted", "rejected"),
    [
        (
            HERMES,
            "auto",
            True,
            ["Just text.", "Let me look.\n" + CALL_WEATHER, CALL_WEATHER + "\n" + CALL_TIME],
            [CALL_WEATHER + " and more text", CALL_WEATHER.replace("get_weather", "get_wether"), CALL_TIME[:-1]],
        ),
        (HERMES, "auto", False, ["Text " + CALL_TIME], [CALL_WEATHER + "\n" + CALL_TIME]),
        (
            HERMES,
            "required",
            True,
            [CALL_TIME, CALL_TIME + "\n" + CALL_WEATHER],
            ["Just text.", "Sure: " + CALL_TIME, ""],
        ),
        (HERMES, {"type": "function", "function": {"name": "get_time"}}, True, [CALL_TIME], [CALL_WEATHER, "text"]),
        (
            LLAMA3_JSON,
            "auto",
            True,
            ["Just text.", LLAMA_WEATHER, LLAMA_WEATHER + "; " + LLAMA_TIME],
            [LLAMA_WEATHER + " and more", LLAMA_WEATHER + "\n" + LLAMA_TIME, CALL_TIME, LLAMA_TIME[:-1]],
        ),
        (LLAMA3_JSON, "auto", False, [LLAMA_TIME], [LLAMA_WEATHER + "; " + LLAMA_TIME]),
        (LLAMA3_JSON, "required", True, [LLAMA_TIME, LLAMA_TIME + "; " + LLAMA_TIME], ["Just text.", CALL_TIME]),
        (LLAMA3_JSON, {"type": "function", "function": {"name": "get_time"}}, True, [LLAMA_TIME], [LLAMA_WEATHER]),
        (
            MISTRAL,
            "auto",
            True,
            ["Just text.", f"[TOOL_CALLS][{MISTRAL_TIME}]", f"Sure. [TOOL_CALLS][{MISTRAL_WEATHER}, {MISTRAL_TIME}]"],
            [f"[TOOL_CALLS]{MISTRAL_TIME}", f"[TOOL_CALLS][{MISTRAL_TIME}] more", f"[TOOL_CALLS][{MISTRAL_TIME}"],
        ),
        (MISTRAL, "auto", False, [f"[TOOL_CALLS][{MISTRAL_TIME}]"], [f"[TOOL_CALLS][{MISTRAL_TIME}, {MISTRAL_TIME}]"]),
        (MISTRAL, "required", True, [f"[TOOL_CALLS][{MISTRAL_WEATHER}]"], ["Just text.", MISTRAL_TIME]),
        (
            QWEN3_CODER,
            "auto",
            True,
            [
                "Just text.",
                "Sure.\n" + XML_WEATHER,
                XML_WEATHER + "\n" + XML_TIME,
                XML_WEATHER.replace("\n</parameter>", "</parameter>"),
            ],
            [XML_WEATHER + " more", XML_WEATHER.replace("city", "town"), XML_TIME[:-1], CALL_WEATHER],
        ),
        (QWEN3_CODER, "required", False, [XML_TIME], ["Just text.", XML_TIME + "\n" + XML_TIME]),
        (
            MISTRAL_V11,
            "auto",
            True,
            ["Just text.", "Sure. " + V11_WEATHER, V11_WEATHER + V11_TIME],
            [V11_TIME + " more", V11_TIME.replace("[ARGS]", ""), f"[TOOL_CALLS][{MISTRAL_TIME}]", V11_WEATHER[:-1]],
        ),
        (MISTRAL_V11, "required", False, [V11_TIME], ["Just text.", V11_TIME + V11_TIME]),
        (QWEN3_CODER, {"type": "function", "function": {"name": "get_time"}}, True, [XML_TIME], [XML_WEATHER]),
        (
            PYTHONIC,
            "auto",
            True,
            ["Just text.", "Text [with] brackets", f"[{PY_WEATHER}]", f"[{PY_WEATHER}, {PY_TIME}]", "[get_weather()]"],
            [
                f"[{PY_WEATHER}] more",
                "[1, 2]",
                f"[{PY_WEATHER.replace('weather', 'wether')}]",
                "[get_weather(city=Paris)]",
                "[get_weather(town='Paris')]",
                f"[{PY_WEATHER}",
            ],
        ),
        (PYTHONIC, "auto", False, [f"[{PY_TIME}]"], [f"[{PY_WEATHER}, {PY_TIME}]"]),
        (PYTHONIC, "required", True, [f"[{PY_TIME}, {PY_WEATHER}]"], ["Just text.", ""]),
    ],
)
def test_tool_grammar_allows_exactly_well_formed_calls(
    smollm, fmt: ToolCallFormat, choice: object, parallel: bool, accepted: list[str], rejected: list[str]
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
    spec = tool_call_constraint(TWO_TOOLS, request.tool_choice, parallel, fmt)
    compiler = smollm.engine.compile_grammar(spec)
    eos = smollm.tokenizer.eos_token_id

    def whole_reply_ok(reply: str) -> bool:
        matcher = compiler.matcher(spec, {eos})
        return matcher.accept_string(reply) and matcher.accept_token(eos)

    assert all(whole_reply_ok(reply) for reply in accepted)
    assert not any(whole_reply_ok(reply) for reply in rejected)


def test_a_llama3_template_takes_and_gives_calls_in_its_format(server: ServerProcess) -> None:
    """`--tool-call-parser auto` on a Llama-3-style template (the request's own, vLLM's `chat_template`, which the
    shared server trusts): the template renders the tools (no Ember instructions), the model writes `{"name": ...,
    "parameters": ...}` (one call unless parallel calls are asked for, then joined by "; "), which come back as
    OpenAI tool calls, whole and streamed, and through the Responses API; the call sent back is rendered by the
    template."""
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    template = {"chat_template": LLAMA3_TEMPLATE}
    asked = {"messages": QUESTION, "tools": API_TOOLS}
    ids = httpx.post(f"{server.url}/tokenize", json={**asked, **template}).json()["tokens"]
    prompt = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert "Environment: ipython" in prompt and "<tool_call>" not in prompt
    ids = httpx.post(f"{server.url}/tokenize", json=asked).json()["tokens"]  # the server's own template: Hermes
    assert "<tool_call>" in httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"]

    kwargs: dict[str, Any] = dict(messages=QUESTION, tools=API_TOOLS, max_tokens=60, temperature=0, extra_body=template)
    required = client.chat.completions.create(model=MODEL, tool_choice="required", **kwargs).choices[0]
    assert required.finish_reason == "tool_calls" and required.message.content is None
    (call,) = required.message.tool_calls  # one: Llama 3's templates take one call per turn
    assert call.function.name in ("get_weather", "get_time") and isinstance(json.loads(call.function.arguments), dict)
    assert streamed_reply(client, tool_choice="required", **kwargs) == (
        "",
        [(call.function.name, call.function.arguments)],
        "tool_calls",
    )
    twice = [{"role": "user", "content": "Call get_weather twice: for Paris, then for Rome."}]
    several = client.chat.completions.create(
        model=MODEL, tool_choice="required", parallel_tool_calls=True, **{**kwargs, "messages": twice}
    )
    calls = several.choices[0].message.tool_calls
    assert several.choices[0].message.content is None and len(calls) >= 2
    assert [json.loads(c.function.arguments) for c in calls[:2]] == [{"city": "Paris"}, {"city": "Rome"}]

    conversation = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
    ]
    ids = httpx.post(f"{server.url}/tokenize", json={**asked, **template, "messages": conversation}).json()["tokens"]
    prompt = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"]
    sent_back = f'{{"name": "{call.function.name}", "parameters": {call.function.arguments}}}'
    assert f"<|end_header_id|>\n\n{sent_back}<|eot_id|>" in prompt, prompt

    function = {k: v for k, v in API_TOOLS[0]["function"].items()}
    response = client.responses.create(
        model=MODEL,
        input=QUESTION[0]["content"],
        tools=[{"type": "function", **function}],
        tool_choice="required",
        extra_body=template,
    )
    (item,) = response.output
    assert item.type == "function_call" and item.name == "get_weather" and "city" in json.loads(item.arguments)


FORECAST = {
    "type": "function",
    "function": {
        "name": "get_forecast",
        "description": "Weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["city", "days"],
        },
    },
}


def forecast_call_and_its_prompt(server: ServerProcess, template: dict[str, str]) -> tuple[dict[str, Any], str]:
    """A forecast asked for with tool_choice "required" under `template` (the request's own): its arguments (checked:
    one call of get_forecast, the city a string, the days an integer, streamed the same), and the prompt of the
    conversation sent back with that call and its result."""
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    question = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]
    # one call: left free to write more, this small model repeats it until max_tokens
    kwargs: dict[str, Any] = dict(
        messages=question, tools=[FORECAST], max_tokens=60, temperature=0, parallel_tool_calls=False,
        extra_body=template,
    )  # fmt: skip
    reply = client.chat.completions.create(model=MODEL, tool_choice="required", **kwargs).choices[0]
    assert reply.finish_reason == "tool_calls" and reply.message.content is None
    (call,) = reply.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_forecast" and set(arguments) == {"city", "days"}
    assert isinstance(arguments["city"], str) and type(arguments["days"]) is int
    assert streamed_reply(client, tool_choice="required", **kwargs) == (
        "",
        [("get_forecast", call.function.arguments)],
        "tool_calls",
    )
    conversation = [
        *question,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
    ]
    asked = {"messages": conversation, "tools": [FORECAST], **template}
    ids = httpx.post(f"{server.url}/tokenize", json=asked).json()["tokens"]
    return arguments, httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"]


def test_a_qwen_xml_template_takes_and_gives_calls_in_its_format(server: ServerProcess) -> None:
    """`--tool-call-parser auto` on a Qwen3.5-style template (the request's own): the model writes
    `<function=...>` with `<parameter=...>` elements under the grammar, which come back as OpenAI tool calls
    with each value of its schema's type (the integer as a number, within the schema's bounds), whole and
    streamed; the call sent back is rendered by the template."""
    arguments, prompt = forecast_call_and_its_prompt(server, {"chat_template": QWEN_XML_TEMPLATE})
    assert 1 <= arguments["days"] <= 9
    sent_back = xml_call("get_forecast", city=arguments["city"], days=str(arguments["days"]))
    assert f"<|im_start|>assistant\n\n{sent_back}<|im_end|>" in prompt, prompt


NOTE = {
    "type": "function",
    "function": {
        "name": "save_note",
        "description": "Save a note",
        "parameters": {
            "type": "object",
            "properties": {"text": {"type": "string", "maxLength": 60}},
            "required": ["text"],
        },
    },
}


def test_a_call_streams_in_pieces_through_each_api(server: ServerProcess) -> None:
    """A call's arguments reach a streaming client as they are written, not at the call's end: in the chat
    API's deltas (the first with the id and name), the Responses API's argument deltas and the Messages API's
    input_json deltas; joined, they are the call the API's whole reply gives."""
    import anthropic

    question = "Save a note about the weather in Paris."
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    chat: dict[str, Any] = dict(
        model=MODEL, messages=[{"role": "user", "content": question}], tools=[NOTE], max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "save_note"}},
    )  # fmt: skip
    whole = client.chat.completions.create(**chat).choices[0].message.tool_calls[0]
    assert len(json.loads(whole.function.arguments)["text"]) > 10
    chunks = client.chat.completions.create(stream=True, **chat)
    pieces = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(pieces) > 3 and pieces[0].function.name == "save_note" and pieces[0].id is not None
    assert all(p.id is None and p.function.name is None for p in pieces[1:])
    assert "".join(p.function.arguments or "" for p in pieces) == whole.function.arguments

    tool = {"type": "function", "name": "save_note", "parameters": NOTE["function"]["parameters"]}
    asked: dict[str, Any] = dict(
        model=MODEL, input=question, tools=[tool], tool_choice={"type": "function", "name": "save_note"},
        temperature=0, max_output_tokens=80,
    )  # fmt: skip
    (item,) = client.responses.create(**asked).output
    events = list(client.responses.create(stream=True, **asked))
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(deltas) > 3 and "".join(deltas) == done.arguments == item.arguments

    messages = anthropic.Anthropic(base_url=server.url, api_key="unused").messages
    ask: dict[str, Any] = dict(
        model=MODEL, max_tokens=80, extra_body={"temperature": 0}, messages=[{"role": "user", "content": question}],
        tools=[{"name": "save_note", "description": "Save a note", "input_schema": NOTE["function"]["parameters"]}],
        tool_choice={"type": "tool", "name": "save_note"},
    )  # fmt: skip
    (block,) = messages.create(**ask).content
    with messages.stream(**ask) as stream:
        deltas = [e.delta for e in stream if e.type == "content_block_delta"]
        partial = [delta.partial_json for delta in deltas if delta.type == "input_json_delta"]
        final = stream.get_final_message()
    assert len(partial) > 3 and json.loads("".join(partial)) == final.content[0].input == block.input


GEMMA2_TEMPLATE = (  # Gemma 2's own, which refuses a system role
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)


def test_a_template_without_a_system_role_takes_it_in_the_first_user_turn(smollm) -> None:
    """Gemma 2's template refuses system messages: a system prompt, and Ember's tool instructions, go before the
    first user message's text; what the template refuses for another reason is still a clear error."""
    formatter = ChatFormatter(smollm.tokenizer, GEMMA2_TEMPLATE)
    messages = [ChatMessage(role="system", content="Answer in French."), ChatMessage(role="user", content="Hi!")]
    text, _ = formatter.prompt(messages)
    assert "<start_of_turn>user\nAnswer in French.\n\nHi!<end_of_turn>\n<start_of_turn>model\n" in text
    text, _ = formatter.prompt(messages[1:], TOOLS)
    user_turn = text[text.index("<start_of_turn>user\n") :]
    assert user_turn.index('"name": "get_weather"') < user_turn.index("Hi!<end_of_turn>")
    with pytest.raises(ValueError, match="roles must alternate"):
        formatter.prompt([*messages, ChatMessage(role="user", content="Again?")])


def test_pythonic_calls_are_the_whole_reply_or_none() -> None:
    """A pythonic reply is a Python list of calls or text: brackets in text are text, a list that is no calls
    is text (and so is all after it), calls render back as the model writes them."""
    content, calls = split_tool_calls(PY_REPLY, PYTHONIC)
    assert content is None and calls_of(calls) == [
        ("get_weather", {"city": 'Paris; [x]("y', "days": [1, 2]}),
        ("get_time", {"zone": "CET", "note": "), ]"}),
    ]
    for text in ("See [1] and [get_time()]", "[1, 2] is a list; [get_time()]", "Sure.\n[get_time()]"):
        assert split_tool_calls(text, PYTHONIC.for_tools(TWO_TOOLS)) == (text, [])
    nested = "[get_time(x=" + "[" * 500 + "]" * 500 + ")]"  # deeper than Python's parser goes
    for text in (nested, "[get_time(zone=__import__('os').getcwd())]"):  # no literal: text (nothing is run)
        assert split_tool_calls(text, PYTHONIC) == (text, [])
    assert split_tool_calls(" \n[get_time()]", PYTHONIC)[1][0].name == "get_time"  # blanks before the calls
    rendered = PYTHONIC.render([("get_weather", {"city": "Paris", "days": [1, None, True]}), ("get_time", {})])
    assert rendered == '[get_weather(city="Paris", days=[1, None, True]), get_time()]'
    assert calls_of(split_tool_calls(rendered, PYTHONIC)[1])[0] == ("get_weather", {"city": "Paris",
                                                                   "days": [1, None, True]})  # fmt: skip


# A chat template in the manner of vLLM's pythonic ones (Llama 3.2, Llama 4, Gemma 3): the tools as JSON, calls
# as a Python list
PYTHONIC_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nHere is a list of functions in JSON format that you can invoke.\n"
    "{{ tools | tojson }}\nIf you decide to invoke any of the function(s), you MUST put it in the format of "
    "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]\n"
    "You SHOULD NOT include any other text in the response if you call a function.<|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{%- elif m.tool_calls %}<|im_start|>assistant\n[{% for c in m.tool_calls %}{{ c.function.name }}("
    "{%- for k, v in c.function.arguments | items %}{{ k }}={{ v | tojson }}{{ ', ' if not loop.last }}{% endfor %})"
    "{{ ', ' if not loop.last }}{% endfor %}]<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_pythonic_template_takes_and_gives_calls_in_its_format(server: ServerProcess) -> None:
    """`--tool-call-parser auto` on a template of vLLM's pythonic kind (the request's own): the model writes a
    Python list of calls under the grammar, which come back as OpenAI tool calls (the integer a number), whole
    and streamed; the call sent back is rendered by the template."""
    assert tool_call_format("auto", PYTHONIC_TEMPLATE) is PYTHONIC
    arguments, prompt = forecast_call_and_its_prompt(server, {"chat_template": PYTHONIC_TEMPLATE})
    sent_back = f"get_forecast(city={json.dumps(arguments['city'])}, days={arguments['days']})"
    assert f"<|im_start|>assistant\n[{sent_back}]<|im_end|>" in prompt, prompt
