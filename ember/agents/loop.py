"""The tool-calling loop: ask the model, run the tools it calls, hand back their results, until it answers.

It speaks only the OpenAI chat-completions API (streamed), so it runs against Ember's server or any other
that implements it. Every turn is bounded (`max_turns`), every tool call is bounded (the toolbox's time-out),
and every failure of a tool reaches the model as that tool's reply instead of ending the run; a model stuck
repeating a call that keeps giving the same result is told so, then stopped (`RepeatedCalls`). When the server
says the conversation no longer fits the model's context, the oldest tool results are cleared, then the
oldest turns dropped, until it fits (`shrink`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from openai import AsyncOpenAI, BadRequestError

from ember.agents.approvals import declined
from ember.agents.tools import Tool, Toolbox, ToolResult

ToolChoice = Literal["auto", "required", "none"] | str  # or the name of one tool


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@dataclass
class AgentResult:
    output: str  # the text of the model's last message
    # the last turn's ("stop", "length", ...), "max_turns" when the loop was cut, "tool_loop" when a turn's every
    # call was refused as a repeat (see Agent)
    finish_reason: str
    turns: int
    messages: list[dict[str, Any]]  # the whole conversation, ready to be continued
    tool_calls: list[tuple[ToolCall, ToolResult]] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those the server reused from its prefix cache
    completion_tokens: int = 0
    context_trims: int = 0  # times the conversation was shrunk to fit the model's context


@dataclass(frozen=True)
class AgentEvent:
    """What a run shows as it goes: model text as it streams, each call, each result, and the end."""

    kind: Literal["text", "tool_call", "tool_result", "context_trimmed", "done"]
    text: str = ""
    call: ToolCall | None = None
    result: ToolResult | AgentResult | None = None


class Agent:
    """An agent: a model behind an OpenAI-compatible API, instructions, and tools.

    `tool_choice` applies to the first turn; with `reset_tool_choice` (the default) later turns use "auto",
    since a model forced to call a tool on every turn would never answer. A call whose last `max_identical_calls`
    runs in this task (same tool, same arguments) all gave the same result is not run again: its reply says so,
    and a turn made only of such calls ends the run (small models at temperature 0 otherwise loop until
    max_turns). A call whose result changes (a next page, a job's status) may repeat.

    With `approve` (e.g. a `ToolApprovals`), each call runs only if `await approve(name, arguments)` is true,
    asked one call at a time; a declined call's reply tells the model so.
    """

    def __init__(
        self,
        client: AsyncOpenAI,
        model: str,
        tools: Iterable[Tool] | Toolbox = (),
        instructions: str | Callable[[], str] | None = None,
        *,
        max_turns: int = 10,
        tool_choice: ToolChoice = "auto",
        reset_tool_choice: bool = True,
        parallel_tool_calls: bool | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        max_identical_calls: int | None = 3,
        on_message: Callable[[dict[str, Any]], None] | None = None,
        approve: Callable[[str, str], Awaitable[bool]] | None = None,
    ) -> None:
        if max_turns < 1:
            raise ValueError("max_turns must be at least 1")
        if max_identical_calls is not None and max_identical_calls < 1:
            raise ValueError("max_identical_calls must be at least 1 (or None: no limit)")
        self.client, self.model = client, model
        self.toolbox = tools if isinstance(tools, Toolbox) else Toolbox(tools)
        if tool_choice not in ("auto", "required", "none") and tool_choice not in self.toolbox.tools:
            raise ValueError(f"tool_choice {tool_choice!r} is neither auto/required/none nor one of the tools")
        if tool_choice == "required" and not self.toolbox.tools:
            raise ValueError("tool_choice 'required' needs at least one tool")
        self.instructions = instructions
        self.max_turns, self.tool_choice, self.reset_tool_choice = max_turns, tool_choice, reset_tool_choice
        self.parallel_tool_calls, self.temperature, self.max_tokens = parallel_tool_calls, temperature, max_tokens
        self.max_identical_calls = max_identical_calls
        self.on_message = on_message
        self.approve = approve

    async def run(self, task: str | list[dict[str, Any]]) -> AgentResult:
        async for event in self.stream(task):
            if event.kind == "done":
                assert isinstance(event.result, AgentResult)
                return event.result
        raise AssertionError("stream ended without a result")

    async def stream(self, task: str | list[dict[str, Any]]) -> AsyncIterator[AgentEvent]:
        """Run the loop, yielding events; the last one is "done" with the AgentResult."""
        messages = self.initial_messages(task)
        self.notify(messages[-1])
        result = AgentResult(output="", finish_reason="max_turns", turns=0, messages=messages)
        tool_choice = self.tool_choice
        repeats = RepeatedCalls(self.max_identical_calls)
        while result.turns < self.max_turns:
            result.turns += 1
            text_parts: list[str] = []
            calls: list[ToolCall] = []
            finish_reason = "stop"
            while True:
                try:
                    async for kind, value in self.model_turn(messages, tool_choice, result):
                        if kind == "text":
                            text_parts.append(value)
                            yield AgentEvent("text", text=value)
                        elif kind == "calls":
                            calls = value
                        else:
                            finish_reason = value
                    break
                except BadRequestError as e:  # raised before any text streams: the request was refused whole
                    if text_parts or not context_exceeded(e) or not (removed := shrink(messages)):
                        raise
                    result.context_trims += 1
                    yield AgentEvent("context_trimmed", text=f"over the model's context: {removed}")
            text = "".join(text_parts)
            messages.append(assistant_message(text, calls))
            self.notify(messages[-1])
            result.output = text
            if not calls:
                result.finish_reason = finish_reason
                break
            for call in calls:
                yield AgentEvent("tool_call", call=call)
            refused = [repeats.is_stuck(call) for call in calls]
            approved = [not r and await self.approved(c) for c, r in zip(calls, refused, strict=True)]
            outcomes = await asyncio.gather(
                *(
                    self.toolbox.call(c.name, c.arguments)
                    if a
                    else settled(repeats.refusal(c) if r else declined(c.name))
                    for c, r, a in zip(calls, refused, approved, strict=True)
                )
            )
            for call, outcome, ran in zip(calls, outcomes, approved, strict=True):
                if ran:
                    repeats.record(call, outcome)
                messages.append({"role": "tool", "tool_call_id": call.id, "content": outcome.content})
                self.notify(messages[-1])
                result.tool_calls.append((call, outcome))
                yield AgentEvent("tool_result", call=call, result=outcome)
            if all(refused):
                result.finish_reason = "tool_loop"
                break
            if self.reset_tool_choice:
                tool_choice = "auto"
        yield AgentEvent("done", result=result)

    async def approved(self, call: ToolCall) -> bool:
        return self.approve is None or await self.approve(call.name, call.arguments)

    def initial_messages(self, task: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The task's messages, behind the instructions (unless the task brings its own system message).
        Instructions that are a function (memory blocks) are rendered here, once per run: a system prompt
        changed mid-run would make the server recompute the whole conversation after it (its prefix cache
        holds the old one), so an edit shows in the editing tool's result until the next run."""
        messages = [{"role": "user", "content": task}] if isinstance(task, str) else list(task)
        if not messages:
            raise ValueError("the task has no messages")
        if self.instructions and messages[0].get("role") != "system":
            instructions = self.instructions() if callable(self.instructions) else self.instructions
            messages.insert(0, {"role": "system", "content": instructions})
        return messages

    def notify(self, message: dict[str, Any]) -> None:
        """Hands each new message (the task's last, the model's, the tools') to `on_message`, e.g. a history."""
        if self.on_message is not None:
            self.on_message(message)

    async def model_turn(
        self, messages: list[dict[str, Any]], tool_choice: ToolChoice, result: AgentResult
    ) -> AsyncIterator[tuple[str, Any]]:
        """One streamed completion: ("text", piece)..., then ("calls", [ToolCall]), then ("finish", reason).
        Tool calls are assembled from their deltas by index, as servers may stream arguments piece by piece."""
        request: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True}
        request["stream_options"] = {"include_usage": True}
        if self.toolbox.tools:
            request["tools"] = self.toolbox.specs()
            named = tool_choice not in ("auto", "required", "none")
            request["tool_choice"] = {"type": "function", "function": {"name": tool_choice}} if named else tool_choice
            if self.parallel_tool_calls is not None:
                request["parallel_tool_calls"] = self.parallel_tool_calls
        if self.temperature is not None:
            request["temperature"] = self.temperature
        if self.max_tokens is not None:
            request["max_tokens"] = self.max_tokens
        pieces: dict[int, dict[str, str]] = {}
        finish_reason = "stop"
        async for chunk in await self.client.chat.completions.create(**request):
            if chunk.usage is not None:
                result.prompt_tokens += chunk.usage.prompt_tokens
                result.completion_tokens += chunk.usage.completion_tokens
                details = chunk.usage.prompt_tokens_details
                result.cached_tokens += (details.cached_tokens or 0) if details is not None else 0
            for choice in chunk.choices[:1]:
                if choice.delta.content:
                    yield "text", choice.delta.content
                for delta in choice.delta.tool_calls or []:
                    piece = pieces.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                    piece["id"] = delta.id or piece["id"]
                    if delta.function is not None:
                        piece["name"] += delta.function.name or ""
                        piece["arguments"] += delta.function.arguments or ""
                if choice.finish_reason:
                    finish_reason = choice.finish_reason
        calls = [
            ToolCall(p["id"] or f"call_{uuid.uuid4().hex}", p["name"], p["arguments"])
            for _, p in sorted(pieces.items())
        ]
        yield "calls", calls
        yield "finish", finish_reason


