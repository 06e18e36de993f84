"""`ember agent` (a task run through the tool-calling loop), `ember mcp sandbox|skills` (tools over MCP) and
`ember skills list|validate`."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AsyncExitStack, ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.agents.approvals import ToolApprovals, terminal_ask
from ember.agents.embeddings import INSTALL_HINT, Embedder, OpenAIEmbedder, TextEmbedder, embedding_model_path
from ember.agents.memory import Memory
from ember.agents.sandbox import Sandbox, SandboxLimits
from ember.agents.skills import SkillLibrary, skill_folders, validate
from ember.agents.tools import Tool, Toolbox, ToolResult

if TYPE_CHECKING:  # the loop imports openai: loaded only by the commands that run it, so the others start quickly
    from ember.agents.loop import AgentEvent


def add_agent_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "task",
        nargs="?",
        help="what the agent should do (the first user message); without it, a conversation: each line typed "
        "(or piped in) is the next message, until end of input (Ctrl-D)",
    )
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
    add_skills_args(t)
    t.add_argument(
        "--skill",
        action="append",
        default=[],
        metavar="NAME",
        help="activate this skill from the start (its instructions go in the system prompt); repeatable",
    )
    t.add_argument(
        "--memory",
        default=None,
        metavar="FILE",
        help="the agent's memory, a SQLite file kept across runs (created if missing): memory blocks in the system "
        "prompt, every message searchable, an archive; adds the memory tools",
    )
    t.add_argument(
        "--no-embeddings",
        action="store_true",
        help="archival_search by words only (default: by meaning too, with all-MiniLM-L6-v2 when installed)",
    )
    t.add_argument(
        "--embeddings-url",
        default=None,
        metavar="URL",
        help="embed the archive with the model behind this OpenAI-compatible API (e.g. http://127.0.0.1:8001/v1, "
        "an `ember serve` of an embedding model) instead of all-MiniLM-L6-v2",
    )
    t.add_argument(
        "--embeddings-model",
        default=None,
        help="the model name to send to --embeddings-url (default: the first it lists)",
    )
    t.add_argument(
        "--session",
        default=None,
        help="the conversation this run continues in --memory (its earlier messages come first), and keeps its "
        "messages under (default: a new one)",
    )
    t.add_argument("--tool-timeout", type=float, default=60.0, help="seconds one tool call may take (default 60)")
    t.add_argument(
        "--approve",
        action="store_true",
        help="ask before each tool call runs (on stderr; answer y, a for always this tool, or n), except the tools "
        "of --allow-tool and those an activated skill lists in its allowed-tools; a declined call does not run, "
        "and the model is told so",
    )
    t.add_argument(
        "--allow-tool",
        action="append",
        default=[],
        metavar="NAME",
        help="with --approve, a tool that runs without asking (e.g. read_skill_file); repeatable",
    )
    loop = parser.add_argument_group("loop")
    loop.add_argument("--instructions", default=None, help="the system prompt")
    loop.add_argument("--max-turns", type=int, default=10, help="model calls at most, per run (default 10)")
    loop.add_argument(
        "--max-identical-calls",
        type=int,
        default=3,
        help="how often in a row one tool may give the same result for the same arguments; past it the call is "
        "refused, and a turn of only refused calls ends the run (default 3; 0: no limit)",
    )
    loop.add_argument(
        "--tool-choice",
        default="auto",
        help="the first turn's tool_choice: auto (default), required, none, or a tool's name; later turns use auto",
    )
    loop.add_argument(
        "--parallel-tool-calls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let the model call several tools in one turn, or not (default: the server's; Ember's allows them "
        "when the model's chat template knows tool calls, as small models without it repeat a call)",
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
        "--sandbox-timeout",
        type=float,
        default=30.0,
        help="seconds one sandboxed run may take (default 30); in the Python session, code still running then is "
        "interrupted, and its container killed (variables lost) if it has not stopped 5 s later",
    )
    group.add_argument(
        "--sandbox-memory-mb", type=int, default=1024, help="address space of a sandboxed process (default 1024)"
    )
    group.add_argument(
        "--sandbox-max-processes",
        type=int,
        default=256,
        help="processes one sandbox container may run at once (default 256); past it the container is killed",
    )
    group.add_argument(
        "--sandbox-total-memory-mb",
        type=int,
        default=4096,
        help="memory all of one container's processes may hold together (default 4096); past it the container is "
        "killed",
    )
    group.add_argument("--sandbox-network", action="store_true", help="let sandboxed code reach the network")
    group.add_argument(
        "--sandbox-python-env",
        default=None,
        metavar="VENV",
        help="a virtual environment lent read-only, whose Python (and packages) sandboxed code runs with "
        "(default: the standard library only)",
    )
    group.add_argument(
        "--sandbox-fresh-python",
        action="store_true",
        help="run each run_python call as a fresh program (default: in one Python session per sandbox, as notebook "
        "cells: variables, imports and functions carry over from call to call)",
    )


def add_mcp_transport_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port", type=int, default=None, help="serve over Streamable HTTP at http://HOST:PORT/mcp (default: stdio)"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="with --port, the address to listen on (default 127.0.0.1; anyone who can reach it can run its tools)",
    )


def add_skills_args(group: Any) -> None:
    group.add_argument(
        "--skills",
        action="append",
        default=[],
        metavar="DIR",
        help="Agent Skills for the model: a skill folder (with a SKILL.md) or a folder of them, e.g. .agents/skills; "
        "repeatable, the first wins a name clash. Adds activate_skill and read_skill_file; with --sandbox, skill "
        "folders are at /skills/<name> there (read-only), so their scripts run",
    )


def sandbox_tools(
    args: argparse.Namespace, stack: ExitStack | AsyncExitStack, skills: SkillLibrary | None
) -> list[Tool]:
    """run_python and run_shell of a sandbox from the command line's options, closed with `stack`."""
    sandbox = stack.enter_context(sandbox_from_args(args, skills))
    return sandbox.tools(python_session=not args.sandbox_fresh_python)


