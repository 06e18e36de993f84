"""The GPU throughput benchmark: Ember, HF transformers continuous batching and HF naive `generate`, in one
process on one GPU, on the GPU workload of shared/workloads/README.md (256 requests, Qwen3-0.6B shape,
random bf16 weights, EOS ignored). Prints one table and writes results.json.

Imports only torch, triton, transformers and Ember itself (from this checkout): the GPU machine can
install nothing. Without a GPU it runs a tiny Qwen3 shape on the CPU, to check the script end to end.

Usage: python benchmarks/gpu/bench.py [--results DIR] [--hf-cb-seconds 150] [--naive-requests 4]
       [--variants default,sync,eager,fp8kv]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ember.models.loader import DUMMY_PRESETS  # noqa: E402

QWEN3_06B = {**DUMMY_PRESETS["qwen3-0.6b"], "model_type": "qwen3"}
TINY = {**QWEN3_06B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512}  # fmt: skip


def gpu_workload(vocab: int, num_requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int]) -> list:
    """Exactly the generator of shared/workloads/README.md (for the full shape)."""
    random.seed(0)
    requests = []
    for _ in range(num_requests):
        prompt = [random.randint(0, vocab - 1) for _ in range(random.randint(*prompt_len))]
        requests.append((prompt, random.randint(*output_len)))
    return requests


# Ember configurations: label -> engine keyword arguments
VARIANTS = {
    "default": ("ember", {}),  # CUDA graphs, async scheduling
    "sync": ("ember (no async scheduling)", {"async_scheduling": False}),
    "eager": ("ember (eager)", {"enforce_eager": True}),
    "block32": ("ember (block size 32)", {"block_size": 32}),  # kernel_times.py times decode at these block sizes
    "block64": ("ember (block size 64)", {"block_size": 64}),
    "fp8kv": ("ember (fp8 KV cache)", {"kv_cache_dtype": "fp8"}),  # half the KV bytes to read
    # the attention kernels on `AttentionTuning`'s defaults, not a tuning file's options: what the tuning gave
    "untuned": ("ember (default launch options)", {}),
}


def run_ember(config_dir: Path, requests: list, device: str, variant: str = "default") -> dict[str, Any]:
    from ember.kernels.attention_tuning import DEFAULT, launching_with

    with launching_with(DEFAULT) if variant == "untuned" else contextlib.nullcontext():
        return run_ember_engine(config_dir, requests, device, variant)


def run_ember_engine(config_dir: Path, requests: list, device: str, variant: str) -> dict[str, Any]:
    from ember.engine.engine import LLM
    from ember.engine.sampling_params import SamplingParams

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    llm = LLM(
        str(config_dir), load_format="dummy", dtype="bfloat16", device=device, max_num_seqs=256,
        max_num_batched_tokens=8192, enable_prefix_caching=False, max_model_len=2048, **VARIANTS[variant][1],
    )  # fmt: skip
    startup = time.perf_counter() - start
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in requests]
    prompts = [p for p, _ in requests]
    # warm-up: Triton compiles the prefill and sampling kernels here (graph capture compiled decode's); a few tokens
    # do, not the requests' hundreds (~1,000 steps at ~1.5 ms before each run)
    llm.generate(prompts[:2], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    sync(device)
    timeline = StepTimeline(llm.engine)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    sync(device)
    wall = time.perf_counter() - start
    timeline.stop()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    engine = llm.engine  # what the run used: cache size, steps replayed from graphs or overlapped, memory
    stats: dict[str, Any] = {"kv_blocks": engine.kv_cache.num_blocks, "overlapped_steps": engine.num_overlapped_steps}
    if engine.runner.decode_graphs is not None:
        stats["graph_replays"] = sum(engine.runner.decode_graphs.replays.values())
    if device == "cuda":
        from ember.kernels.attention_tuning import tuning_for

        stats["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        cache_dtype = engine.runner.kv_cache.dtype
        stats["attention_options"] = dataclasses.asdict(tuning_for(torch.device(device), cache_dtype))
    return {"engine": VARIANTS[variant][0], "requests": len(requests), "output_tokens": tokens, "wall_s": wall,
            "startup_s": startup, "steps": timeline.summary(), **stats}  # fmt: skip


# decode steps grouped by rows: upper bounds of the groups
DECODE_ROWS = (8, 32, 64, 128, 192, 256)


class StepTimeline:
    """Where an Ember run's time goes, step by step: the wall time of each `engine.step` call and what the step
    it ran (or launched, under async scheduling: the step behind the one it read back, the same requests one token
    further in steady state) held: rows and prompt tokens. Steps with prompt tokens are one group, decode-only
    steps are grouped by rows. Wraps the engine's `step` and its runner's `execute` and `launch` for one run."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.runner = engine, engine.runner
        self.steps: list[tuple[float, int, int]] = []  # (seconds, rows, prompt tokens)
        self.rows = self.prompt_tokens = 0
        for name in ("execute", "launch"):
            setattr(self.runner, name, self._noting(getattr(self.runner, name)))
        step = engine.step

        def timed_step() -> Any:
            begin = time.perf_counter()
            outputs = step()
            self.steps.append((time.perf_counter() - begin, self.rows, self.prompt_tokens))
            self.prompt_tokens = 0  # a call that runs nothing new counts none again
            return outputs

        engine.step = timed_step

    def _noting(self, run: Callable[..., Any]) -> Callable[..., Any]:
        def noted(scheduled: list[Any], *args: Any) -> Any:
            self.rows = len(scheduled)
            self.prompt_tokens = sum(s.num_tokens for s in scheduled if not s.is_decode)
            return run(scheduled, *args)

        return noted

    def stop(self) -> None:
        """Unwrap: the engine's and runner's own methods again."""
        vars(self.engine).pop("step", None)
        for name in ("execute", "launch"):
            vars(self.runner).pop(name, None)

    def summary(self) -> list[dict[str, Any]]:
        """One row per group: steps, seconds, ms per step, mean rows, prompt tokens."""
        groups: dict[int, list[tuple[float, int, int]]] = {}  # by the group's row bound (0: steps with prompts)
        for seconds, rows, prompt in self.steps:
            bound = 0 if prompt else next((b for b in DECODE_ROWS if rows <= b), rows)
            groups.setdefault(bound, []).append((seconds, rows, prompt))
        summary = []
        for bound, group in sorted(groups.items()):
            seconds = sum(g[0] for g in group)
            summary.append({
                "steps": f"decode, up to {bound} rows" if bound else "with prompt tokens", "count": len(group),
                "seconds": seconds, "ms_per_step": 1e3 * seconds / len(group),
                "mean_rows": sum(g[1] for g in group) / len(group), "prompt_tokens": sum(g[2] for g in group),
            })  # fmt: skip
        return summary


