"""`ember bench latency`: per-token latency with and without speculative decoding, in the same run.

With `--prediction`, the run "with" drafts from each request's predicted output (OpenAI's `prediction`: the
code or JSON the request quotes and asks to be changed) instead of a proposer.

Requests run closed-loop at a fixed concurrency (batch size): each finished request is replaced by the
next one of the workload. The engine is loaded once; the run without speculation and the run with it
use the same weights and a freshly reset prefix cache and proposer. Per-token latency is each request's
(last token time - first token time) / (tokens - 1), averaged over requests (TPOT); with speculation,
tokens arrive in bursts and TPOT counts that fairly.
"""

from __future__ import annotations

import json
import shlex
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.bench.repetitive import repetitive_workload
from ember.bench.workloads import BenchRequest, Workload, load_workload, positive_int
from ember.engine.sampling_params import SamplingParams


@dataclass
class Timing:
    submitted: float
    first: float | None = None
    last: float = 0.0
    tokens: int = 0


def run_closed_loop(
    llm: Any,
    requests: list[BenchRequest],
    concurrency: int,
    ignore_eos: bool,
    predicted: bool = False,
    adapters: list[str | None] | None = None,
) -> dict[str, Any]:
    """Run `requests` greedily, `concurrency` at a time; `predicted`: each sends its predicted output;
    `adapters`: the LoRA adapters the requests take in turn."""
    engine = llm.engine
    pending = list(requests)
    timings: dict[str, Timing] = {}
    in_flight = 0
    start = time.perf_counter()
    while pending or in_flight:
        while pending and in_flight < concurrency:
            request = pending.pop(0)
            prediction = request.prediction if predicted else None
            params = SamplingParams(
                max_tokens=request.max_new_tokens, temperature=0, ignore_eos=ignore_eos, prediction=prediction
            )
            lora = adapters[len(timings) % len(adapters)] if adapters else None
            timings[engine.add_request(request.prompt_ids, params, lora=lora)] = Timing(time.perf_counter())
            in_flight += 1
        for out in engine.step():
            now, timing = time.perf_counter(), timings[out.request_id]
            new = sum(len(o.token_ids) for o in out.outputs)
            if new:
                timing.first = timing.first or now
                timing.last, timing.tokens = now, timing.tokens + new
            in_flight -= out.finished
    wall = time.perf_counter() - start
    tpots = [(t.last - t.first) / (t.tokens - 1) for t in timings.values() if t.first is not None and t.tokens > 1]
    tokens = sum(t.tokens for t in timings.values())
    return {
        "requests": len(requests),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tps": tokens / wall,
        "mean_tpot_ms": 1000 * statistics.fmean(tpots) if tpots else None,
        "mean_e2e_s": statistics.fmean(t.last - t.submitted for t in timings.values()),
    }


def bench_workload(args: Any, llm: Any) -> tuple[Workload, bool]:
    """The workload and whether to ignore EOS (token-id workloads fix their output lengths)."""
    engine = llm.engine
    if args.workload == "repetitive":
        return repetitive_workload(engine.tokenizer, args.num_requests or 16, args.workload_seed), False
    return load_workload(args.workload, engine.model_config.vocab_size, args.num_requests), True


