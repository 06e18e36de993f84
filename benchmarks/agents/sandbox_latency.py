"""What one sandboxed run costs: a fresh bubblewrap container per call, directly and through `ember mcp sandbox`.

Usage: .venv/bin/python benchmarks/agents/sandbox_latency.py [--runs 30]
"""

from __future__ import annotations

import argparse
import asyncio
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
        print(f"run_python print(1), direct:  {await timed(lambda: sandbox.run_python('print(1)'), runs)}")
        print(f"run_shell echo 1, direct:     {await timed(lambda: sandbox.run_shell('echo 1'), runs)}")
    start = time.perf_counter()
    async with mcp_tools([f"{sys.executable} -m ember.cli mcp sandbox"]) as tools:
        print(f"MCP server start and tools/list: {(time.perf_counter() - start) * 1000:.0f} ms")
        python = next(t for t in tools if t.name == "run_python")
        print(f"run_python print(1), over MCP: {await timed(lambda: python.run({'code': 'print(1)'}), runs)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    asyncio.run(main(parser.parse_args().runs))
