"""Ember's output tok/s on cpu-64 when sampling at a temperature (greedy at 0): what the sampler costs end to
end. Each request has its own seed. Warm-up excluded; one engine; run from the repository root.

An A/B of two checkouts: `PYTHONPATH=<checkout> .venv/bin/python benchmarks/cpu/sampled_throughput.py 1.0`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("temperature", type=float, help="0 for greedy")
    parser.add_argument("--workload", default="../shared/workloads/cpu-64.json")
    args = parser.parse_args()
    requests = json.loads(Path(args.workload).read_text())["requests"]
    prompts = [r["prompt_ids"] for r in requests]
    params = [
        SamplingParams(max_tokens=r["max_new_tokens"], temperature=args.temperature, ignore_eos=True, seed=i)
        for i, r in enumerate(requests)
    ]
    llm = LLM()
    llm.generate(prompts[:2], params[:2])
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"temperature {args.temperature}: {tokens} tokens in {wall:.1f} s = {tokens / wall:.1f} output tok/s")


if __name__ == "__main__":
    main()
