"""OpenAI's Responses API (`/v1/responses`) over the chat machinery: a request becomes a chat request (its
instructions a system message, its input items messages, tool calls and tool results), and the generated text
becomes output items (a message, function calls), streamed as the API's semantic events.

Responses are kept in memory (the last `ResponseStore.capacity`, unless `store` is false), so that a request can
continue one by `previous_response_id`: its conversation is the earlier one's input and output, followed by
the new input; instructions are not carried over, as in OpenAI's API.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ConfigDict, Field

from ember.engine.sampling_params import MAX_LOGPROBS, InvalidParameter
from ember.server.protocol import ChatCompletionRequest, ChatMessage, OpenAIModel, check_unknown_fields, new_id
from ember.server.reply_parser import ReplyParser
from ember.server.tool_stream import ToolCallDelta
from ember.server.tools import ToolCallFormat

MESSAGE_ROLES = ("user", "assistant", "system", "developer")

# error parameters of the chat request that a Responses request names differently
RESPONSES_PARAMS = {
    "messages": "input",
    "response_format": "text.format",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
}

# the Responses API's fields that Ember does not implement: the values that ask for nothing, and what to do instead
RESPONSES_FIELDS_NOT_SUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "background": ((False, None), "a response is made while its request waits ('stream' shows progress)"),
    "reasoning": ((None,), "the model does not reason"),
    "conversation": ((None,), "continue a conversation with 'previous_response_id'"),
    "prompt": ((None,), "send 'instructions' and 'input'"),
}
LOGPROBS = "message.output_text.logprobs"  # the one `include` value served


class FunctionToolParam(OpenAIModel):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(OpenAIModel):
    type: Literal["function"]
    name: str


class TextFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = "response"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(OpenAIModel):
    format: TextFormat = TextFormat()


class ResponsesRequest(OpenAIModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are kept to be checked (`check_extra_fields`)
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[FunctionToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None  # an extension, as on the chat API
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # with `include` LOGPROBS: alternatives per token
    text: TextConfig | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    truncation: Literal["auto", "disabled"] = "disabled"  # auto: drop the oldest turns that do not fit
    metadata: dict[str, str] | None = None
    user: str | None = None
    priority: int = 0  # vLLM's, as on the chat API
    cache_salt: str | None = Field(None, min_length=1)  # likewise
    chat_template: str | None = None  # likewise (with --trust-request-chat-template)

    def check_extra_fields(self) -> None:
        """Refuse the API's fields that Ember lacks when they ask for something, and `include` values other than
        LOGPROBS (LOGPROBS too with tools); log other unknown fields once."""
        check_unknown_fields(self.model_extra or {}, RESPONSES_FIELDS_NOT_SUPPORTED)
        for value in self.include or []:
            if value != LOGPROBS:
                raise InvalidParameter("include", f"'include' value {value!r} is not supported (only {LOGPROBS!r})")
        if self.wants_logprobs and self.tools:
            raise InvalidParameter("include", f"{LOGPROBS!r} is served for replies without 'tools'")

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS in (self.include or [])

    def as_chat(self, conversation: list[ChatMessage]) -> ChatCompletionRequest:
        """The chat request of this response: the instructions, then the conversation (earlier responses' input
        and output, then this input)."""
        if not conversation:
            raise ValueError("'input' is empty")
        messages = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        messages += conversation
        choice = self.tool_choice
        fields: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_completion_tokens": self.max_output_tokens,
            # only those sent: the others take the model's defaults, as on the chat API
            **{name: getattr(self, name) for name in ("temperature", "top_p") if name in self.model_fields_set},
            "seed": self.seed,
            "user": self.user,
            "priority": self.priority,
            "cache_salt": self.cache_salt,
            "chat_template": self.chat_template,
            "logprobs": self.wants_logprobs,
            "top_logprobs": self.top_logprobs if self.wants_logprobs else None,
            "parallel_tool_calls": self.parallel_tool_calls,
            "tool_choice": {"type": "function", "function": {"name": choice.name}}
            if isinstance(choice, NamedFunctionChoice)
            else choice,
        }
        if self.tools:
            fields["tools"] = [
                {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                for tool in self.tools
            ]
        if self.text is not None and self.text.format.type != "text":
            text_format = self.text.format
            fields["response_format"] = {"type": text_format.type}
            if text_format.type == "json_schema":
                fields["response_format"]["json_schema"] = {
                    "name": text_format.name,
                    "schema": text_format.schema_,
                    "strict": text_format.strict,
                }
        return ChatCompletionRequest.model_validate(fields)


def input_messages(items: str | list[dict[str, Any]]) -> list[ChatMessage]:
    """Input items as chat messages: messages, the model's earlier function calls (one assistant message per
    run of calls, joined to the assistant message just before them) and their outputs. An earlier reasoning item's
    text goes to the assistant message after it as `reasoning_content`, for templates that show old thinking."""
    if isinstance(items, str):
        return [ChatMessage(role="user", content=items)]
    messages: list[dict[str, Any]] = []
    thinking: str | None = None  # a reasoning item's text, until the assistant turn it belongs to
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            if item.get("role") not in MESSAGE_ROLES:
                raise ValueError(f"input[{i}]: a message's role must be one of {', '.join(MESSAGE_ROLES)}")
            messages.append({"role": item["role"], "content": item_text(item.get("content"), i)})
            if item["role"] == "assistant" and thinking is not None:
                messages[-1]["reasoning_content"] = thinking
            thinking = None  # thinking before another role's message belongs to no turn
        elif kind == "function_call":
            if not all(isinstance(item.get(key), str) for key in ("call_id", "name", "arguments")):
                raise ValueError(f"input[{i}]: a function_call needs the strings 'call_id', 'name' and 'arguments'")
            function = {"name": item["name"], "arguments": item["arguments"]}
            if not messages or messages[-1]["role"] != "assistant":
                messages.append({"role": "assistant", "content": None})
            if thinking is not None:
                messages[-1]["reasoning_content"], thinking = thinking, None
            messages[-1].setdefault("tool_calls", []).append({"id": item["call_id"], "function": function})
        elif kind == "function_call_output":
            output = item_text(item.get("output"), i)
            if not isinstance(item.get("call_id"), str) or not isinstance(output, str):
                raise ValueError(f"input[{i}]: a function_call_output needs a string 'call_id' and an 'output'")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind == "reasoning":
            thinking = reasoning_text(item) or None
        else:
            raise ValueError(f"input[{i}]: items of type {kind!r} are not supported (message, function_call, "
                             "function_call_output, reasoning)")  # fmt: skip
    return [ChatMessage.model_validate(message) for message in messages]


def turn_starts(conversation: list[ChatMessage]) -> tuple[int, list[int]]:
    """Where `truncation: "auto"` may cut a conversation: (how many leading messages always stay, the leading
    system messages and the first user message, the task; the indices after them where a turn begins). A turn
    is a user message, or an assistant message with the tool results after it, which go with their call."""
    first_user = next((i for i, m in enumerate(conversation) if m.role == "user"), -1)
    head = first_user + 1
    return head, [i for i in range(head, len(conversation)) if conversation[i].role != "tool"]


def reasoning_text(item: dict[str, Any]) -> str:
    """A reasoning item's thinking: its `reasoning_text` content (Ember's, vLLM's), else its summary's text."""
    parts = item.get("content") or item.get("summary") or []
    return "".join(
        part.get("text", "") for part in parts if isinstance(part, dict) and isinstance(part.get("text"), str)
    )


def item_text(content: Any, index: int) -> Any:
    """A message's or a function output's content: a string as it is, text parts joined."""
    if not isinstance(content, list):
        return content
    for part in content:
        if part.get("type") not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise ValueError(
                f"input[{index}]: only text content parts are supported (input_text or output_text with a 'text' "
                f"string), not {part.get('type')!r}"
            )
    return "".join(part["text"] for part in content)


@dataclass
class StoredResponse:
    response: dict[str, Any]
    conversation: list[ChatMessage]  # the messages up to and including this response's output, no instructions
    input_items: list[dict[str, Any]] = field(default_factory=list)  # the request's own input, as items with ids


ITEM_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def stored_input_items(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A request's input as the items GET /v1/responses/{id}/input_items lists: each with an id (its own, else a
    new one) and a message's text as content parts."""
    listed = []
    for item in [{"role": "user", "content": items}] if isinstance(items, str) else items:
        kind = item.get("type", "message")
        entry = {**item, "id": item.get("id") or new_id(ITEM_ID_PREFIXES.get(kind, "item"), "_"), "type": kind}
        if kind == "message" and isinstance(item.get("content"), str):
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            entry["content"] = [{"type": part, "text": item["content"]}]
        listed.append(entry)
    return listed


