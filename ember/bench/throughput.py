"""`ember bench throughput`: Ember and its baselines on the same workload, weights and machine, in one run."""

from __future__ import annotations

import json
import platform
import shlex
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ember.bench.workloads import BenchRequest, Workload, load_workload, positive_int
from ember.engine.sampling_params import SamplingParams


@dataclass
class RunResult:
    name: str
    dtype: str
    num_requests: int  # requests actually run (a baseline may run a prefix of the workload)
    prompt_tokens: int
    output_tokens: int
    wall_s: float

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tps(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_s


def run_ember(llm: Any, requests: list[BenchRequest], dtype: str) -> RunResult:
    prompts = [r.prompt_ids for r in requests]
    params = [SamplingParams(max_tokens=r.max_new_tokens, temperature=0, ignore_eos=True) for r in requests]
    llm.generate(prompts[:2], params[:2])  # warm-up: first-call allocations and kernel selection
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    wall = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    expected = sum(r.max_new_tokens for r in requests)
    if produced != expected:
        raise RuntimeError(f"Ember produced {produced} output tokens, the workload asks for {expected}")
    return RunResult("ember", dtype, len(requests), sum(len(p) for p in prompts), produced, wall)


def run_baseline(name: str, model: Any, requests: list[BenchRequest], dtype: str) -> RunResult:
    from rich.progress import Progress

    from ember.bench.baselines import BASELINES

    with Progress(transient=True) as progress:
        task = progress.add_task(name, total=len(requests))
        wall = BASELINES[name](model, requests, lambda n: progress.advance(task, n))
    prompt_tokens = sum(len(r.prompt_ids) for r in requests)
    return RunResult(name, dtype, len(requests), prompt_tokens, sum(r.max_new_tokens for r in requests), wall)


def results_table(workload: Workload, results: list[RunResult]) -> Any:
    from rich.table import Table

    ember = results[0]  # ratios are Ember's first run over each baseline
    table = Table(title=f"throughput on {workload.name} ({len(workload.requests)} requests)")
    for column in (
        "engine",
        "dtype",
        "requests",
        "prompt tok",
        "output tok",
        "wall s",
        "output tok/s",
        "total tok/s",
        "ember ×",
    ):
        table.add_column(column, justify="right" if column not in ("engine", "dtype") else "left")
    for r in results:
        ratio = "" if r.name == "ember" else f"{ember.output_tps / r.output_tps:.1f}×"
        runs = f"{r.num_requests}" + ("" if r.num_requests == len(workload.requests) else " (prefix)")
        table.add_row(
            r.name,
            r.dtype,
            runs,
            str(r.prompt_tokens),
            str(r.output_tokens),
            f"{r.wall_s:.1f}",
            f"{r.output_tps:.1f}",
            f"{r.total_tps:.1f}",
            ratio,
        )
    return table


def bench_throughput(args: Any) -> dict[str, Any]:
    import torch
    from rich.console import Console

    from ember.bench.baselines import load_hf_model
    from ember.cli import load_llm
    from ember.config import DTYPES

    console = Console(stderr=True)
    results: list[RunResult] = []
    for dtype_arg in args.dtypes.split(","):
        if dtype_arg not in ("auto", *DTYPES):
            raise ValueError(f"unknown dtype {dtype_arg!r}; choose from auto, {', '.join(DTYPES)}")
        args.dtype = dtype_arg
        llm = load_llm(args)
        engine = llm.engine
        dtype = str(engine.config.torch_dtype()).removeprefix("torch.")
        workload = load_workload(args.workload, engine.model_config.vocab_size, args.num_requests)
        if not results:
            console.print(
                f"workload {workload.name}: {len(workload.requests)} requests, {workload.prompt_tokens} prompt "
                f"and {workload.output_tokens} output tokens"
            )
        results.append(run_ember(llm, workload.requests, dtype))
        console.print(f"ember ({dtype}): {results[-1].output_tps:.1f} output tok/s")
        del llm
    baselines = [b for b in args.baseline.split(",") if b]
    if baselines:
        source = engine.loaded.source_dir
        if source is None:
            raise ValueError("baselines need real weights (not --load-format dummy)")
        hf_dtype = torch.float32 if args.baseline_dtype == "float32" else torch.bfloat16
        model = load_hf_model(source, hf_dtype)
        for name in baselines:
            count = min(args.baseline_requests, len(workload.requests))
            result = run_baseline(name, model, workload.requests[:count], args.baseline_dtype)
            console.print(f"{name}: {result.output_tps:.1f} output tok/s (first {count} requests)")
            results.append(result)
    Console(width=120).print(results_table(workload, results))
    report = {
        "command": shlex.join(["ember", *args.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "workload": {
            "name": workload.name,
            "requests": len(workload.requests),
            "prompt_tokens": workload.prompt_tokens,
            "output_tokens": workload.output_tokens,
        },
        "results": [{**asdict(r), "output_tps": r.output_tps, "total_tps": r.total_tps} for r in results],
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        console.print(f"wrote {args.json}")
    if args.plot:
        from ember.bench.plots import throughput_chart

        throughput_chart(report, args.plot)
        console.print(f"wrote {args.plot}")
    return report


def add_throughput_args(parser: Any) -> None:
    parser.add_argument(
        "--workload",
        default="random",
        help="'random' (cpu-64's shape, random ids) or a workload JSON such as shared/workloads/cpu-64.json",
    )
    parser.add_argument("--num-requests", type=positive_int, default=None, help="run only the first N requests")
    parser.add_argument(
        "--baseline",
        default="hf-naive",
        help="comma-separated baselines: hf-naive, hf-static ('' for none; default hf-naive)",
    )
    parser.add_argument(
        "--baseline-requests",
        type=int,
        default=8,
        help="baselines run this prefix of the workload and report its tok/s (default 8)",
    )
    parser.add_argument(
        "--baseline-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="dtype of the HF baselines (default float32, HF's own default)",
    )
    parser.add_argument(
        "--dtypes",
        default="auto",
        help="comma-separated Ember dtypes to run, e.g. bfloat16,float32 (default auto: the fast path)",
    )
    parser.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    parser.add_argument("--plot", default=None, metavar="PNG", help="write a bar chart of output tok/s")
