"""Anthropic's Messages API (`POST /v1/messages`), served by the chat path, so that clients written for Claude
(the `anthropic` SDK, coding agents that speak only this API) run on a local model unchanged.

A request becomes a chat request: `system` the system message, content blocks their chat equivalents (text,
`tool_use` an assistant's tool call, `tool_result` a tool message, `thinking` the assistant's reasoning), tools
functions, `tool_choice` any/tool/none required/named/none, `output_config.format` a JSON schema response
format. (Anthropic's SDK no longer sends `temperature`, `top_p` or `top_k`: they are read when sent, e.g. in
`extra_body`.) The reply is built as the chat reply is (the same
tool-call grammar and parsers), then written as content blocks: thinking, text, tool_use; streamed as
Anthropic's events (message_start, content_block_start/delta/stop, message_delta, message_stop).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import ConfigDict, Field

from ember.engine.sampling_params import InvalidParameter
from ember.server.protocol import ChatCompletionRequest, OpenAIModel, check_unknown_fields, new_id
from ember.server.reply_parser import ReplyParser
from ember.server.tool_stream import ToolCallDelta
from ember.server.tools import ToolCallFormat

# the Messages API's fields that Ember does not implement: the values that ask for nothing, and what to do instead
MESSAGES_FIELDS_NOT_SUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "container": ((None,), "run code with Ember's sandbox (`ember mcp sandbox`) as a tool"),
    "mcp_servers": ((None, []), "connect MCP servers on the client's side"),
}
# HTTP status -> the `type` of Anthropic's error object
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class AnthropicTool(OpenAIModel):
    model_config = ConfigDict(extra="allow")
    type: str | None = None  # "custom"; Anthropic's server tools (web search, ...) have other types
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None  # required of a custom tool; server tools have none


class ToolChoiceParam(OpenAIModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class ThinkingParam(OpenAIModel):
    type: str  # "disabled" turns a thinking model's thinking off; "enabled", "adaptive": it thinks as it does
    budget_tokens: int | None = None  # not enforced: max_tokens bounds thinking and answer together


class OutputFormat(OpenAIModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(OpenAIModel):
    effort: str | None = None  # a hint for Claude's models; a local model's effort is its max_tokens
    format: OutputFormat | None = None


class MessagesRequest(OpenAIModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are kept to be checked
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)  # required by /v1/messages, not by count_tokens
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float = Field(1.0, ge=0.0, le=1.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stream: bool = False
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: ThinkingParam | None = None
    output_config: OutputConfig | None = None
    metadata: dict[str, Any] | None = None

    def as_chat(self) -> ChatCompletionRequest:
        """The chat request that this one asks for (see the module's note)."""
        check_unknown_fields(self.model_extra or {}, MESSAGES_FIELDS_NOT_SUPPORTED)
        messages = [{"role": "system", "content": block_text(self.system, "system")}] if self.system else []
        for i, message in enumerate(self.messages):
            messages += chat_messages(message, i)
        fields: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "stop": self.stop_sequences,
            # only those sent: the others take the model's defaults, as on the chat API
            **{
                name: getattr(self, name) for name in ("temperature", "top_p", "top_k") if name in self.model_fields_set
            },
        }
        for tool in self.tools or []:
            if tool.type not in (None, "custom"):
                raise InvalidParameter("tools", f"server tools such as {tool.type!r} are not supported")
            if tool.input_schema is None:
                raise InvalidParameter("tools", f"the tool {tool.name!r} needs an 'input_schema'")
        if self.tools:
            fields["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": t.input_schema},
                }
                for t in self.tools
            ]
        if (choice := self.tool_choice) is not None:
            named = {"type": "function", "function": {"name": choice.name}}
            fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none", "tool": named}[choice.type]
            if choice.type == "tool" and not choice.name:
                raise InvalidParameter("tool_choice", "a tool_choice of type 'tool' needs the tool's 'name'")
            fields["parallel_tool_calls"] = False if choice.disable_parallel_tool_use else None
        if self.output_config is not None and self.output_config.format is not None:
            schema = {"name": "output", "schema": self.output_config.format.schema_}
            fields["response_format"] = {"type": "json_schema", "json_schema": schema}
        if self.thinking is not None and self.thinking.type == "disabled":
            fields["chat_template_kwargs"] = {"enable_thinking": False}  # Qwen3's switch; other templates ignore it
        return ChatCompletionRequest.model_validate(fields)


def block_text(content: str | list[dict[str, Any]] | None, where: str) -> str:
    """Text content, a string or text blocks, as one string."""
    if content is None or isinstance(content, str):
        return content or ""
    for block in content:
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise InvalidParameter(
                "messages", f"{where}: only text blocks are supported here, not {block.get('type')!r}"
            )
    return "".join(block["text"] for block in content)


