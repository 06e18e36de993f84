"""A reply as it streams in, split into its parts: a reasoning model's thinking, the answer's text, and tool calls.

The chat, Responses and Messages APIs each write these parts their own way (deltas, output items, content
blocks); this is the one place that finds them.
"""

from __future__ import annotations

from ember.server.reasoning import ReasoningParser
from ember.server.tool_stream import ToolCallDelta, ToolCallParser
from ember.server.tools import ToolCallFormat


class ReplyParser:
    """`tool_format`: the format of the reply's tool calls (None: it holds none); `opens_thinking`: None when the
    reply is not split into thinking and answer, else whether the prompt opened the think block (see
    `reasoning.py`)."""

    def __init__(self, tool_format: ToolCallFormat | None, opens_thinking: bool | None) -> None:
        self.tools = ToolCallParser(tool_format) if tool_format is not None else None
        self.thinking = ReasoningParser(opens_thinking) if opens_thinking is not None else None

    @property
    def num_calls(self) -> int:
        """The tool calls found so far."""
        return self.tools.num_calls if self.tools is not None else 0

    def feed(self, text: str, finished: bool) -> tuple[str, str, list[ToolCallDelta]]:
        """(thinking, answer text, pieces of tool calls) of the next piece of the reply; `finished`: it is the
        last, and what was held back (a possible tag's start) is let out."""
        thinking = ""
        if self.thinking is not None:
            thinking, text = self.thinking.feed(text)
            if finished:
                more_thinking, more_text = self.thinking.finish()
                thinking, text = thinking + more_thinking, text + more_text
        calls: list[ToolCallDelta] = []
        if self.tools is not None:
            text, calls = self.tools.feed(text)
            if finished:
                rest, last = self.tools.finish()
                text, calls = text + rest, calls + last
        return thinking, text, calls
