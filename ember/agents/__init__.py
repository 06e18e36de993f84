"""Ember's agent layer: the tool-calling loop, tools (Python functions, MCP servers) and the code sandbox.

It speaks only the OpenAI API and MCP, never the engine, so it runs against any compatible server."""

from ember.agents.loop import Agent, AgentEvent, AgentResult, ToolCall
from ember.agents.tools import Tool, Toolbox, ToolResult, function_tool

__all__ = ["Agent", "AgentEvent", "AgentResult", "Tool", "ToolCall", "ToolResult", "Toolbox", "function_tool"]
