"""What one sandboxed run costs: a fresh bubblewrap container per call, or a run in the sandbox's persistent
Python session, directly and through `ember mcp sandbox`; and a numpy import, fresh each time or once per session.

Usage: .venv/bin/python benchmarks/agents/sandbox_latency.py [--runs 30]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

from ember.agents.mcp_tools import mcp_tools
from ember.agents.sandbox import Sandbox


async def timed(call: Callable[[], Awaitable[object]], runs: int) -> str:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        await call()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return f"median {statistics.median(times):.1f} ms, p90 {times[int(0.9 * (runs - 1))]:.1f} ms"


async def main(runs: int) -> None:
    with Sandbox() as sandbox:
        session = sandbox.python_session()
        start = time.perf_counter()
        await session.run_async("pass")
        print(f"Python session start (its first run): {(time.perf_counter() - start) * 1000:.0f} ms")
        print(f"run_python print(1), fresh, direct:   {await timed(lambda: sandbox.run_python('print(1)'), runs)}")
        print(f"run_python print(1), session, direct: {await timed(lambda: session.run_async('print(1)'), runs)}")
        print(f"run_shell echo 1, direct:             {await timed(lambda: sandbox.run_shell('echo 1'), runs)}")
    with Sandbox(python_env=sys.prefix) as sandbox:  # this environment's packages, numpy among them
        code = "import numpy\nprint(numpy.arange(10).sum())"
        print(f"import numpy and use it, fresh:       {await timed(lambda: sandbox.run_python(code), runs)}")
        session = sandbox.python_session()
        print(f"import numpy and use it, session:     {await timed(lambda: session.run_async(code), runs)}")
    for flags, label in (("", "session"), (" --sandbox-fresh-python", "fresh")):
        start = time.perf_counter()
        async with mcp_tools([f"{sys.executable} -m ember.cli mcp sandbox{flags}"]) as tools:
            print(f"MCP server start and tools/list:      {(time.perf_counter() - start) * 1000:.0f} ms")
            python = next(t for t in tools if t.name == "run_python")
            took = await timed(functools.partial(python.run, {"code": "print(1)"}), runs)
            print(f"run_python print(1), {label}, over MCP: {took}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    asyncio.run(main(parser.parse_args().runs))
