"""Where an engine step's time goes on cpu-64: wraps each stage in a wall-clock timer and runs the workload.

Usage: .venv/bin/python benchmarks/step_breakdown.py [--workload FILE] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ember.attention.torch_paged as attention
import ember.engine.model_runner as runner_module
import ember.models.llama as llama
from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams

totals: collections.defaultdict[str, float] = collections.defaultdict(float)


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", default="../shared/workloads/cpu-64.json")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    attention.attend_decodes = timed("decode attention", attention.attend_decodes)
    attention.prefill_attention = timed("prefill attention", attention.prefill_attention)
    attention.write_kv = timed("KV-cache writes (prefill tokens)", attention.write_kv)
    runner_module.sample = timed("sampling", runner_module.sample)
    llama.MLP.forward = timed("MLP", llama.MLP.forward)
    llama.rotary_ = timed("rotary", llama.rotary_)
    llama.RMSNorm.forward = timed("RMSNorm", llama.RMSNorm.forward)
    llama.RMSNorm.add_and_norm = timed("RMSNorm", llama.RMSNorm.add_and_norm)
    requests = json.loads(Path(args.workload).read_text())["requests"]
    llm = LLM(dtype=args.dtype)
    engine = llm.engine
    engine.runner.model.forward = timed("model forward (all)", engine.runner.model.forward)
    engine.scheduler.schedule = timed("scheduling", engine.scheduler.schedule)
    prompts = [r["prompt_ids"] for r in requests]
    params = [SamplingParams(max_tokens=r["max_new_tokens"], temperature=0, ignore_eos=True) for r in requests]
    llm.generate(prompts[:2], params[:2])
    totals.clear()
    steps = 0
    step = engine.step

    def counted_step() -> Any:
        nonlocal steps
        steps += 1
        return step()

    engine.step = timed("engine step (all)", counted_step)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"{tokens} output tokens in {wall:.1f} s = {tokens / wall:.1f} tok/s, {steps} steps")
    for name, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"{name:22s} {seconds:6.2f} s  {1000 * seconds / steps:7.2f} ms/step")


if __name__ == "__main__":
    main()
