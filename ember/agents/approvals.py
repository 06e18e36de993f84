"""Human approval of tool calls: which calls run at once, and asking a person about the others.

An agent whose tools reach past the sandbox (an MCP server that writes files, sends mail, opens pull requests)
should not act unseen. `ToolApprovals` lets some tools run without asking (the user's list, and the tools that
an activated skill names in its `allowed-tools`, as the Agent Skills specification means that field) and puts
every other call to a person; a declined call does not run, and the model reads that it was declined.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Literal, TextIO

from ember.agents.skills import SkillLibrary
from ember.agents.tools import ToolResult

Verdict = Literal["yes", "always", "no"]  # "always": this call, and every later call of its tool
# What a person is asked about: a call's tool name and its arguments (JSON text, as the model wrote them).
Ask = Callable[[str, str], Awaitable[Verdict]]


class ToolApprovals:
    """Tools in `allowed`, or in the `allowed-tools` of a skill activated in `skills`, run without asking; any
    other call runs only when `ask(name, arguments)` says yes (or always: the tool then runs without asking)."""

    def __init__(self, ask: Ask, allowed: Iterable[str] = (), skills: SkillLibrary | None = None) -> None:
        self.ask = ask
        self.allowed = set(allowed)
        self.skills = skills

    def preapproved(self, name: str) -> bool:
        return name in self.allowed or (self.skills is not None and name in self.skills.allowed_tools())

    async def __call__(self, name: str, arguments: str) -> bool:
        if self.preapproved(name):
            return True
        verdict = await self.ask(name, arguments)
        if verdict == "always":
            self.allowed.add(name)
        return verdict != "no"


def declined(name: str) -> ToolResult:
    """What the model reads instead of a declined call's result."""
    return ToolResult(
        f"[not run: the user declined this call of {name}. Do not call it again with the same arguments; "
        "answer without it, or ask the user how to go on.]",
        is_error=True,
    )


def terminal_ask(stdin: TextIO = sys.stdin) -> Ask:
    """Asks on stderr and reads the answer from a line of `stdin`: y (run it), a (always: run it, and every
    later call of this tool), anything else or end of input: no. The line is read in a worker thread, so that
    MCP servers are not stalled while the person thinks."""

    async def ask(name: str, arguments: str) -> Verdict:
        print(f"\n?? run {name}({arguments})? [y]es / [a]lways {name} / [N]o: ", end="", file=sys.stderr, flush=True)
        answer = (await asyncio.to_thread(stdin.readline)).strip().lower()
        return "yes" if answer in ("y", "yes") else "always" if answer in ("a", "always") else "no"

    return ask