def sandbox_limits(args: argparse.Namespace) -> SandboxLimits:
    """The --sandbox-* limits, each checked to be positive."""
    for option in ("sandbox_timeout", "sandbox_memory_mb", "sandbox_max_processes", "sandbox_total_memory_mb"):
        if getattr(args, option) <= 0:
            raise ValueError(f"--{option.replace('_', '-')} must be positive")
    return SandboxLimits(
        timeout_s=args.sandbox_timeout,
        memory_mb=args.sandbox_memory_mb,
        max_processes=args.sandbox_max_processes,
        max_total_memory_mb=args.sandbox_total_memory_mb,
    )


def sandbox_from_args(args: argparse.Namespace, skills: SkillLibrary | None = None) -> Sandbox:
    limits = sandbox_limits(args)
    lent = skills.sandbox_folders() if skills else None
    return Sandbox(
        args.workspace, limits, network=args.sandbox_network, read_only=lent, python_env=args.sandbox_python_env
    )


def skills_from_args(args: argparse.Namespace) -> SkillLibrary | None:
    """The skills of --skills, with every --skill NAME among them (checked before any server starts)."""
    skills = SkillLibrary.discover(args.skills) if args.skills else None
    for name in getattr(args, "skill", []):
        assert skills is not None  # check_agent_args
        skills.get(name)
    return skills


def archive_embedder(args: argparse.Namespace) -> TextEmbedder | None:
    """The archive's embedder: none (--no-embeddings), a server's (--embeddings-url), or the installed model."""
    if args.no_embeddings:
        return None
    if args.embeddings_url is None:
        return installed_embedder()
    import openai

    model = args.embeddings_model
    if model is None:
        try:
            model = openai.OpenAI(base_url=args.embeddings_url, api_key=args.api_key or "none").models.list().data[0].id
        except openai.APIError as e:
            raise ValueError(f"--embeddings-url {args.embeddings_url}: cannot list its models ({e})") from e
    return OpenAIEmbedder(args.embeddings_url, model, args.api_key)


def installed_embedder() -> Embedder | None:
    if embedding_model_path() is None:
        print(
            f"ember: archival_search ranks by words only: the embedding model is not installed; {INSTALL_HINT}",
            file=sys.stderr,
        )
        return None
    return Embedder()