def defaults(device: str) -> dict[str, Any]:
    """The tunables the run used (the attention kernels' launch options, sampler paths): what a later run's figures
    compare with. The attention options come from a tuning file where one applies (`attention_tuning`)."""
    from ember.engine import sampler
    from ember.kernels import triton_sampling
    from ember.kernels.attention_tuning import FLOAT8_OPTIONS, tuning_for

    names = {triton_sampling: ("BLOCK", "NUM_WARPS", "UNROLL", "RACE_BLOCK"), sampler: ("RACE_UNSEEDED_ROWS",)}
    float8 = tuning_for(torch.device(device), torch.float8_e4m3fn)
    tunables = {f"attention.{k}": v for k, v in dataclasses.asdict(tuning_for(torch.device(device))).items()}
    tunables.update({f"attention_fp8.{name}": getattr(float8, name) for name in FLOAT8_OPTIONS})
    for module, group in names.items():
        tunables.update({f"{module.__name__.rpartition('.')[2]}.{name}": getattr(module, name) for name in group})
    return tunables


def print_steps(run: dict[str, Any]) -> None:
    """The run's steps by group (`StepTimeline`)."""
    total = sum(group["seconds"] for group in run["steps"]) or 1.0
    print(f"\n{run['engine']}: {sum(g['count'] for g in run['steps'])} steps")
    print(
        f"  {'steps':28s} {'count':>6s} {'seconds':>8s} {'share':>6s} {'ms/step':>8s} {'rows':>6s} {'prompt tok':>11s}"
    )
    for g in run["steps"]:
        print(f"  {g['steps']:28s} {g['count']:6d} {g['seconds']:8.2f} {100 * g['seconds'] / total:5.0f}% "
              f"{g['ms_per_step']:8.2f} {g['mean_rows']:6.0f} {g['prompt_tokens']:11d}")  # fmt: skip


