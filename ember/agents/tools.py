"""Tools an agent can call: a name, a JSON schema for the arguments, and an async function that runs them.

A tool never raises into the loop: bad arguments, an unknown name, an exception or a time-out become an error
result that goes back to the model as the tool's reply, so that the model can correct itself, as a person
reading the error would.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pydantic


@dataclass(frozen=True)
class ToolResult:
    content: str
    is_error: bool = False


@dataclass(frozen=True)
class Tool:
    """A function the model may call. `run` takes the parsed arguments object."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    run: Callable[[dict[str, Any]], Awaitable[ToolResult]]

    def spec(self) -> dict[str, Any]:
        """The OpenAI `tools` entry."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


def function_tool(fn: Callable[..., Any], *, name: str | None = None, description: str | None = None) -> Tool:
    """A tool from a Python function (sync or async): the schema from its type hints, the description from its
    docstring's first paragraph. Arguments are validated (and coerced) by pydantic before the call; a sync
    function runs in a worker thread so that it cannot stall other tools or the loop."""
    signature = inspect.signature(fn)
    hints = inspect.get_annotations(fn, eval_str=True)
    fields: dict[str, Any] = {}
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ValueError(f"tool {fn.__name__}: *args and **kwargs have no schema; name every parameter")
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (hints.get(param.name, Any), default)
    arguments_model = pydantic.create_model(f"{fn.__name__}_arguments", **fields)
    schema = arguments_model.model_json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    doc = inspect.getdoc(fn) or ""

    async def run(arguments: dict[str, Any]) -> ToolResult:
        try:
            values = arguments_model.model_validate(arguments)
        except pydantic.ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'arguments'}: {err['msg']}" for err in e.errors())
            return ToolResult(f"invalid arguments: {problems}", is_error=True)
        kwargs = {field: getattr(values, field) for field in fields}
        if inspect.iscoroutinefunction(fn):
            value = await fn(**kwargs)
        else:
            value = await asyncio.to_thread(fn, **kwargs)
        return value if isinstance(value, ToolResult) else ToolResult(as_text(value))

    return Tool(name or fn.__name__, description or doc.split("\n\n")[0].strip(), schema, run)


def as_text(value: Any) -> str:
    """What the model reads of a tool's return value: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


class Toolbox:
    """The tools of one agent, by name; runs the model's calls and turns every failure into an error result."""

    def __init__(self, tools: Iterable[Tool] = (), timeout: float | None = 60.0) -> None:
        self.tools: dict[str, Tool] = {}
        self.timeout = timeout
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool) -> None:
        if tool.name in self.tools:
            raise ValueError(f"two tools are named {tool.name!r}; tool names must be unique")
        self.tools[tool.name] = tool

    def specs(self) -> list[dict[str, Any]]:
        return [tool.spec() for tool in self.tools.values()]

    async def call(self, name: str, arguments: str) -> ToolResult:
        """Run one call as the model wrote it (`arguments` is the JSON text of the arguments object)."""
        tool = self.tools.get(name)
        if tool is None:
            return ToolResult(f"unknown tool {name!r}; the tools are: {', '.join(self.tools) or 'none'}", True)
        try:
            parsed = json.loads(arguments or "{}")
        except json.JSONDecodeError as e:
            return ToolResult(f"arguments are not valid JSON ({e})", is_error=True)
        if not isinstance(parsed, dict):
            return ToolResult("arguments must be a JSON object", is_error=True)
        try:
            return await asyncio.wait_for(tool.run(parsed), self.timeout)
        except TimeoutError:
            return ToolResult(f"tool {name!r} did not finish within {self.timeout:g} s", is_error=True)
        except Exception as e:  # a tool's own failure is the model's information, not the loop's end
            return ToolResult(f"tool {name!r} failed: {type(e).__name__}: {e}", is_error=True)
