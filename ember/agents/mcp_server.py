"""Ember's tools as an MCP server (`ember mcp sandbox`, `ember mcp skills`), for any MCP client: over stdio, or
over Streamable HTTP at http://HOST:PORT/mcp.

The tools are the same `Tool`s the in-process agent calls, served through the SDK's low-level server: their JSON
schemas go out unchanged, and a call goes through `Toolbox.call`, so a bad argument or a failing tool is an
error result over MCP exactly as it is in process.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

from ember.agents.tools import Toolbox


def mcp_server(name: str, instructions: str, toolbox: Toolbox) -> Server[Any]:
    async def list_tools(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return types.ListToolsResult(
            tools=[
                types.Tool(name=tool.name, description=tool.description, input_schema=tool.parameters)
                for tool in toolbox.tools.values()
            ]
        )

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        result = await toolbox.call(params.name, json.dumps(params.arguments or {}))
        return types.CallToolResult(content=[types.TextContent(text=result.content)], is_error=result.is_error)

    return Server(name, instructions=instructions, on_list_tools=list_tools, on_call_tool=call_tool)


def serve(server: Server[Any], port: int | None = None, host: str = "127.0.0.1") -> None:
    """Without a port, on stdin/stdout until the client hangs up; with one, over Streamable HTTP until stopped
    (on a loopback host, requests from other hosts' pages are refused: DNS-rebinding protection)."""
    if port is None:

        async def serve_stdio() -> None:
            async with stdio_server() as (read_stream, write_stream):
                await server.run(read_stream, write_stream, server.create_initialization_options())

        anyio.run(serve_stdio)
        return
    import sys

    import uvicorn

    print(f"ember: MCP server {server.name} at http://{host}:{port}/mcp", file=sys.stderr, flush=True)
    uvicorn.run(server.streamable_http_app(host=host), host=host, port=port, log_level="warning")
