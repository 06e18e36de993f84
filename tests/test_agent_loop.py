"""The agent loop against the real server (SmolLM2), with Python tools, the sandbox over real MCP, and the CLI."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from ember.agents import Agent, AgentEvent, AgentResult, function_tool
from ember.agents.approvals import ToolApprovals, Verdict
from ember.agents.loop import CLEARED, canonical_arguments, shrink
from ember.agents.mcp_tools import mcp_tools
from ember.agents.sandbox import Sandbox
from ember.server.launch import ServerProcess, free_port, running_server

MODEL = "SmolLM2-135M-Instruct"
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


def client(server: ServerProcess) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def collect(agent: Agent, task: str) -> tuple[list[AgentEvent], AgentResult]:
    async def run() -> list[AgentEvent]:
        async with agent.client:  # closed on the loop that used it
            return [event async for event in agent.stream(task)]

    events = asyncio.run(run())
    assert events[-1].kind == "done" and isinstance(events[-1].result, AgentResult)
    return events, events[-1].result


def test_a_required_call_runs_the_tool_and_the_model_answers_with_its_result(server: ServerProcess) -> None:
    seen: list[tuple[int, int]] = []

    def add(a: int, b: int) -> int:
        """Add two integers."""
        seen.append((a, b))
        return a + b

    agent = Agent(
        client(server),
        MODEL,
        [function_tool(add)],
        "You are a helpful assistant.",
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=48,
        max_turns=4,
    )
    events, result = collect(agent, "What is 17 + 25? Use the add tool.")
    (call, outcome), *_ = result.tool_calls
    arguments = json.loads(call.arguments)
    assert call.name == "add" and seen[0] == (arguments["a"], arguments["b"])
    assert outcome.content == str(sum(seen[0])) and not outcome.is_error
    roles = [m["role"] for m in result.messages]
    assert roles[:5] == ["system", "user", "assistant", "tool", "assistant"]
    assert result.messages[2]["tool_calls"][0]["id"] == result.messages[3]["tool_call_id"] == call.id
    assert result.messages[3]["content"] == outcome.content
    last = result.messages[-1]
    assert last["role"] == "assistant" and "tool_calls" not in last and last["content"] == result.output
    assert result.finish_reason in ("stop", "length") and result.turns == roles.count("assistant") <= 4
    assert result.prompt_tokens > 0 and result.completion_tokens > 0
    streamed = "".join(e.text for e in events if e.kind == "text")
    assert streamed == "".join(m["content"] or "" for m in result.messages if m["role"] == "assistant")
    kinds = [e.kind for e in events if e.kind != "text"]
    assert kinds[:2] == ["tool_call", "tool_result"] and kinds[-1] == "done"


def test_a_run_keeps_its_system_prompt_so_the_server_reuses_the_conversation(server: ServerProcess) -> None:
    """Instructions that are a function (memory blocks) are rendered once per run: a system prompt changed
    mid-run would make the server recompute the whole conversation, its prefix cache holding the old one."""
    renders: list[str] = []

    def instructions() -> str:
        renders.append(f"You are a helpful assistant (rendering {len(renders) + 1}).")
        return renders[-1]

    def note() -> str:
        """Take a note."""
        return "noted"

    tools = [function_tool(note)]
    agent = Agent(
        client(server), MODEL, tools, instructions, tool_choice="note", temperature=0, max_tokens=64, max_turns=2
    )
    _, result = collect(agent, "Take a note, then say done.")
    assert renders == [result.messages[0]["content"]] and result.turns == 2
    first = {"messages": result.messages[:2], "tools": agent.toolbox.specs()}
    first_prompt = httpx.post(f"{server.url}/tokenize", json=first).json()["count"]
    assert result.cached_tokens >= first_prompt // 16 * 16  # the second turn found the first one's blocks


def turn(i: int, result: str) -> list[dict]:
    call = {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    return [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": f"c{i}", "content": result},
    ]


def test_shrink_clears_old_tool_results_then_drops_old_turns_but_keeps_task_skills_and_the_latest_turn() -> None:
    system, task = {"role": "system", "content": "sys"}, {"role": "user", "content": "task"}
    skill = "<skill_content name='s'>instructions</skill_content>"
    messages = [system, task, *turn(1, "big 1"), *turn(2, skill), *turn(3, "big 3"), *turn(4, "latest")]
    steps = []
    while removed := shrink(messages):
        steps.append(removed)
    assert steps == [
        "cleared 1 old tool result(s)",  # turn 1's
        "cleared 1 old tool result(s)",  # turn 3's: turn 2 holds a skill
        "dropped the oldest turn (2 message(s))",  # turn 1
        "dropped the oldest turn (2 message(s))",  # turn 3
    ]
    assert messages == [system, task, *turn(2, skill), *turn(4, "latest")]
    assert [m["content"] for m in messages if m["role"] == "tool"] == [skill, "latest"]
    assert shrink([system, task, *turn(1, "only")]) == ""  # nothing but the latest turn: nothing to take
    earlier = [{"role": "user", "content": "yesterday"}, {"role": "assistant", "content": "noted"}]
    continued = [system, *earlier, task]  # a continued session: the task is the latest user message
    assert shrink(continued) == "dropped the oldest turn (1 message(s))" and continued == [system, earlier[1], task]
    assert shrink(continued) == "dropped the oldest turn (1 message(s))" and continued == [system, task]
    assert shrink(continued) == ""


def test_a_conversation_over_the_context_is_shrunk_and_the_run_goes_on() -> None:
    """A server with a 1,024-token context and a tool whose every reply is long: the loop keeps going, clearing
    old results, where without shrinking the third turn's request is refused."""
    replies = iter(range(100))

    def fetch() -> str:
        """Fetch the next page of the log."""
        return f"page {next(replies)}: " + "lorem ipsum dolor " * 80

    async def run() -> AgentResult:
        async with client(small) as api:
            agent = Agent(
                api,
                MODEL,
                [function_tool(fetch)],
                tool_choice="fetch",
                reset_tool_choice=False,
                temperature=0,
                max_tokens=32,
                max_turns=6,
            )
            return await agent.run("Read the log.")

    with running_server("--dtype", "float32", "--max-model-len", "1024") as small:
        result = asyncio.run(run())
    assert result.turns == 6 and result.finish_reason == "max_turns" and len(result.tool_calls) == 6
    assert result.context_trims >= 2
    tool_results = [m["content"] for m in result.messages if m["role"] == "tool"]
    assert tool_results[-1].startswith("page 5: ") and CLEARED in tool_results


