"""Agent tools from Python functions: their schemas, and every way a call can fail reaching the model as text."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import pytest

from ember.agents.tools import Tool, Toolbox, ToolResult, function_tool


def forecast(city: str, days: int = 1, unit: Literal["C", "F"] = "C") -> dict:
    """Weather forecast for a city.

    Longer text that is not part of the description."""
    return {"city": city, "days": days, "unit": unit}


async def slow(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "done"


def broken() -> str:
    raise RuntimeError("disk on fire")


def test_schema_and_description_come_from_the_signature_and_docstring() -> None:
    tool = function_tool(forecast)
    assert tool.name == "forecast" and tool.description == "Weather forecast for a city."
    assert tool.parameters["required"] == ["city"]
    props = tool.parameters["properties"]
    assert props["city"] == {"type": "string"}
    assert props["days"] == {"type": "integer", "default": 1}
    assert props["unit"]["enum"] == ["C", "F"]
    assert tool.spec() == {
        "type": "function",
        "function": {"name": "forecast", "description": tool.description, "parameters": tool.parameters},
    }
    renamed = function_tool(forecast, name="weather", description="Other words.")
    assert (renamed.name, renamed.description) == ("weather", "Other words.")


def test_functions_with_unnamed_parameters_are_refused() -> None:
    def anything(*args: int) -> None: ...

    with pytest.raises(ValueError, match="name every parameter"):
        function_tool(anything)


def test_calls_run_sync_and_async_functions_and_validate_arguments() -> None:
    box = Toolbox([function_tool(forecast), function_tool(slow)])

    async def calls() -> list[ToolResult]:
        return await asyncio.gather(
            box.call("forecast", '{"city": "Paris", "days": "3"}'),  # "3" is coerced, as pydantic does
            box.call("slow", '{"seconds": 0}'),
            box.call("forecast", '{"days": 2}'),
            box.call("forecast", '{"city": "Paris", "unit": "K"}'),
        )

    ok, done, missing, bad_enum = asyncio.run(calls())
    assert json.loads(ok.content) == {"city": "Paris", "days": 3, "unit": "C"} and not ok.is_error
    assert done == ToolResult("done")
    assert missing.is_error and "city" in missing.content and "required" in missing.content.lower()
    assert bad_enum.is_error and "unit" in bad_enum.content


def test_every_failure_becomes_an_error_result() -> None:
    box = Toolbox([function_tool(forecast), function_tool(slow), function_tool(broken)], timeout=0.2)
    cases = {
        ("nope", "{}"): "unknown tool 'nope'; the tools are: forecast, slow, broken",
        ("forecast", "{city"): "arguments are not valid JSON",
        ("forecast", "[1, 2]"): "arguments must be a JSON object",
        ("broken", ""): "tool 'broken' failed: RuntimeError: disk on fire",
        ("slow", '{"seconds": 5}'): "tool 'slow' did not finish within 0.2 s",
    }
    for (name, arguments), message in cases.items():
        result = asyncio.run(box.call(name, arguments))
        assert result.is_error and result.content.startswith(message), (name, result)


def test_tool_names_are_unique() -> None:
    async def run(arguments: dict) -> ToolResult:
        return ToolResult("")

    with pytest.raises(ValueError, match="two tools are named 'forecast'"):
        Toolbox([function_tool(forecast), Tool("forecast", "", {"type": "object"}, run)])