def bench_latency(args: Any) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    from ember.cli import load_llm, speculative_method
    from ember.spec.speculator import SpecStats, build_proposer

    speculative = speculative_method(args)
    if (speculative is None) == (not args.prediction):
        raise ValueError(
            "ember bench latency compares plain decoding with speculation: pass --speculative ngram|suffix|draft:M, "
            "or --prediction (drafts from predicted outputs)"
        )
    if args.prediction and args.workload != "repetitive":
        raise ValueError(f"--prediction needs the predicted outputs of --workload repetitive, not {args.workload!r}")
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    llm = load_llm(args)
    engine = llm.engine
    speculator = engine.speculator
    workload, ignore_eos = bench_workload(args, llm)
    method = "prediction" if args.prediction else speculative
    console = Console(stderr=True)
    console.print(
        f"workload {workload.name}: {len(workload.requests)} requests, {workload.prompt_tokens} prompt tokens, "
        f"up to {workload.output_tokens} output tokens; speculative {method}"
    )
    warmup = workload.requests[:1]
    runs = []
    for batch in batch_sizes:
        for speculate in (False, True):
            speculator.enabled = speculate
            if speculative is not None:
                speculator.proposer = build_proposer(
                    speculator.config,
                    engine.model_config.vocab_size,
                    engine.kv_cache.num_blocks,
                    engine.kv_cache.block_size,
                    engine.config.device,
                    engine.config.torch_dtype(),
                    getattr(speculator.proposer, "loaded", None),  # a draft model is reused, its KV cache is not
                )  # fresh: nothing learned from an earlier run
            speculator.stats = SpecStats()
            engine.reset_prefix_cache()
            predicted = speculate and args.prediction
            run_closed_loop(llm, warmup, 1, ignore_eos, predicted)
            speculator.stats = SpecStats()
            with console.status(f"batch {batch}, speculation {'on' if speculate else 'off'} ..."):
                result = run_closed_loop(llm, workload.requests, batch, ignore_eos, predicted)
            stats = speculator.stats
            result.update(
                batch=batch,
                speculative=method if speculate else None,
                acceptance_rate=stats.acceptance_rate if speculate else None,
                mean_accepted_length=stats.mean_accepted_length if speculate else None,
                draft_tokens=stats.num_draft_tokens,
            )
            runs.append(result)
    table = Table(title=f"ember bench latency: {workload.name}, {engine.loaded.name}")
    for column in (
        "batch",
        "speculation",
        "mean TPOT ms",
        "TPOT ratio",
        "output tok/s",
        "accept rate",
        "mean acc. len",
    ):
        table.add_column(column, justify="right")
    for off, on in zip(runs[::2], runs[1::2], strict=True):
        for run in (off, on):
            ratio = off["mean_tpot_ms"] / run["mean_tpot_ms"] if run["mean_tpot_ms"] else float("nan")
            table.add_row(
                str(run["batch"]),
                run["speculative"] or "off",
                f"{run['mean_tpot_ms']:.1f}",
                f"{ratio:.2f}x" if run is on else "-",
                f"{run['output_tps']:.1f}",
                "-" if run["acceptance_rate"] is None else f"{run['acceptance_rate']:.2f}",
                "-" if run["mean_accepted_length"] is None else f"{run['mean_accepted_length']:.2f}",
            )
    Console().print(table)
    report = {
        "workload": workload.name,
        "model": engine.loaded.name,
        "num_speculative_tokens": speculator.config.num_speculative_tokens,
        "runs": runs,
    }
    return save_report(args, report)


def save_report(args: Any, report: dict[str, Any]) -> dict[str, Any]:
    """The report with the command that made it first; written as JSON to `--json` when given."""
    report = {"command": "ember " + shlex.join(getattr(args, "argv", [])), **report}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def parse_batch_sizes(text: str) -> list[int]:
    """`--batch-sizes`: comma-separated positive integers."""
    try:
        sizes = [int(b) for b in text.split(",") if b]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive integers, got {text!r}")
    return sizes


def add_batch_sizes_arg(group: Any) -> None:
    group.add_argument("--batch-sizes", default="1,32", help="comma-separated concurrency levels (default 1,32)")


def add_latency_args(parser: Any) -> None:
    g = parser.add_argument_group("latency benchmark")
    g.add_argument(
        "--workload",
        default="repetitive",
        help="'repetitive' (generated code-rewrite and JSON-echo chats, default), 'random', or a workload JSON",
    )
    add_batch_sizes_arg(g)
    g.add_argument(
        "--num-requests", type=positive_int, default=None, help="requests to run (default: 16, or the whole file)"
    )
    g.add_argument("--workload-seed", type=int, default=0, help="seed of the generated repetitive workload")
    g.add_argument(
        "--prediction",
        action="store_true",
        help="compare plain decoding with drafting from each request's predicted output (OpenAI's 'prediction': "
        "the code or JSON the repetitive workload's requests quote), instead of --speculative",
    )
    g.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
