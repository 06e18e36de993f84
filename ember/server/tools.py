"""Tool calling: the tools into the prompt, a grammar that keeps every call well formed, the calls out of the text.

The wire format is the `<tool_call>` block of Hermes-style models (Qwen2.5, Qwen3):
`<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>`. A model whose chat
template already speaks it gets the tools through its own template; any other (SmolLM2's template knows no
tools) gets Ember's own system instructions for the same format. Unless `tool_choice` is "none", an xgrammar
structural tag constrains the output, so that even a small model's calls always parse:
- "auto": free text, optionally followed by calls (one per line) and nothing after them: the reply ends where
  the client must run the tools;
- "required": only calls, at least one; a named function: exactly one call of it.
Each call names one of the tools, with arguments valid under its parameters' schema.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from ember.engine.structured_output import StructuredOutputs
from ember.server.protocol import NamedToolChoice, Tool

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
OPEN_PREFIXES = [TOOL_CALL_OPEN[:k] for k in range(len(TOOL_CALL_OPEN))]  # what a streamed reply may end on
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def template_speaks_tool_calls(chat_template: str | None) -> bool:
    """Whether a chat template renders `tools` and `<tool_call>` blocks itself."""
    return bool(chat_template and "tools" in chat_template and TOOL_CALL_OPEN in chat_template)


def tool_schemas(tools: list[Tool]) -> list[dict[str, Any]]:
    """The tools as OpenAI function objects, with a parameters schema for every function."""
    schemas = []
    for tool in tools:
        function = tool.function.model_dump(exclude_none=True)
        function["parameters"] = tool.function.parameters or NO_PARAMETERS
        schemas.append({"type": "function", "function": function})
    return schemas


def tools_instructions(tools: list[Tool]) -> str:
    """Ember's system-prompt section for models whose template knows no tools."""
    lines = "\n".join(json.dumps(schema["function"], ensure_ascii=False) for schema in tool_schemas(tools))
    return (
        "You can call functions (tools) to help with the user's request. The available functions, one JSON "
        f"signature per line, are:\n<tools>\n{lines}\n</tools>\n\n"
        "To call a function, reply with a block like this one for each call:\n"
        f'{TOOL_CALL_OPEN}\n{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}\n'
        f"{TOOL_CALL_CLOSE}\n"
        "The results come back in <tool_response></tool_response> blocks. Answer directly when no function helps."
    )


def render_tool_call(name: str, arguments: Any) -> str:
    """An earlier call as the model writes it (for conversations sent back with their tool calls)."""
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}"


def tool_call_constraint(
    tools: list[Tool], tool_choice: str | NamedToolChoice | None, parallel_tool_calls: bool
) -> StructuredOutputs:
    """The structural tag that keeps calls to `tools` well formed under `tool_choice` ("auto", "required" or a
    named function; the caller handles "none")."""
    from xgrammar import structural_tag as st

    if isinstance(tool_choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == tool_choice.function.name]
        parallel_tool_calls = False
    tags = [
        st.TagFormat(
            begin=f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(schema["function"]["name"])}, "arguments": ',
            # a small model left free pads JSON with whitespace until max_tokens: at most one blank at a time
            content=st.JSONSchemaFormat(json_schema=schema["function"]["parameters"], max_whitespace_cnt=1),
            end=f"}}\n{TOOL_CALL_CLOSE}",
        )
        for schema in tool_schemas(tools)
    ]
    calls = st.TagsWithSeparatorFormat(
        tags=tags, separator="\n", at_least_one=True, stop_after_first=not parallel_tool_calls
    )
    text = st.AnyTextFormat(excludes=[TOOL_CALL_OPEN])
    reply = (
        st.OrFormat(elements=[text, st.SequenceFormat(elements=[text, calls])])
        if tool_choice in (None, "auto")
        else calls
    )
    return StructuredOutputs(structural_tag=st.StructuralTag(format=reply).model_dump_json())


@dataclass
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def parse_tool_call(block: str) -> ParsedToolCall | None:
    """The call in the text between `<tool_call>` and `</tool_call>`, or None when it is not one."""
    try:
        call = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    return ParsedToolCall(f"call_{uuid.uuid4().hex[:24]}", call["name"], json.dumps(arguments, ensure_ascii=False))


class ToolCallParser:
    """Splits generated text, as it streams in, into content and tool calls. Text that may be the start of a
    `<tool_call>` is held back until it is known; a block that does not parse stays content."""

    def __init__(self) -> None:
        self.pending = ""
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        """New content and newly completed calls, given the next piece of text."""
        self.pending += text
        content: list[str] = []
        calls: list[ParsedToolCall] = []
        while self.pending:
            if self.pending.startswith(TOOL_CALL_OPEN):
                end = self.pending.find(TOOL_CALL_CLOSE)
                if end < 0:
                    break  # the call is still being written
                block = self.pending[len(TOOL_CALL_OPEN) : end]
                call = parse_tool_call(block)
                if call is None:
                    content.append(self.pending[: end + len(TOOL_CALL_CLOSE)])
                else:
                    calls.append(call)
                self.pending = self.pending[end + len(TOOL_CALL_CLOSE) :]
                continue
            start = self.pending.find(TOOL_CALL_OPEN)
            if start > 0:
                content.append(self.pending[:start])
                self.pending = self.pending[start:]
                continue
            held = next((k for k in range(len(OPEN_PREFIXES) - 1, 0, -1) if self.pending.endswith(OPEN_PREFIXES[k])), 0)
            content.append(self.pending[: len(self.pending) - held])
            self.pending = self.pending[len(self.pending) - held :]
            break
        self.num_calls += len(calls)
        return "".join(content), calls

    def finish(self) -> str:
        """What is left when generation ends, as content; except a call cut off by max_tokens, which is no text
        of the reply (the grammar allows `<tool_call>` only as a call's start)."""
        rest, self.pending = self.pending, ""
        return "" if rest.startswith(TOOL_CALL_OPEN) else rest


def split_tool_calls(text: str) -> tuple[str | None, list[ParsedToolCall]]:
    """A whole reply's content (None when only calls and whitespace) and calls."""
    parser = ToolCallParser()
    content, calls = parser.feed(text)
    content += parser.finish()
    return (content if content.strip() or not calls else None), calls
