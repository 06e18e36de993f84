"""The sandbox as an MCP server (`ember mcp sandbox`), so that any MCP client can run code in it."""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult, TextContent

from ember.agents.sandbox import RUN_PYTHON_DESCRIPTION, RUN_SHELL_DESCRIPTION, RunResult, Sandbox


def call_result(result: RunResult) -> CallToolResult:
    failed = result.timed_out or result.exit_code != 0
    return CallToolResult(content=[TextContent(text=result.as_text())], is_error=failed)


def sandbox_server(sandbox: Sandbox) -> MCPServer:
    server = MCPServer(
        "ember-sandbox",
        instructions="Runs code in a bubblewrap sandbox with no network; /workspace keeps files between calls.",
        log_level="WARNING",  # its stderr is the client's terminal: a rejected call is the model's news, not the user's
    )

    async def run_python(code: str) -> CallToolResult:
        return call_result(await sandbox.run_python(code))

    async def run_shell(command: str) -> CallToolResult:
        return call_result(await sandbox.run_shell(command))

    server.add_tool(run_python, description=RUN_PYTHON_DESCRIPTION)
    server.add_tool(run_shell, description=RUN_SHELL_DESCRIPTION)
    return server