def check_agent_args(args: argparse.Namespace) -> None:
    """What can be refused before a server starts or an MCP server is spawned."""
    if args.max_turns < 1:
        raise ValueError("--max-turns must be at least 1")
    if args.embeddings_url is not None and (args.no_embeddings or not args.memory):
        raise ValueError("--embeddings-url embeds the archive of --memory: give --memory, and not --no-embeddings")
    if args.max_identical_calls < 0:
        raise ValueError("--max-identical-calls must be 0 (no limit) or more")
    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    if args.temperature is not None and not 0 <= args.temperature <= 2:
        raise ValueError(f"--temperature must be in [0, 2], got {args.temperature}")
    if args.tool_timeout <= 0:
        raise ValueError(f"--tool-timeout must be a positive number of seconds, got {args.tool_timeout}")
    if args.sandbox:
        sandbox_limits(args)
    if args.session and not args.memory:
        raise ValueError("--session names where --memory keeps this run's messages: add --memory FILE")
    if args.allow_tool and not args.approve:
        raise ValueError("--allow-tool names tools that --approve does not ask about: add --approve")
    if args.skill and not args.skills:
        raise ValueError("--skill activates a skill found with --skills: add --skills DIR")
    if args.tool_choice == "required" and not (args.sandbox or args.mcp or args.memory or args.skills):
        raise ValueError("--tool-choice required needs tools: add --sandbox, --skills DIR, --memory or --mcp SERVER")


async def run_agent(args: argparse.Namespace, url: str, skills: SkillLibrary | None) -> int:
    import openai

    from ember.agents.loop import Agent, AgentResult
    from ember.agents.mcp_tools import mcp_tools

    client = openai.AsyncOpenAI(base_url=url, api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or "none")
    async with AsyncExitStack() as stack:
        toolbox = Toolbox(timeout=args.tool_timeout)
        for tool in sandbox_tools(args, stack, skills) if args.sandbox else []:
            toolbox.add(tool)
        for tool in skills.tools(in_sandbox=args.sandbox) if skills else []:
            toolbox.add(tool)
        for tool in await stack.enter_async_context(mcp_tools(args.mcp, timeout=args.tool_timeout)):
            toolbox.add(tool)
        instructions: str | Callable[[], str] | None = args.instructions
        if skills and args.skill:
            active = [skills.activate(name, in_sandbox=args.sandbox) for name in args.skill]
            instructions = "\n\n".join([*([args.instructions] if args.instructions else []), *active])
        on_message = None
        conversation: list[dict[str, Any]] = []  # earlier messages, without the system prompt
        if args.memory:
            memory = Memory(args.memory, embedder=archive_embedder(args))
            stack.callback(memory.close)
            for tool in memory.tools():
                toolbox.add(tool)
            instructions = memory.instructions(instructions)
            session = args.session or f"session-{uuid.uuid4().hex[:8]}"
            if conversation := memory.conversation(session):
                print(f"ember: continuing session {session} ({len(conversation)} earlier messages)", file=sys.stderr)
            on_message = memory.recorder(session)
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
            max_identical_calls=args.max_identical_calls or None,
            tool_choice=args.tool_choice,
            parallel_tool_calls=args.parallel_tool_calls,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            on_message=on_message,
            approve=ToolApprovals(terminal_ask(), args.allow_tool, skills) if args.approve else None,
        )
        tasks = [args.task] if args.task is not None else interactive_tasks()
        async for text in tasks_of(tasks):
            try:
                async for event in agent.stream([*conversation, {"role": "user", "content": text}]):
                    show(event, quiet=args.json)
                    if isinstance(event.result, AgentResult):
                        conversation = [m for m in event.result.messages if m["role"] != "system"]
            except openai.APIError as e:
                raise ValueError(f"the model API at {url} failed: {e}") from e
    return 0


def interactive_tasks() -> Iterator[str]:
    """Lines typed at the prompt (or piped in), until end of input; blank lines are skipped."""
    prompt = "you> " if sys.stdin.isatty() else ""
    while True:
        try:
            line = input(prompt)
        except EOFError:
            return
        if line.strip():
            yield line


async def tasks_of(tasks: Iterable[str]) -> AsyncIterator[str]:
    """Reads each task in a worker thread, so that waiting for a line never blocks the event loop (MCP servers)."""
    iterator = iter(tasks)
    while (task := await asyncio.to_thread(next, iterator, None)) is not None:
        yield task