def chat_messages(message: dict[str, Any], index: int) -> list[dict[str, Any]]:
    """One Messages API message as chat messages: a user's tool results become tool messages (in their order,
    before the user's text), an assistant's tool_use blocks its tool calls and its thinking its reasoning."""
    role, content, where = message.get("role"), message.get("content"), f"messages[{index}]"
    if role not in ("user", "assistant"):
        raise InvalidParameter("messages", f"{where}: the role must be 'user' or 'assistant'")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise InvalidParameter("messages", f"{where}: content must be a string or a list of content blocks")
    texts: list[str] = []
    results: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    thinking: list[str] = []
    for block in content:
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_result" and role == "user" and isinstance(block.get("tool_use_id"), str):
            output = block_text(block.get("content"), f"{where}: a tool_result's content")
            if block.get("is_error"):
                output = f"[error] {output}"
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": output})
        elif kind == "tool_use" and role == "assistant" and isinstance(block.get("name"), str):
            arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
            function = {"name": block["name"], "arguments": arguments}
            calls.append({"id": block.get("id") or new_id("toolu", "_"), "function": function})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            thinking.append(block.get("thinking") or "")
        else:
            raise InvalidParameter(
                "messages",
                f"{where}: content blocks of type {kind!r} are not supported in a {role}'s message (text, "
                "tool_use and thinking from the assistant, text and tool_result from the user)",
            )
    if role == "user":
        return results + ([{"role": "user", "content": "".join(texts)}] if texts or not results else [])
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None, "tool_calls": calls or None}
    return [{**reply, "reasoning_content": "".join(thinking) or None}]


class MessageBuilder:
    """Turns generated text, as it arrives, into content blocks and the stream events that announce them: a
    reasoning model's thinking a thinking block, the answer a text block (opened at its first visible text),
    each tool call a tool_use block once its name is written, its input streaming as it is."""

    def __init__(
        self, model: str, prompt_tokens: int, tool_format: ToolCallFormat | None, opens_thinking: bool | None
    ) -> None:
        self.id = new_id("msg", "_")
        self.model, self.prompt_tokens = model, prompt_tokens
        self.parser = ReplyParser(tool_format, opens_thinking)
        self.content: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the thinking or text block being written
        self.held = ""  # leading whitespace, not yet known to be a text block
        self.result: dict[str, Any] | None = None  # the whole message, once finished
        self.calls: dict[int, int] = {}  # each call's block index, by the call's index

    def start(self, cached: int) -> list[dict[str, Any]]:
        return [{"type": "message_start", "message": self.message(None, None, self.usage(0, cached))}]

    def feed(self, text: str, finished: bool) -> list[dict[str, Any]]:
        """Events for the next piece of generated text (`finished`: it is the last)."""
        thinking, text, calls = self.parser.feed(text, finished)
        events = self.write("thinking", thinking) if thinking else []
        if self.open is not None and self.open["type"] == "text":
            events += self.write("text", text) if text else []
        else:  # whitespace before anything visible (between thinking and a call) opens no text block
            self.held += text
            if self.held.strip():
                events += self.write("text", self.held)
                self.held = ""
        for call in calls:
            events += self.tool_use(call)
        return events

    def write(self, kind: str, text: str) -> list[dict[str, Any]]:
        """Append to the open block of `kind` ("thinking" or "text"), opening it (and closing another) first."""
        events = []
        if self.open is None or self.open["type"] != kind:
            events += self.close()
            self.open = {"type": kind, kind: "", **({"signature": ""} if kind == "thinking" else {})}
            self.content.append(self.open)
            events.append({"type": "content_block_start", "index": len(self.content) - 1,
                           "content_block": {**self.open}})  # fmt: skip
        self.open[kind] += text
        delta = {"type": f"{kind}_delta", kind: text}
        events.append({"type": "content_block_delta", "index": len(self.content) - 1, "delta": delta})
        return events

    def tool_use(self, piece: ToolCallDelta) -> list[dict[str, Any]]:
        """The events of a piece of a call: its block opens with the first, its input grows, it closes with the
        last."""
        events = []
        if piece.id is not None:
            events += self.close()
            self.content.append({"type": "tool_use", "id": piece.id, "name": piece.name, "input": {}})
            self.calls[piece.index] = len(self.content) - 1
            events.append({"type": "content_block_start", "index": len(self.content) - 1,
                           "content_block": dict(self.content[-1])})  # fmt: skip
        index = self.calls[piece.index]
        if piece.arguments:
            delta = {"type": "input_json_delta", "partial_json": piece.arguments}
            events.append({"type": "content_block_delta", "index": index, "delta": delta})
        if piece.done is not None:
            self.content[index]["input"] = tool_input(piece.done.arguments)
            events.append({"type": "content_block_stop", "index": index})
        return events

    def close(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": len(self.content) - 1}]

    def finish(
        self, finish_reason: str | None, stop: str | int | None, output_tokens: int, cached: int
    ) -> list[dict[str, Any]]:
        """The events that close the open block and the message, which is then `result`."""
        events = self.close()
        stop_sequence = stop if isinstance(stop, str) else None
        if any(block["type"] == "tool_use" for block in self.content):
            reason = "tool_use"
        elif finish_reason == "length":
            reason = "max_tokens"
        else:
            reason = "stop_sequence" if stop_sequence is not None else "end_turn"
        usage = self.usage(output_tokens, cached)
        events.append({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": stop_sequence},
                       "usage": {"output_tokens": output_tokens}})  # fmt: skip
        events.append({"type": "message_stop"})
        self.result = self.message(reason, stop_sequence, usage)
        return events

    def usage(self, output_tokens: int, cached: int) -> dict[str, Any]:
        """Anthropic counts the prompt tokens read from the cache apart from the others."""
        return {
            "input_tokens": self.prompt_tokens - cached,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
            "output_tokens": output_tokens,
        }

    def message(self, stop_reason: str | None, stop_sequence: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": self.content if stop_reason is not None else [],
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        }


def tool_input(arguments: str) -> Any:
    """A call's arguments as a tool_use block's input: {} for a call cut off mid-way (its JSON unfinished)."""
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return {}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error object."""
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}
