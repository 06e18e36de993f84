"""Serving benchmarks' clients: `ember bench serve` against a server that drops kept-alive connections (a real socket
server here), and benchmarks/serve_overhead.py against `ember serve`."""

from __future__ import annotations

import asyncio
import re
import socket
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from ember.bench.serving import one_request
from ember.bench.workloads import BenchRequest

HEADERS = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
EVENTS = (
    b'data: {"choices": [{"text": "a"}]}\n\n',
    b'data: {"choices": [{"text": "b"}]}\n\n',
    b'data: {"choices": [], "usage": {"completion_tokens": 2}}\n\n',
    b"data: [DONE]\n\n",
)


def chunked(events: tuple[bytes, ...]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in events)


async def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (linger 0): what the client reads as a ReadError."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def close(writer: asyncio.StreamWriter) -> None:
    """Close without an answer: what the client reads as a RemoteProtocolError."""
    writer.close()


async def answer_then_reset(writer: asyncio.StreamWriter) -> None:
    writer.write(HEADERS + chunked(EVENTS[:1]))
    await writer.drain()
    await asyncio.sleep(0.05)
    await reset(writer)


async def answer(writer: asyncio.StreamWriter) -> None:
    writer.write(HEADERS + chunked(EVENTS) + b"0\r\n\r\n")
    await writer.drain()
    writer.close()


async def serve_then_time(first_connection: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> tuple[object, int]:
    """One request through a server that treats its first connection with `first_connection` (after reading the
    request) and answers on the later ones: (one_request's result or the error it raised, connections made)."""
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        await (first_connection if connections == 1 else answer)(writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            try:
                result: object = await one_request(client, url, None, BenchRequest([1, 2], 2), {})
            except httpx.HTTPError as error:
                result = error
    finally:
        server.close()
        await server.wait_closed()
    return result, connections


@pytest.mark.parametrize("drop", [reset, close])
def test_a_request_on_a_connection_the_server_dropped_is_sent_again(drop: Callable) -> None:
    """A kept-alive connection the server closes as the request goes out (uvicorn's after 5 idle seconds, httpx's
    expiry the same: seen as resets at 256 clients) costs the request a second send, not the whole benchmark."""
    timing, connections = asyncio.run(serve_then_time(drop))
    assert connections == 2
    assert timing.output_tokens == 2 and len(timing.itls) == 1


def test_a_stream_that_breaks_after_its_first_token_is_an_error() -> None:
    """Once tokens came, sending again would time another request: the error is raised."""
    error, connections = asyncio.run(serve_then_time(answer_then_reset))
    assert isinstance(error, httpx.ReadError) and connections == 1


def test_serve_overhead_streams_every_token_from_a_stub_model_server() -> None:
    """benchmarks/serve_overhead.py: `ember serve` on a stub model, its lean client counting every streamed token
    (the random workload's lengths, no stop), the server stopped at the end."""
    from ember.bench.workloads import load_workload

    root = Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        "benchmarks/serve_overhead.py",
        "--clients",
        "4",
        "--requests",
        "12",
        "--max-num-seqs",
        "4",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = sum(r.max_new_tokens for r in load_workload("random", 1024).requests[:12])
    line = result.stdout.strip().splitlines()[-1]
    assert re.match(rf"4 clients, 12 requests, {expected:,} tokens .*streamed tok/s; the server's core", line), line