def show(event: AgentEvent, quiet: bool) -> None:
    """Model text on stdout as it streams; tool calls and results on stderr; with --json, only the result."""
    if event.kind == "done":
        from ember.agents.loop import AgentResult

        assert isinstance(event.result, AgentResult)
        if quiet:
            print(json.dumps(asdict(event.result), indent=2, ensure_ascii=False))
        else:
            print()
            result = event.result
            cuts = {
                "max_turns": " (cut at --max-turns)",
                "length": " (the last reply was cut at --max-tokens)",
                "tool_loop": " (stopped: the model only repeated calls that kept giving the same result)",
            }
            cut = cuts.get(result.finish_reason, "")
            trimmed = f", {result.context_trims} context trims" if result.context_trims else ""
            print(
                f"[{result.turns} turns, {len(result.tool_calls)} tool calls, {result.prompt_tokens} prompt "
                f"({result.cached_tokens} cached) + {result.completion_tokens} completion tokens{trimmed}{cut}]",
                file=sys.stderr,
            )
    elif quiet:
        return
    elif event.kind == "text":
        print(event.text, end="", flush=True)
    elif event.kind == "context_trimmed":
        print(f"\n[{event.text}]", file=sys.stderr, flush=True)
    elif event.kind == "tool_call" and event.call is not None:
        print(f"\n-> {event.call.name}({event.call.arguments})", file=sys.stderr, flush=True)
    elif event.kind == "tool_result" and event.call is not None and isinstance(event.result, ToolResult):
        lines = event.result.content.splitlines()
        shown = "\n   ".join(lines[:20]) + (f"\n   ... ({len(lines) - 20} more lines)" if len(lines) > 20 else "")
        error = " (error)" if event.result.is_error else ""
        print(f"<- {event.call.name}{error}: {shown}", file=sys.stderr, flush=True)


def serve_sandbox(args: argparse.Namespace) -> int:
    """`ember mcp sandbox`: the sandbox's tools over MCP on stdin/stdout, until the client hangs up."""
    from ember.agents.mcp_server import mcp_server, serve

    with ExitStack() as stack:
        instructions = "Runs code in a bubblewrap sandbox with no network; /workspace keeps files between calls."
        if not args.sandbox_fresh_python:
            instructions += " run_python runs in one Python session, shared by every client: variables carry over."
        toolbox = Toolbox(sandbox_tools(args, stack, None), timeout=None)
        serve(mcp_server("ember-sandbox", instructions, toolbox), args.port, args.host)
    return 0


def serve_skills(args: argparse.Namespace) -> int:
    """`ember mcp skills DIR...`: activate_skill and read_skill_file over MCP; with --sandbox, also run_python and
    run_shell, with the skill folders lent read-only at /skills/<name>."""
    from ember.agents.mcp_server import mcp_server, serve

    skills = skills_from_args(args)
    assert skills is not None  # --skills is required by the parser
    with ExitStack() as stack:
        toolbox = Toolbox(skills.tools(in_sandbox=args.sandbox), timeout=None)
        for tool in sandbox_tools(args, stack, skills) if args.sandbox else []:
            toolbox.add(tool)
        instructions = "Agent Skills: call activate_skill when a task matches a skill's description.\n"
        instructions += skills.catalog()
        serve(mcp_server("ember-skills", instructions, toolbox), args.port, args.host)
    return 0


def list_skills(args: argparse.Namespace) -> int:
    """`ember skills list DIR...`: the skills an agent given these folders would see, as a table."""
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "description", "folder", "files", box=None)
    for skill in skills_from_args(args) or []:
        table.add_row(skill.name, skill.description, str(skill.directory), str(len(skill.files())))
    Console(soft_wrap=False).print(table)
    return 0


def validate_skills(args: argparse.Namespace) -> int:
    """`ember skills validate DIR...`: each skill's breaches of the spec; exit 1 when there is any."""
    failed = 0
    for root in args.skills:
        folders = list(skill_folders(Path(root).resolve())) if Path(root).is_dir() else []
        if not folders:
            raise ValueError(f"no skills under {root!r}: a skill is a folder with a SKILL.md")
        for folder in folders:
            problems = validate(folder)
            failed += bool(problems)
            print(f"{'FAIL' if problems else 'ok  '} {folder}")
            for problem in problems:
                print(f"     - {problem}")
    return 1 if failed else 0
