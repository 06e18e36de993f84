"""Ember's agent layer: the tool-calling loop, tools (Python functions, MCP servers) and the code sandbox.

It speaks only the OpenAI API and MCP, never the engine, so it runs against any compatible server. The loop's
names load on first use: the loop imports openai, which the CLI's other commands (MCP servers, skills) do
without, and they start in a fraction of the time.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ember.agents.tools import Tool, Toolbox, ToolResult, function_tool

if TYPE_CHECKING:
    from ember.agents.approvals import ToolApprovals
    from ember.agents.loop import Agent, AgentEvent, AgentResult, ToolCall

_LAZY_NAMES = {
    **dict.fromkeys(("Agent", "AgentEvent", "AgentResult", "ToolCall"), "ember.agents.loop"),
    "ToolApprovals": "ember.agents.approvals",
}
__all__ = [
    "Agent",
    "AgentEvent",
    "AgentResult",
    "Tool",
    "ToolApprovals",
    "ToolCall",
    "ToolResult",
    "Toolbox",
    "function_tool",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'ember.agents' has no attribute {name!r}")