def item_page(items: list[dict[str, Any]], limit: int, order: str, after: str | None) -> dict[str, Any]:
    """One page of a list of items, OpenAI's cursor pagination: `order` "desc" (the default) lists the newest
    first; `after` is the id of the last item of the page before."""
    ordered = items[::-1] if order == "desc" else items
    ids = [item["id"] for item in ordered]
    start = ids.index(after) + 1 if after in ids else 0
    page = ordered[start : start + limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": start + limit < len(ordered),
    }


class ResponseStore:
    """The most recent responses, by id: what `previous_response_id` and GET /v1/responses/{id} read."""

    def __init__(self, capacity: int = 1000) -> None:
        self.capacity = capacity
        self.responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def add(self, stored: StoredResponse) -> None:
        self.responses[stored.response["id"]] = stored
        while len(self.responses) > self.capacity:
            self.responses.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        return self.responses.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self.responses.pop(response_id, None) is not None


class ResponseBuilder:
    """Turns generated text, as it arrives, into output items and the stream events that announce them: a
    reasoning model's thinking becomes a reasoning item (its text as `reasoning_text`), a message item opens at
    the first text (whitespace alone before a tool call opens none), each tool call becomes a function_call
    item once its name is written, its arguments streaming as they are."""

    def __init__(
        self,
        body: ResponsesRequest,
        model: str,
        created: int,
        tool_format: ToolCallFormat | None,
        opens_thinking: bool | None = None,
    ) -> None:
        """`opens_thinking`: None when the reply is not split into thinking and answer, else whether the prompt
        opened the think block (see `reasoning.py`)."""
        self.body, self.model, self.created = body, model, created
        self.id = new_id("resp", "_")
        self.parser = ReplyParser(tool_format, opens_thinking)
        self.output: list[dict[str, Any]] = []
        self.reasoning: dict[str, Any] | None = None  # the reasoning item being written
        self.message: dict[str, Any] | None = None  # the message item being written
        self.held = ""  # leading whitespace, not yet known to be a message
        self.held_logprobs: list[dict[str, Any]] = []  # its tokens' logprobs
        self.calls: dict[int, dict[str, Any]] = {}  # function_call items by the call's index
        self.sequence = 0

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence, **fields}

    def start(self) -> list[dict[str, Any]]:
        response = self.response("in_progress", None, None)
        return [
            self.event("response.created", response=response),
            self.event("response.in_progress", response=response),
        ]

    def feed(self, text: str, finished: bool, logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Events for the next piece of generated text (`finished`: it is the last), with its tokens' logprobs
        when asked for (replies without tools or thinking only: their text is the tokens' text)."""
        thinking, text, calls = self.parser.feed(text, finished)
        events = self.reasoning_text(thinking) if thinking else []
        if text.strip() and self.reasoning is not None:  # the answer has begun
            events += self.close_reasoning()
        events += self.text(text, logprobs or [])
        for call in calls:
            events += self.function_call(call)
        return events

    def reasoning_text(self, text: str) -> list[dict[str, Any]]:
        events = []
        if self.reasoning is None:
            self.reasoning = {"id": new_id("rs", "_"), "type": "reasoning", "summary": [], "content": [],
                              "status": "in_progress"}  # fmt: skip
            self.output.append(self.reasoning)
            added = {**self.reasoning, "content": []}
            events.append(self.event("response.output_item.added", output_index=len(self.output) - 1, item=added))
            part = {"type": "reasoning_text", "text": ""}
            self.reasoning["content"].append(part)
            events.append(self.item_event("response.content_part.added", self.reasoning, content_index=0,
                                          part=dict(part)))  # fmt: skip
        self.reasoning["content"][0]["text"] += text
        events.append(self.item_event("response.reasoning_text.delta", self.reasoning, content_index=0, delta=text))
        return events

    def close_reasoning(self) -> list[dict[str, Any]]:
        """The events that end the reasoning item; after them, thinking that came later would open another."""
        item, self.reasoning = self.reasoning, None
        assert item is not None
        part = item["content"][0]
        item["status"] = "completed"
        return [
            self.item_event("response.reasoning_text.done", item, content_index=0, text=part["text"]),
            self.item_event("response.content_part.done", item, content_index=0, part=part),
            self.event("response.output_item.done", output_index=self.output.index(item), item=item),
        ]

    def text(self, text: str, logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.message is None and not (self.held + text).strip():
            self.held += text
            self.held_logprobs += logprobs
            return []
        events = self.open_message() if self.message is None else []
        text, self.held = self.held + text, ""
        logprobs, self.held_logprobs = self.held_logprobs + logprobs, []
        assert self.message is not None
        part = self.message["content"][0]
        part["text"] += text
        delta: dict[str, Any] = {"delta": text}
        if self.body.wants_logprobs:
            part["logprobs"] += logprobs
            delta["logprobs"] = logprobs
        events.append(self.item_event("response.output_text.delta", self.message, content_index=0, **delta))
        return events

    def open_message(self) -> list[dict[str, Any]]:
        part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": []}
        if self.body.wants_logprobs:
            part["logprobs"] = []
        self.message = {"id": new_id("msg", "_"), "type": "message", "status": "in_progress", "role": "assistant",
                        "content": []}  # fmt: skip
        self.output.append(self.message)
        added = {**self.message, "content": []}
        events = [self.event("response.output_item.added", output_index=len(self.output) - 1, item=added)]
        self.message["content"].append(part)
        events.append(self.item_event("response.content_part.added", self.message, content_index=0, part=dict(part)))
        return events

    def function_call(self, piece: ToolCallDelta) -> list[dict[str, Any]]:
        """The events of a piece of a call: its item opens with its first, its arguments grow, it closes with its
        last."""
        events = []
        if piece.id is not None:
            item = {"id": new_id("fc", "_"), "type": "function_call", "status": "in_progress", "call_id": piece.id,
                    "name": piece.name, "arguments": ""}  # fmt: skip
            self.output.append(item)
            self.calls[piece.index] = item
            events.append(self.event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item)))
        item = self.calls[piece.index]
        if piece.arguments:
            item["arguments"] += piece.arguments
            events.append(self.item_event("response.function_call_arguments.delta", item, delta=piece.arguments))
        if piece.done is not None:
            events.append(self.item_event("response.function_call_arguments.done", item, arguments=item["arguments"]))
            item["status"] = "completed"
            events.append(self.event("response.output_item.done", output_index=self.output.index(item), item=item))
        return events

    def item_event(self, kind: str, item: dict[str, Any], **fields: Any) -> dict[str, Any]:
        return self.event(kind, item_id=item["id"], output_index=self.output.index(item), **fields)

    def finish(self, finish_reason: str | None, usage: dict[str, Any]) -> list[dict[str, Any]]:
        """The events that close the open message and the response (completed, or incomplete at the token
        limit). A reply with no text and no call still gets its (empty) message."""
        events = self.close_reasoning() if self.reasoning is not None else []
        if self.message is None and not self.output:  # no text and no call: an empty (or blank) message
            events = self.open_message()
            if self.held:
                events += self.text("", [])
        if self.message is not None:
            part = self.message["content"][0]
            events.append(self.item_event("response.output_text.done", self.message, content_index=0,
                                          text=part["text"]))  # fmt: skip
            events.append(self.item_event("response.content_part.done", self.message, content_index=0, part=part))
            self.message["status"] = "completed"
            events.append(self.event("response.output_item.done", output_index=self.output.index(self.message),
                                     item=self.message))  # fmt: skip
        incomplete = finish_reason == "length"
        status, reason = ("incomplete", "max_output_tokens") if incomplete else ("completed", None)
        response = self.response(status, usage, reason)
        events.append(self.event("response.incomplete" if incomplete else "response.completed", response=response))
        return events

    def response(self, status: str, usage: dict[str, Any] | None, incomplete_reason: str | None) -> dict[str, Any]:
        body = self.body
        choice = body.tool_choice
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": self.model,
            "output": self.output if status != "in_progress" else [],
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "tool_choice": choice.model_dump() if isinstance(choice, NamedFunctionChoice) else (choice or "auto"),
            "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
            "top_logprobs": body.top_logprobs,
            "text": (body.text or TextConfig()).model_dump(by_alias=True, exclude_none=True),
            "truncation": body.truncation,
            "store": body.store,
            "metadata": body.metadata or {},
            "usage": usage,
            "user": body.user,
        }

    def thinking(self) -> str:
        """The reasoning items' text so far."""
        return "".join(p["text"] for item in self.output if item["type"] == "reasoning" for p in item["content"])

    def reply_message(self) -> ChatMessage:
        """The output as the assistant message a continuing conversation replays (its thinking as
        `reasoning_content`, for templates that render it)."""
        text = "".join(part["text"] for item in self.output if item["type"] == "message" for part in item["content"])
        thinking = self.thinking()
        calls = [
            {"id": item["call_id"], "function": {"name": item["name"], "arguments": item["arguments"]}}
            for item in self.output
            if item["type"] == "function_call"
        ]
        message = {"role": "assistant", "content": text or None, "tool_calls": calls or None}
        return ChatMessage.model_validate({**message, "reasoning_content": thinking or None})


def responses_usage(prompt_tokens: int, output_tokens: int, cached: int, reasoning_tokens: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": prompt_tokens + output_tokens,
    }