def lookup(word: str) -> str:
    """Look a word up."""
    return f"{word}: not found"


def forced_lookup(server: ServerProcess, **settings: Any) -> Agent:
    """An agent that must call `lookup` on every turn (tool_choice stays "required")."""
    return Agent(
        client(server),
        MODEL,
        [function_tool(lookup)],
        tool_choice="required",
        reset_tool_choice=False,
        temperature=0,
        max_tokens=32,
        **settings,
    )


def test_max_turns_cuts_a_model_that_keeps_calling(server: ServerProcess) -> None:
    agent = forced_lookup(server, parallel_tool_calls=False, max_turns=3, max_identical_calls=None)
    _, result = collect(agent, "Look up the word 'ember'.")
    assert result.finish_reason == "max_turns" and result.turns == 3 and len(result.tool_calls) == 3
    assert all(outcome.content.endswith(": not found") for _, outcome in result.tool_calls)


def test_a_model_that_repeats_one_call_is_refused_then_stopped(server: ServerProcess) -> None:
    """Forced to call on every turn at temperature 0, SmolLM2 repeats its calls word for word: once a call gave
    the same result twice, it is not run again, and the turn made only of such calls ends the run, well before
    max_turns. (A call whose result changes may repeat: the paging `fetch` of the context test above.)"""
    agent = forced_lookup(server, max_turns=8, max_identical_calls=2)
    _, result = collect(agent, "Look up the word 'ember'.")
    assert result.finish_reason == "tool_loop" and result.turns < 8
    runs: Counter[str] = Counter()  # lookup's results depend on its arguments only: a streak is a count of runs
    for call, outcome in result.tool_calls:
        refused = outcome.content.startswith("[not run: lookup gave the same result the last 2 times")
        assert refused == (runs[canonical_arguments(call.arguments)] == 2) and refused == outcome.is_error
        runs[canonical_arguments(call.arguments)] += not refused
    last_calls = next(m for m in reversed(result.messages) if m["role"] == "assistant")["tool_calls"]
    assert all(outcome.is_error for _, outcome in result.tool_calls[-len(last_calls) :])


