"""`ember bench serve`: drive a running server over HTTP streaming at fixed load levels.

A level is either a number of clients, each sending requests back to back until the level's requests are done
(closed loop, `--concurrency`), or a request rate, requests arriving as a Poisson process whatever the server's
pace (open loop, `--request-rate`, as vLLM's `bench serve`; `inf` sends them all at once). Per request we record
TTFT (first streamed text), ITL (gaps between chunks), TPOT ((end - first token) / (tokens - 1)) and end-to-end
latency.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.bench.workloads import BenchRequest, load_workload, positive_int


@dataclass
class RequestTiming:
    ttft: float
    e2e: float
    output_tokens: int
    itls: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def one_request(
    client: Any, url: str, model: str | None, req: BenchRequest, headers: dict[str, str]
) -> RequestTiming:
    from httpx import ReadError, RemoteProtocolError

    body: dict[str, Any] = {
        "prompt": req.prompt_ids,
        "max_tokens": req.max_new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    for attempt in (1, 2):
        start = time.perf_counter()
        first = last = None
        itls: list[float] = []
        tokens = 0
        try:
            async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"server answered {resp.status_code}: {(await resp.aread()).decode()[:200]}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    now = time.perf_counter()
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if chunk.get("choices"):
                        if first is None:
                            first = now
                        elif last is not None:
                            itls.append(now - last)
                        last = now
        except (RemoteProtocolError, ReadError):
            # a server that closes idle kept-alive connections (llama.cpp's; uvicorn's after 5 s, httpx's own
            # expiry) may close the one this request was sent on before reading it (a reset, or a close without
            # an answer): sent again on a new connection, and timed from then
            if first is not None or attempt == 2:
                raise
            continue
        break
    end = time.perf_counter()
    return RequestTiming((first or end) - start, end - start, tokens, itls)


@dataclass(frozen=True)
class Load:
    """One level: `clients` sending back to back, or requests arriving at `rate` per second (inf: all at once)."""

    clients: int | None = None
    rate: float | None = None

    def __str__(self) -> str:
        return f"{self.clients} clients" if self.clients is not None else f"{self.rate:g} req/s"


async def run_level(
    url: str, model: str | None, requests: list[BenchRequest], load: Load, headers: dict[str, str], progress: Any
) -> dict[str, Any]:
    import httpx

    pending = list(requests)
    timings: list[RequestTiming] = []
    task = progress.add_task(str(load), total=len(requests))
    limits = httpx.Limits(max_connections=None)  # an open loop's requests may all be in flight at once

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def send(req: BenchRequest) -> None:
            timings.append(await one_request(client, url, model, req, headers))
            progress.advance(task)

        async def worker() -> None:
            while pending:
                await send(pending.pop(0))

        async def arrivals(rate: float) -> None:
            gaps = random.Random(0)  # the same arrival times on every run
            sent = []
            for index, req in enumerate(pending):
                if index and not math.isinf(rate):
                    await asyncio.sleep(gaps.expovariate(rate))
                sent.append(asyncio.create_task(send(req)))
            await asyncio.gather(*sent)

        start = time.perf_counter()
        if load.rate is not None:
            await arrivals(load.rate)
        else:
            await asyncio.gather(*(worker() for _ in range(load.clients or 1)))
        wall = time.perf_counter() - start

    def stats(values: list[float]) -> dict[str, float]:
        return {
            "mean": statistics.fmean(values) if values else float("nan"),
            "p50": percentile(values, 50),
            "p90": percentile(values, 90),
            "p99": percentile(values, 99),
        }

    output_tokens = sum(t.output_tokens for t in timings)
    rate = None if load.rate is None else ("inf" if math.isinf(load.rate) else load.rate)  # JSON has no infinity
    return {
        "concurrency": load.clients,
        "request_rate": rate,
        "requests": len(timings),
        "wall_s": wall,
        "request_throughput": len(timings) / wall,
        "output_tps": output_tokens / wall,
        "ttft_s": stats([t.ttft for t in timings]),
        "tpot_s": stats([t.tpot for t in timings if t.tpot is not None]),
        "itl_s": stats([x for t in timings for x in t.itls]),
        "e2e_s": stats([t.e2e for t in timings]),
    }


def bench_serve(args: Any) -> dict[str, Any]:
    import httpx
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()["data"]
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise ValueError(f"no Ember/OpenAI server answering at {url}: {e}") from e
    vocab = args.vocab_size
    workload = load_workload(args.workload, vocab, None)
    levels = load_levels(args.concurrency, args.request_rate)
    results = []
    with Progress(transient=True, console=Console(stderr=True)) as progress:
        for load in levels:
            if not args.keep_prefix_cache:  # levels re-send the same prompts: start each one cold
                httpx.post(f"{url}/reset_prefix_cache", headers=headers, timeout=30)
            count = args.num_requests or default_num_requests(load)
            requests = [workload.requests[i % len(workload.requests)] for i in range(count)]
            results.append(asyncio.run(run_level(url, models[0]["id"], requests, load, headers, progress)))
    table = Table(title=f"serving {models[0]['id']} at {url} ({workload.name})")
    for column in (
        "load",
        "requests",
        "req/s",
        "out tok/s",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "TPOT p99",
        "ITL p50",
        "ITL p99",
        "E2E p50",
    ):
        table.add_column(column, justify="right")
    ms = lambda x: f"{x * 1000:.0f} ms"  # noqa: E731
    for load, r in zip(levels, results, strict=True):
        table.add_row(
            str(load),
            str(r["requests"]),
            f"{r['request_throughput']:.2f}",
            f"{r['output_tps']:.1f}",
            ms(r["ttft_s"]["p50"]),
            ms(r["ttft_s"]["p99"]),
            ms(r["tpot_s"]["p50"]),
            ms(r["tpot_s"]["p99"]),
            ms(r["itl_s"]["p50"]),
            ms(r["itl_s"]["p99"]),
            f"{r['e2e_s']['p50']:.1f} s",
        )
    Console(width=140).print(table)
    report = {
        "command": shlex.join(["ember", *args.argv]),
        "url": url,
        "workload": workload.name,
        "levels": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        from ember.bench.plots import latency_chart

        latency_chart(report, args.plot)
    return report


def load_levels(concurrency: str | None, request_rate: str | None) -> list[Load]:
    """The levels asked for: client counts (closed loop; 1, 8 and 32 when neither is given) or request rates."""
    if concurrency is not None and request_rate is not None:
        raise ValueError("give --concurrency or --request-rate, not both")
    if request_rate is None:
        text = concurrency or "1,8,32"
        try:
            counts = [int(c) for c in text.split(",")]
        except ValueError:
            counts = [0]
        if min(counts) < 1:
            raise ValueError(f"--concurrency takes positive numbers of clients, got {text!r}")
        return [Load(clients=count) for count in counts]
    rates = []
    for text in request_rate.split(","):
        try:
            rate = float(text)
        except ValueError:
            rate = math.nan
        if not rate > 0:  # NaN too
            raise ValueError(f"--request-rate takes positive numbers of requests per second or 'inf', got {text!r}")
        rates.append(Load(rate=rate))
    return rates


def default_num_requests(load: Load) -> int:
    """Twice the clients, or ten seconds of arrivals (32 requests for inf); at least 8."""
    if load.rate is not None:
        return 32 if math.isinf(load.rate) else max(8, round(10 * load.rate))
    return max(2 * (load.clients or 1), 8)


def add_serve_bench_args(parser: Any) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=None, help="API key, if the server requires one")
    parser.add_argument(
        "--concurrency", default=None, help="comma-separated client counts, each a closed loop (default 1,8,32)"
    )
    parser.add_argument(
        "--request-rate",
        default=None,
        metavar="RATES",
        help="comma-separated request rates (requests/s; 'inf': all at once), each an open loop of Poisson "
        "arrivals (seeded), instead of --concurrency",
    )
    parser.add_argument("--workload", default="random", help="'random' or a workload JSON (token-id prompts)")
    parser.add_argument(
        "--num-requests",
        type=positive_int,
        default=None,
        help="requests per level (default: twice the clients, or ten seconds of arrivals; at least 8)",
    )
    parser.add_argument(
        "--keep-prefix-cache",
        action="store_true",
        help="do not reset the server's prefix cache before each level (the default resets it, "
        "since levels re-send the same prompts)",
    )
    parser.add_argument("--vocab-size", type=int, default=49152, help="vocabulary for the random workload")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", default=None, metavar="PNG", help="write latency-vs-concurrency charts")