CLEARED = "[cleared: this tool result was removed to fit the model's context window]"
PROTECTED_PREFIXES = ("<skill_content",)  # an activated skill's instructions: losing them would go unnoticed


def context_exceeded(error: BadRequestError) -> bool:
    """The server refused the conversation as too long (OpenAI's error code; others say it in words)."""
    return error.code == "context_length_exceeded" or "maximum context length" in str(error.message).lower()


def shrink(messages: list[dict[str, Any]]) -> str:
    """Shorten the conversation by its oldest removable part, in place, and say what went ("" when nothing can
    go). First the results of the oldest turn whose tool results are not yet cleared (each call keeps a reply,
    so the conversation stays valid), then the oldest whole turn. Always kept: the system prompt, the task (the
    latest user message; earlier ones are a continued session's history), the latest turn, and activated skills'
    instructions."""
    task = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    starts = [i for i, m in enumerate(messages) if m["role"] in ("assistant", "user")]
    turns = [(start, end) for start, end in itertools.pairwise(starts) if start != task]  # not the latest either

    def kept(message: dict[str, Any]) -> bool:
        return str(message.get("content") or "").startswith(PROTECTED_PREFIXES)

    for start, end in turns:
        results = [m for m in messages[start:end] if m["role"] == "tool" and m["content"] != CLEARED and not kept(m)]
        if results:
            for message in results:
                message["content"] = CLEARED
            return f"cleared {len(results)} old tool result(s)"
    for start, end in turns:
        if not any(kept(m) for m in messages[start:end]):
            del messages[start:end]
            return f"dropped the oldest turn ({end - start} message(s))"
    return ""


