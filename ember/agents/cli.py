"""`ember agent` (a task run through the tool-calling loop) and `ember mcp sandbox` (the sandbox over MCP)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import asdict
from typing import Any

from ember.agents.loop import Agent, AgentEvent, AgentResult
from ember.agents.memory import Memory
from ember.agents.sandbox import Sandbox, SandboxLimits
from ember.agents.tools import Toolbox, ToolResult


def add_agent_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", help="what the agent should do (the first user message)")
    m = parser.add_argument_group("model")
    m.add_argument(
        "--url",
        default=None,
        help="an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 (default: start Ember's own server on "
        "--model for this run, and stop it at the end)",
    )
    m.add_argument("--api-key", default=None, help="the API's key (default: $OPENAI_API_KEY, else none)")
    m.add_argument(
        "--model",
        default=None,
        help="the model's name at --url (default: the first the server lists); without --url, the model file "
        "or directory the started server loads (default: the embedded SmolLM2-135M-Instruct)",
    )
    t = parser.add_argument_group("tools")
    t.add_argument(
        "--mcp",
        action="append",
        default=[],
        metavar="SERVER",
        help="an MCP server whose tools the agent may call: a URL (Streamable HTTP) or a command line started "
        "over stdio, e.g. --mcp 'ember mcp sandbox'; repeatable",
    )
    t.add_argument("--sandbox", action="store_true", help="add run_python and run_shell, in a bubblewrap sandbox")
    add_sandbox_args(t)
    t.add_argument(
        "--memory",
        default=None,
        metavar="FILE",
        help="the agent's memory, a SQLite file kept across runs (created if missing): memory blocks in the system "
        "prompt, every message searchable, an archive; adds the memory tools",
    )
    t.add_argument(
        "--session", default=None, help="the name this run's messages are kept under in --memory (default: a new one)"
    )
    t.add_argument("--tool-timeout", type=float, default=60.0, help="seconds one tool call may take (default 60)")
    loop = parser.add_argument_group("loop")
    loop.add_argument("--instructions", default=None, help="the system prompt")
    loop.add_argument("--max-turns", type=int, default=10, help="model calls at most, per run (default 10)")
    loop.add_argument(
        "--tool-choice",
        default="auto",
        help="the first turn's tool_choice: auto (default), required, none, or a tool's name; later turns use auto",
    )
    loop.add_argument(
        "--parallel-tool-calls",
        action="store_true",
        help="let the model call several tools in one turn (off by default: small models repeat a call until "
        "--max-tokens)",
    )
    loop.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the server's)")
    loop.add_argument("--max-tokens", type=int, default=512, help="tokens per model turn at most (default 512)")
    parser.add_argument(
        "--json", action="store_true", help="print the whole run as JSON (messages, tool calls, usage) at the end"
    )


def add_sandbox_args(group: Any) -> None:
    group.add_argument(
        "--workspace", default=None, help="the host folder the sandbox sees as /workspace (default: a temporary one)"
    )
    group.add_argument(
        "--sandbox-timeout", type=float, default=30.0, help="seconds one sandboxed run may take (default 30)"
    )
    group.add_argument(
        "--sandbox-memory-mb", type=int, default=1024, help="address space of a sandboxed process (default 1024)"
    )
    group.add_argument("--sandbox-network", action="store_true", help="let sandboxed code reach the network")


def sandbox_from_args(args: argparse.Namespace) -> Sandbox:
    limits = SandboxLimits(timeout_s=args.sandbox_timeout, memory_mb=args.sandbox_memory_mb)
    return Sandbox(args.workspace, limits, network=args.sandbox_network)


def check_agent_args(args: argparse.Namespace) -> None:
    """What can be refused before a server starts or an MCP server is spawned."""
    if args.max_turns < 1:
        raise ValueError("--max-turns must be at least 1")
    if args.session and not args.memory:
        raise ValueError("--session names where --memory keeps this run's messages: add --memory FILE")
    if args.tool_choice == "required" and not (args.sandbox or args.mcp or args.memory):
        raise ValueError("--tool-choice required needs tools: add --sandbox, --memory or --mcp SERVER")


async def run_agent(args: argparse.Namespace, url: str) -> int:
    import openai

    from ember.agents.mcp_tools import mcp_tools

    client = openai.AsyncOpenAI(base_url=url, api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or "none")
    async with AsyncExitStack() as stack:
        toolbox = Toolbox(timeout=args.tool_timeout)
        if args.sandbox:
            for tool in stack.enter_context(sandbox_from_args(args)).tools():
                toolbox.add(tool)
        for tool in await stack.enter_async_context(mcp_tools(args.mcp, timeout=args.tool_timeout)):
            toolbox.add(tool)
        instructions: str | Callable[[], str] | None = args.instructions
        on_message = None
        if args.memory:
            memory = Memory(args.memory)
            stack.callback(memory.close)
            for tool in memory.tools():
                toolbox.add(tool)
            instructions = memory.instructions(args.instructions)
            on_message = memory.recorder(args.session or f"session-{uuid.uuid4().hex[:8]}")
        try:
            model = (args.model if args.url else None) or (await client.models.list()).data[0].id
        except openai.APIError as e:
            raise ValueError(f"the model API at {url} did not answer: {e}") from e
        agent = Agent(
            client,
            model,
            toolbox,
            instructions,
            max_turns=args.max_turns,
            tool_choice=args.tool_choice,
            parallel_tool_calls=args.parallel_tool_calls,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            on_message=on_message,
        )
        try:
            async for event in agent.stream(args.task):
                show(event, quiet=args.json)
        except openai.APIError as e:
            raise ValueError(f"the model API at {url} failed: {e}") from e
    return 0


def show(event: AgentEvent, quiet: bool) -> None:
    """Model text on stdout as it streams; tool calls and results on stderr; with --json, only the result."""
    if event.kind == "done":
        assert isinstance(event.result, AgentResult)
        if quiet:
            print(json.dumps(asdict(event.result), indent=2, ensure_ascii=False))
        else:
            print()
            result = event.result
            cut = " (cut at --max-turns)" if result.finish_reason == "max_turns" else ""
            print(
                f"[{result.turns} turns, {len(result.tool_calls)} tool calls, {result.prompt_tokens} prompt + "
                f"{result.completion_tokens} completion tokens{cut}]",
                file=sys.stderr,
            )
    elif quiet:
        return
    elif event.kind == "text":
        print(event.text, end="", flush=True)
    elif event.kind == "tool_call" and event.call is not None:
        print(f"\n-> {event.call.name}({event.call.arguments})", file=sys.stderr, flush=True)
    elif event.kind == "tool_result" and event.call is not None and isinstance(event.result, ToolResult):
        lines = event.result.content.splitlines()
        shown = "\n   ".join(lines[:20]) + (f"\n   ... ({len(lines) - 20} more lines)" if len(lines) > 20 else "")
        error = " (error)" if event.result.is_error else ""
        print(f"<- {event.call.name}{error}: {shown}", file=sys.stderr, flush=True)


def serve_sandbox(args: argparse.Namespace) -> int:
    """`ember mcp sandbox`: the sandbox's tools over MCP on stdin/stdout, until the client hangs up."""
    from ember.agents.sandbox_server import sandbox_server

    with sandbox_from_args(args) as sandbox:
        sandbox_server(sandbox).run("stdio")
    return 0
