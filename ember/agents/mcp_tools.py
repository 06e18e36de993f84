"""Tools from MCP servers: each server's tools become agent tools that call it (official `mcp` SDK).

A server is named by a URL (Streamable HTTP) or by a command line, which is started as a subprocess and
spoken to over its stdin/stdout. The servers live as long as the context manager.
"""

from __future__ import annotations

import shlex
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextContent

from ember.agents.tools import Tool, ToolResult, as_text


def server_target(spec: str) -> StdioServerParameters | str:
    """A URL as it is; a command line split as a shell would (no shell runs it)."""
    if spec.startswith(("http://", "https://")):
        return spec
    argv = shlex.split(spec)
    if not argv:
        raise ValueError("an MCP server needs a URL or a command line, got an empty string")
    return StdioServerParameters(command=argv[0], args=argv[1:])


def result_text(result: CallToolResult) -> str:
    """What the model reads of a tool's result: its text blocks, else its structured content, with a short
    stand-in for each block of another kind (images, audio, resources)."""
    parts = [block.text if isinstance(block, TextContent) else f"[{block.type} content]" for block in result.content]
    if not any(isinstance(block, TextContent) for block in result.content) and result.structured_content is not None:
        parts.insert(0, as_text(result.structured_content))
    return "\n".join(parts)


def client_tool(client: Client, name: str, description: str, schema: dict[str, Any]) -> Tool:
    async def run(arguments: dict[str, Any]) -> ToolResult:
        try:
            result = await client.call_tool(name, arguments)
        except MCPError as e:  # the server refused the call (unknown tool, invalid params): the model should know
            return ToolResult(f"MCP error: {e}", is_error=True)
        return ToolResult(result_text(result), is_error=bool(result.is_error))

    return Tool(name, description, schema, run)


@asynccontextmanager
async def mcp_tools(servers: Iterable[str], timeout: float = 60.0) -> AsyncIterator[list[Tool]]:
    """Connect to every server and yield all their tools; a server that cannot be reached is a ValueError that
    names it."""
    async with AsyncExitStack() as stack:
        tools: list[Tool] = []
        for spec in servers:
            client = Client(server_target(spec), read_timeout_seconds=timeout)
            try:
                await stack.enter_async_context(client)
                listing = await client.list_tools()
            except Exception as e:  # spawn failures, refused connections, handshakes: one message per server
                raise ValueError(f"MCP server {spec!r} could not be reached: {type(e).__name__}: {e}") from e
            for tool in listing.tools:
                tools.append(client_tool(client, tool.name, tool.description or "", tool.input_schema))
        yield tools