class RepeatedCalls:
    """Each call's (tool and arguments) last result and how many times in a row it gave it, over one run: a call
    that gave one same result `limit` times in a row is stuck (None: never)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.streaks: dict[tuple[str, str], tuple[str, int]] = {}

    @staticmethod
    def key(call: ToolCall) -> tuple[str, str]:
        return call.name, canonical_arguments(call.arguments)

    def is_stuck(self, call: ToolCall) -> bool:
        return self.limit is not None and self.streaks.get(self.key(call), ("", 0))[1] >= self.limit

    def record(self, call: ToolCall, outcome: ToolResult) -> None:
        last, times = self.streaks.get(self.key(call), ("", 0))
        self.streaks[self.key(call)] = (outcome.content, times + 1 if outcome.content == last else 1)

    def refusal(self, call: ToolCall) -> ToolResult:
        """What a stuck call gets instead of running."""
        return ToolResult(
            f"[not run: {call.name} gave the same result the last {self.limit} times it was called with exactly "
            "these arguments (see above). Use that result, change the arguments, or answer.]",
            is_error=True,
        )


async def settled(result: ToolResult) -> ToolResult:
    """A call's result known without running it, awaitable beside the calls that do run."""
    return result


def canonical_arguments(arguments: str) -> str:
    """A call's arguments, written one way whatever their key order and spacing (as given when not JSON)."""
    try:
        return json.dumps(json.loads(arguments), sort_keys=True)
    except json.JSONDecodeError:
        return arguments


def assistant_message(text: str, calls: list[ToolCall]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
        ]
    return message
