"""`ember run-batch`: a file of OpenAI Batch API requests, answered offline by the server's own handlers.

Each input line is one request (`{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`);
each output line is its result in OpenAI's batch output format, in the input's order. The requests go through
the same FastAPI app as `ember serve` (in-process, no socket), all in flight together so that the engine batches
them: a result is exactly what the server would have answered. A bad line, or a request the server refuses,
gets its error in its output line and does not stop the others.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.server.serve import (
    REASONING_PARSERS,
    add_generation_config_arg,
    add_pooling_arg,
    add_tool_call_parser_arg,
    add_trust_request_chat_template_arg,
    resolve_pooling,
)

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/score", "/v1/rerank")


@dataclass
class BatchLine:
    """One input line: a request to send, or (`error` set) why it cannot be sent."""

    custom_id: str | None
    url: str = ""
    body: dict[str, Any] | None = None
    error: str | None = None


def parse_line(text: str, number: int) -> BatchLine:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as e:
        return BatchLine(None, error=f"line {number}: not valid JSON ({e})")
    if not isinstance(entry, dict):
        return BatchLine(None, error=f"line {number}: not a JSON object")
    custom_id = entry.get("custom_id")
    if not isinstance(custom_id, str):
        return BatchLine(None, error=f"line {number}: 'custom_id' must be a string")
    url, method, body = entry.get("url"), entry.get("method", "POST"), entry.get("body")
    if url not in URLS:
        return BatchLine(custom_id, error=f"line {number}: url {url!r} is not served (one of {', '.join(URLS)})")
    if method != "POST":
        return BatchLine(custom_id, error=f"line {number}: method {method!r} is not served (POST)")
    if not isinstance(body, dict):
        return BatchLine(custom_id, error=f"line {number}: 'body' must be a JSON object")
    if body.get("stream"):
        return BatchLine(custom_id, error=f"line {number}: a batch request cannot stream ('stream': true)")
    return BatchLine(custom_id, url, body)


def read_lines(path: str) -> list[BatchLine]:
    """The input file's requests ('-': standard input); blank lines are skipped."""
    if path == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"cannot read the input file {path!r}: {e.strerror or e}") from e
    lines = [parse_line(line, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"the input file {path!r} holds no request")
    return lines


def output_record(line: BatchLine, status: int | None = None, body: Any = None) -> dict[str, Any]:
    """OpenAI's batch output line: the server's answer in `response` (its error body too, for a 4xx), or, for a
    line that could not be sent, `error`."""
    record: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id}
    if status is None:
        return {**record, "response": None, "error": {"code": "invalid_request", "message": line.error}}
    request_id = body.get("id") if isinstance(body, dict) else None
    return {**record, "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}


async def answer_all(app: Any, lines: list[BatchLine], concurrency: int, progress: Any, task: Any) -> list[dict]:
    """Send every sendable line to `app`, at most `concurrency` at once; the records in the lines' order."""
    import httpx

    limit = asyncio.Semaphore(concurrency)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ember-batch", timeout=None) as client:

        async def answer(line: BatchLine) -> dict[str, Any]:
            if line.error is not None:
                record = output_record(line)
            else:
                async with limit:
                    response = await client.post(line.url, json=line.body)
                try:
                    body = response.json()
                except ValueError:
                    body = {"error": {"message": response.text, "type": "server_error"}}
                record = output_record(line, response.status_code, body)
            progress.advance(task)
            return record

        return await asyncio.gather(*(answer(line) for line in lines))


def completion_tokens(record: dict[str, Any]) -> int:
    response = record.get("response") or {}
    usage = (response.get("body") or {}).get("usage") or {}
    return int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)


def run_batch(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ember.cli import load_llm
    from ember.engine.async_engine import AsyncEngine
    from ember.server.app import OpenAIServer, build_app
    from ember.server.chat import load_chat_template
    from ember.server.metrics import EngineMetrics

    lines = read_lines(args.input_file)  # before the model loads: a bad file is reported at once
    chat_template = load_chat_template(args.chat_template) if args.chat_template else None
    sendable = sum(line.error is None for line in lines)
    async_engine = AsyncEngine(lambda: load_llm(args).engine, max_waiting=max(sendable, 1))
    try:
        engine = async_engine.engine
        name = args.served_model_name or engine.loaded.name
        metrics = EngineMetrics(engine, name)
        async_engine.on_finished, async_engine.on_step = metrics.on_finished, metrics.on_step
        reasoning = REASONING_PARSERS[args.reasoning_parser]
        pooling = resolve_pooling(args.pooling, engine.loaded.source_dir)
        server = OpenAIServer(
            async_engine,
            name,
            metrics,
            None,
            chat_template,
            None,
            reasoning,
            tool_call_parser=args.tool_call_parser,
            pooling=pooling,
            generation_config=args.generation_config,
            trust_request_chat_template=args.trust_request_chat_template,
        )
        concurrency = 2 * (engine.config.scheduler.max_num_seqs or 1)  # keeps the engine's batch full
        columns = (TextColumn("requests"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        started = time.monotonic()
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("requests", total=len(lines))
            records = asyncio.run(answer_all(build_app(server), lines, concurrency, progress, task))
        wall = time.monotonic() - started
    finally:
        async_engine.shutdown()
    text = "".join(json.dumps(record) + "\n" for record in records)
    if args.output_file == "-":
        sys.stdout.write(text)
    else:
        Path(args.output_file).write_text(text)
    answered = sum(1 for r in records if r["response"] and r["response"]["status_code"] == 200)
    tokens = sum(map(completion_tokens, records))
    print(
        f"{len(records)} requests: {answered} answered, {len(records) - answered} failed; {tokens} output tokens in "
        f"{wall:.1f} s ({tokens / wall:.1f} tok/s); results in {args.output_file}",
        file=sys.stderr,
    )
    return 0 if answered == len(records) else 1


def add_run_batch_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("batch")
    g.add_argument(
        "-i",
        "--input-file",
        required=True,
        help="JSONL of OpenAI Batch API requests (custom_id, method POST, url /v1/chat/completions, /v1/completions, "
        "/v1/responses, /v1/embeddings, /v1/score or /v1/rerank, body); '-' reads standard input",
    )
    g.add_argument(
        "-o", "--output-file", required=True, help="where the results go, one JSONL line per request ('-': stdout)"
    )
    g.add_argument("--served-model-name", default=None, help="the model name the requests send (default: the model's)")
    g.add_argument(
        "--chat-template", default=None, metavar="FILE_OR_TEMPLATE", help="a Jinja chat template instead of the model's"
    )
    add_trust_request_chat_template_arg(g)
    g.add_argument(
        "--reasoning-parser",
        default="auto",
        choices=sorted(REASONING_PARSERS),
        help="as `ember serve --reasoning-parser`",
    )
    add_tool_call_parser_arg(g)
    add_generation_config_arg(g)
    add_pooling_arg(g)
