"""The server's host time per streamed token: `ember serve` around a model that costs nothing.

On a GPU the model's work leaves the host, and what each streamed token still costs the server's process is
Python: the engine's (scheduling, sampling's launch, the token's delta) and the HTTP stream's (a JSON chunk, a
socket write), both mostly under one lock, the GIL. That cost per token sets the most tokens a second one server
process can stream, whatever the GPU. This script runs `ember serve`'s own code with host_overhead.py's stub
model (and the CUDA path's host code) on one core, and streams completions from it (the random workload of
`ember bench serve`: token-id prompts, greedy, no stop) on another with a lean client: raw sockets that only
count the bytes, so that the server, not the client, is the one at its limit (`ember bench serve`, which parses
every chunk, kept the server ~55% busy here). It prints the streamed tokens a second, how busy the server's core
was, and the server's CPU time per token.

Usage: .venv/bin/python benchmarks/serve_overhead.py [--clients 256] [--requests 512] [--max-num-seqs 256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]  # this checkout's Ember, and host_overhead.py

from ember.bench.workloads import BenchRequest, load_workload  # noqa: E402
from ember.server.launch import ServerProcess, free_port, wait_until_healthy  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
USAGE = re.compile(rb'"completion_tokens":\s*(\d+)')


def serve_stubbed(serve_args: list[str]) -> None:
    """`ember serve serve_args`, its model's forward and logits replaced by constants once loaded."""
    import host_overhead  # selects the CUDA path's host code (EMBER_KERNELS=triton) before the engine and Triton load

    from ember import cli

    load_llm = cli.load_llm

    def load_stubbed(args: argparse.Namespace) -> Any:  # an LLM
        llm = load_llm(args)
        host_overhead.stub_model(llm, max(args.max_num_seqs, args.max_num_batched_tokens))
        return llm

    cli.load_llm = load_stubbed
    sys.exit(cli.main(["serve", *serve_args]))


def cpu_seconds(pid: int) -> float:
    """User plus system time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def stream_completion(port: int, request: BenchRequest) -> int:
    """One streamed completion on a connection of its own; its completion tokens (from the usage chunk)."""
    body = json.dumps(
        {
            "prompt": request.prompt_ids,
            "max_tokens": request.max_new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    writer.write(f"{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    tail = first = await reader.read(1 << 16)
    if not first.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"the server answered {first[:300]!r}")
    while chunk := await reader.read(1 << 16):
        tail = (tail + chunk)[-4096:]  # the usage chunk comes last
    writer.close()
    usage = USAGE.search(tail)
    if usage is None:
        raise RuntimeError("a stream ended without its usage chunk")
    return int(usage.group(1))


async def closed_loop(port: int, requests: list[BenchRequest], clients: int) -> tuple[int, float]:
    """`clients` streams at a time, each starting the next request as its last ends: (tokens, seconds)."""
    pending = list(requests)
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while pending:
            streamed = await stream_completion(port, pending.pop())  # (`tokens +=` would read tokens before it)
            tokens += streamed

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=256, help="concurrent streams (a closed loop)")
    parser.add_argument("--requests", type=int, default=512, help="requests in all")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="the server's batch")
    parser.add_argument("--serve", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # the server's own process
    args = parser.parse_args()
    if args.serve is not None:
        serve_stubbed(args.serve)
    import host_overhead

    cores = sorted(os.sched_getaffinity(0))
    server_core, client_core = (cores[0], cores[1]) if len(cores) > 1 else (None, None)
    port = free_port()
    workload = load_workload("random", host_overhead.VOCAB)
    requests = [workload.requests[i % len(workload.requests)] for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as model_dir:
        (Path(model_dir) / "config.json").write_text(json.dumps(host_overhead.TINY_QWEN3))
        serve_args = [
            "--model", model_dir, "--load-format", "dummy", "--device", "cpu", "--dtype", "float32",
            "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", "8192", "--max-model-len", "2048",
            "--kv-cache-memory", "1", "--async-scheduling", "--disable-log-stats", "--port", str(port),
        ]  # fmt: skip
        process = subprocess.Popen(
            [sys.executable, __file__, "--serve", *serve_args],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            preexec_fn=None if server_core is None else lambda: os.sched_setaffinity(0, {server_core}),
        )
        server = ServerProcess(process, port)
        try:
            wait_until_healthy(process, server.url, 120)
            if client_core is not None:
                os.sched_setaffinity(0, {client_core})
            asyncio.run(closed_loop(port, requests[:8], 8))  # warm-up
            before = cpu_seconds(process.pid)
            tokens, wall = asyncio.run(closed_loop(port, requests, args.clients))
            server_cpu = cpu_seconds(process.pid) - before
        finally:
            server.stop()
    where = f"server on core {server_core}, client on core {client_core}" if server_core is not None else "one core"
    print(
        f"{args.clients} clients, {len(requests)} requests, {tokens:,} tokens ({where}): {tokens / wall:,.0f} "
        f"streamed tok/s; the server's core {server_cpu / wall:.0%} busy, {1e6 * server_cpu / tokens:.1f} us "
        f"of its CPU per token"
    )


if __name__ == "__main__":
    main()