def test_a_declined_call_does_not_run_and_the_model_reads_why(server: ServerProcess) -> None:
    """With approvals, each call is put to the person before it runs: declined, it does not run (its reply says
    so, and no repeat streak counts it); "always" runs it and lets the tool's later calls run without asking."""
    asked: list[str] = []
    verdicts = iter(["no", "always"])

    async def ask(name: str, arguments: str) -> Verdict:
        asked.append(name)
        return next(verdicts)

    agent = forced_lookup(server, parallel_tool_calls=False, max_turns=3, approve=ToolApprovals(ask))
    _, result = collect(agent, "Look up the word 'ember'.")
    assert asked == ["lookup", "lookup"] and result.turns == 3 and len(result.tool_calls) == 3
    outcomes = [outcome for _, outcome in result.tool_calls]
    assert outcomes[0].is_error and outcomes[0].content.startswith("[not run: the user declined this call of lookup")
    assert all(o.content.endswith(": not found") and not o.is_error for o in outcomes[1:])
    first_reply = next(m for m in result.messages if m["role"] == "tool")
    assert first_reply["content"] == outcomes[0].content  # the model read the refusal as the tool's reply


def test_agent_refuses_a_tool_choice_it_cannot_honour(server: ServerProcess) -> None:
    with pytest.raises(ValueError, match="neither auto/required/none nor one of the tools"):
        Agent(client(server), MODEL, [], tool_choice="missing")
    with pytest.raises(ValueError, match="needs at least one tool"):
        Agent(client(server), MODEL, [], tool_choice="required")


@needs_bwrap
def test_sandbox_tools_over_mcp_run_the_models_code(server: ServerProcess, tmp_path) -> None:
    """`ember mcp sandbox` as a real stdio MCP server: the model's code runs there, and the reply is what the
    same code gives in a sandbox's Python session run directly."""

    async def run() -> AgentResult:
        command = f"{sys.executable} -m ember.cli mcp sandbox --workspace {tmp_path}"
        async with mcp_tools([command]) as tools:
            assert sorted(t.name for t in tools) == ["run_python", "run_shell"]
            async with client(server) as api:
                agent = Agent(api, MODEL, tools, tool_choice="run_python", temperature=0, max_tokens=64, max_turns=2)
                return await agent.run("Print the squares of 1 to 5 with Python.")

    result = asyncio.run(run())
    call, outcome = result.tool_calls[0]
    assert call.name == "run_python"
    with Sandbox(tmp_path) as sandbox:
        direct = sandbox.python_session().run(json.loads(call.arguments)["code"])
    assert outcome.content == direct.as_text()
    assert result.messages[2] == {"role": "tool", "tool_call_id": call.id, "content": outcome.content}