def hf_model(config: dict[str, Any], device: str) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).to(device).eval()


def run_hf_continuous_batching(model: Any, requests: list, device: str, seconds: float) -> dict[str, Any]:
    from transformers import GenerationConfig

    generation = GenerationConfig(do_sample=False, max_new_tokens=max(n for _, n in requests), eos_token_id=None)
    # Transformers 5.17 runs plain "sdpa" on the paged cache with a mask over the whole cache and fails (seen on
    # an H200: "expanded size 169 must match 160616"); "paged|sdpa" reads the cache (later versions drop the
    # prefix themselves).
    model.set_attn_implementation("paged|sdpa")
    manager = model.init_continuous_batching(generation_config=generation, **cpu_cache_limit(device))
    manager.start()
    start = time.perf_counter()
    for i, (prompt, n) in enumerate(requests):
        manager.add_request(prompt, request_id=str(i), max_new_tokens=n)
    tokens = finished = 0
    while finished < len(requests) and time.perf_counter() - start < seconds:
        result = manager.get_result(timeout=1.0)
        if result is not None:
            finished += 1
            tokens += len(result.generated_tokens)
    sync(device)
    wall = time.perf_counter() - start
    in_flight = in_flight_tokens(manager)
    manager.stop(block=True, timeout=10)  # its thread outlived 30 s of waiting on an H200: no use waiting long
    # HF's rate is every token it generated in its time, as for HF naive: counting finished requests only would
    # leave out the long ones it had nearly done and inflate Ember's ratio (22.5 vs 832.5 tok/s on an H200)
    note = f"{finished} of {len(requests)} requests finished within {seconds:g} s"
    if in_flight is None:
        note += (
            "; tokens of unfinished requests unknown (this transformers lays its scheduler out otherwise): a low rate"
        )
    elif in_flight:
        note += (
            f"; the table counts the {in_flight} tokens of unfinished requests too ({tokens / wall:.1f} tok/s without)"
        )
    return {"engine": "hf-continuous-batching", "requests": len(requests), "output_tokens": tokens + (in_flight or 0),
            "wall_s": wall, "finished_requests": finished, "finished_tokens": tokens, "note": note}  # fmt: skip


def in_flight_tokens(manager: Any) -> int | None:
    """Tokens generated so far by HF's unfinished requests (read from its scheduler, which transformers does
    not document: None where this version lays it out otherwise)."""
    for _ in range(3):  # its generation thread may change the dict while we read it
        try:
            states = list(manager.batch_processor.scheduler.active_requests.values())
            return sum(len(state.generated_tokens) for state in states)
        except RuntimeError:
            continue
        except AttributeError:
            return None
    return None


def cpu_cache_limit(device: str) -> dict[str, Any]:
    """On the CPU fallback, a small HF cache: by default HF sizes it from free memory (14 GB on a CI machine)."""
    if device == "cuda":
        return {}
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:  # older transformers: no separate config, default sizing
        return {}
    return {"continuous_batching_config": ContinuousBatchingConfig(num_blocks=64)}


def run_hf_naive(model: Any, requests: list, device: str, seconds: float) -> dict[str, Any]:
    """One request at a time; `generate` stops at its `max_time` once the time budget is spent."""
    tokens, start = 0, time.perf_counter()
    finished = 0
    for prompt, n in requests:
        left = seconds - (time.perf_counter() - start)
        if left <= 0:
            break
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            out = model.generate(
                ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, max_time=left
            )
        tokens += out.shape[1] - len(prompt)
        finished += out.shape[1] - len(prompt) == n
    sync(device)
    return {"engine": "hf-naive", "requests": len(requests), "output_tokens": tokens,
            "wall_s": time.perf_counter() - start,
            "note": f"{finished} of {len(requests)} requests finished within {seconds:g} s"}  # fmt: skip