def ember(*args: str, timeout: float = 120, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ember.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@needs_bwrap
def test_cli_runs_a_task_with_the_sandbox_and_prints_the_run_as_json(server: ServerProcess) -> None:
    done = ember(
        "agent",
        "Compute 12 * 12 with Python.",
        "--url",
        f"{server.url}/v1",
        "--sandbox",
        "--tool-choice",
        "run_python",
        "--max-turns",
        "2",
        "--temperature",
        "0",
        "--max-tokens",
        "48",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["tool_calls"][0][0]["name"] == "run_python" and 1 <= result["turns"] <= 2
    assert [m["role"] for m in result["messages"][:3]] == ["user", "assistant", "tool"]


@needs_bwrap
def test_cli_agent_activates_a_skill_and_preloads_one_with_skill(server: ServerProcess, tmp_path) -> None:
    skills = str(Path(__file__).resolve().parents[1] / "examples" / "skills")
    common = ["--url", f"{server.url}/v1", "--skills", skills, "--temperature", "0", "--max-tokens", "48", "--json"]
    chosen = ember(
        "agent",
        "What is in data.csv?",
        *common,
        "--sandbox",
        "--tool-choice",
        "activate_skill",
        "--max-turns",
        "2",
        "--workspace",
        str(tmp_path),
    )
    assert chosen.returncode == 0, chosen.stderr
    call, outcome = json.loads(chosen.stdout)["tool_calls"][0]
    assert (call["name"], json.loads(call["arguments"])) == ("activate_skill", {"name": "csv-summary"})
    assert outcome["content"].startswith('<skill_content name="csv-summary">\n# Summarizing a CSV file')
    assert "/skills/csv-summary/scripts/summarize.py" in outcome["content"] and not outcome["is_error"]

    preloaded = ember(
        "agent", "hi", *common, "--skill", "csv-summary", "--instructions", "Be brief.", "--max-turns", "1"
    )
    assert preloaded.returncode == 0, preloaded.stderr
    system = json.loads(preloaded.stdout)["messages"][0]
    assert system["role"] == "system" and system["content"].startswith(
        'Be brief.\n\n<skill_content name="csv-summary">'
    )


def test_cli_approve_asks_on_stderr_and_a_no_keeps_the_call_from_running(server: ServerProcess) -> None:
    skills = str(Path(__file__).resolve().parents[1] / "examples" / "skills")
    flags = ["--skills", skills, "--tool-choice", "activate_skill", "--approve", "--max-turns", "1", "--json"]
    done = ember("agent", "What is in data.csv?", "--url", f"{server.url}/v1", *flags, stdin="n\n")
    assert done.returncode == 0, done.stderr
    assert "?? run activate_skill({" in done.stderr and "[y]es / [a]lways activate_skill / [N]o" in done.stderr
    (call, outcome), *_ = json.loads(done.stdout)["tool_calls"]
    assert call["name"] == "activate_skill" and outcome["is_error"]
    assert outcome["content"].startswith("[not run: the user declined this call of activate_skill")


def test_cli_without_a_task_holds_a_conversation_of_the_lines_piped_in(server: ServerProcess) -> None:
    done = ember("agent", "--url", f"{server.url}/v1", "--max-tokens", "12", stdin="Say hello.\n\nNow say goodbye.\n")
    assert done.returncode == 0, done.stderr
    prompts = [int(n) for n in re.findall(r"\[1 turns, 0 tool calls, (\d+) prompt", done.stderr)]
    assert len(prompts) == 2 and prompts[1] > prompts[0] + 12  # the second turn's prompt holds the first exchange


def test_cli_errors_are_one_line_messages(server: ServerProcess) -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"
    cases = [
        (["--url", f"{server.url}/v1", "--mcp", "/no/such/mcp-server"], "MCP server '/no/such/mcp-server'"),
        (["--url", closed], f"the model API at {closed} did not answer"),
        (["--url", f"{server.url}/v1", "--tool-choice", "required"], "--tool-choice required needs tools"),
        (["--url", f"{server.url}/v1", "--tool-choice", "nope"], "neither auto/required/none nor one of the tools"),
        (["--max-turns", "0"], "--max-turns must be at least 1"),  # refused before a server starts
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["--temperature", "5"], "--temperature must be in [0, 2]"),
        (["--tool-timeout", "0"], "--tool-timeout must be a positive number"),
        (["--session", "s1"], "--session names where --memory keeps"),
        (["--allow-tool", "run_python"], "--allow-tool names tools that --approve does not ask about"),
        (["--sandbox", "--sandbox-max-processes", "0"], "--sandbox-max-processes must be positive"),
        (["--model", "/no/such.gguf"], "the model server did not start: server exited early: ember: error: model"),
    ]
    for args, message in cases:
        done = ember("agent", "hi", *args)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        error = done.stderr.strip().splitlines()[-1]
        assert error.startswith("ember: error: ") and message in error, done.stderr
        if "--url" not in args and "--model" not in args:  # refused before any model server starts
            assert "starting the model server" not in done.stderr, done.stderr
        if "--model" in args:  # the failed server's log stays for the user to read; the test removes it
            log = server_log(done.stderr)
            assert "model '/no/such.gguf' not found" in log.read_text()
            log.unlink()


def test_cli_without_url_serves_the_embedded_model_for_the_run_and_stops_it() -> None:
    done = ember("agent", "Say hello.", "--max-turns", "1", "--max-tokens", "8", "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert "starting the model server" in done.stderr and done.stdout.strip()
    assert "[1 turns, 0 tool calls" in done.stderr and "(the last reply was cut at --max-tokens)" in done.stderr
    assert not server_log(done.stderr).exists()  # a run that succeeded leaves no log behind


def server_log(stderr: str) -> Path:
    """The model server's log that `ember agent` named on stderr."""
    match = re.search(r"\(log: (\S+)\)", stderr)
    assert match, stderr
    return Path(match.group(1))