def attempt(engine: str, job: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one engine; a failure is reported in the table instead of losing the runs after it."""
    try:
        run = job()
    except Exception as error:  # a GPU run is one shot: keep going, report it
        traceback.print_exc()
        return {"engine": engine, "error": f"{type(error).__name__}: {error}"}
    finally:  # free the engine, failed or not: the next one sizes its KV cache from the memory free then
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"{engine} done: {run['output_tokens'] / run['wall_s']:.1f} output tok/s", flush=True)
    return run


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.environ.get("EMBER_RESULTS_DIR", "benchmarks/gpu/results"))
    parser.add_argument("--hf-cb-seconds", type=float, default=150.0, help="time budget of HF continuous batching")
    parser.add_argument("--naive-requests", type=int, default=4, help="HF naive runs this many requests")
    parser.add_argument("--naive-seconds", type=float, default=200.0, help="time budget of HF naive")
    parser.add_argument(
        "--variants",
        default="default",
        help="Ember configurations to run, in order: default (CUDA graphs and async scheduling), sync (no async "
        "scheduling), eager (no CUDA graphs), block32, block64 (KV block sizes), fp8kv (a float8 KV cache), "
        "untuned (the attention kernels on their default launch options, not a tuning file's); ratios are against "
        "the first (default: default)",
    )
    parser.add_argument("--skip-hf", action="store_true", help="run Ember only")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = QWEN3_06B if device == "cuda" else TINY
    if device == "cuda":
        requests = gpu_workload(config["vocab_size"], 256, (100, 1024), (100, 1024))
        card = torch.cuda.get_device_name()
    else:  # CPU fallback: the same code paths at a tiny shape
        requests = gpu_workload(config["vocab_size"], 16, (8, 64), (8, 32))
        card = f"CPU fallback ({platform.processor() or platform.machine()}), tiny Qwen3 shape"
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    config_dir = Path(tempfile.mkdtemp(prefix="ember-gpu-bench-"))  # the dummy model's config.json
    (config_dir / "config.json").write_text(json.dumps(config))
    print(f"device: {card}; {len(requests)} requests, {sum(len(p) for p, _ in requests)} prompt tokens, "
          f"{sum(n for _, n in requests)} output tokens", flush=True)  # fmt: skip
    if device == "cuda":
        from ember.kernels.attention_tuning import tuning_file

        print(f"attention kernels' launch options: {tuning_file(torch.device(device)) or 'the defaults'}")
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    jobs: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        (VARIANTS[v][0], lambda v=v: run_ember(config_dir, requests, device, v)) for v in variants
    ]
    if not args.skip_hf:
        model: list[Any] = []  # built once, on first use

        def hf() -> Any:
            model[:] = model or [hf_model(config, device)]
            return model[0]

        # naive first: HF's continuous-batching thread can outlive its stop (seen with transformers 5.17) and
        # would share the GPU with whatever runs after it
        jobs.append(("hf-naive", lambda: run_hf_naive(hf(), requests[: args.naive_requests], device, args.naive_seconds)))  # noqa: E501  # fmt: skip
        jobs.append(("hf-continuous-batching", lambda: run_hf_continuous_batching(hf(), requests, device, args.hf_cb_seconds)))  # noqa: E501  # fmt: skip
    try:
        runs = [attempt(name, job) for name, job in jobs]
    finally:
        shutil.rmtree(config_dir, ignore_errors=True)
    done = [run for run in runs if "error" not in run]
    base = runs[0] if "error" not in runs[0] else None  # the first Ember configuration: the ratios' numerator
    ember_tps = base["output_tokens"] / base["wall_s"] if base else None
    print(f"\n{'engine':28s} {'requests':>9s} {'output tok':>11s} {'wall s':>8s} {'output tok/s':>13s} {'ember x':>8s}")
    for run in runs:
        if "error" in run:
            print(f"{run['engine']:28s} failed: {run['error']}")
            continue
        run["output_tps"] = run["output_tokens"] / run["wall_s"]
        ratio = "" if run is base or ember_tps is None else f"{ember_tps / run['output_tps']:.1f}x"
        print(f"{run['engine']:28s} {run['requests']:9d} {run['output_tokens']:11d} {run['wall_s']:8.1f} "
              f"{run['output_tps']:13.1f} {ratio:>8s}")  # fmt: skip
    for run in done:
        if "note" in run:
            print(f"{run['engine']}: {run['note']}")
    for run in done:
        if "steps" in run:
            print_steps(run)
    report = {"device": card, "torch": torch.__version__, "shape": config, "runs": runs, "defaults": defaults(device)}
    (results_dir / "results.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {results_dir / 'results.json'}")
    if len(done) < len(runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
