"""Time to first token of one long prompt on SmolLM2 (bf16), and the share of it spent in attention: where
the CPU's prefill time goes as prompts grow (attention is quadratic in the prompt, the matmuls linear).

An A/B of two checkouts: `PYTHONPATH=<checkout> .venv/bin/python benchmarks/cpu/prefill_latency.py`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from ember.attention import cpu_kernels
from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams

attention_seconds = 0.0
kernel = cpu_kernels.paged_decode_attention


def timed_attention(*args: Any, **kwargs: Any) -> Any:
    global attention_seconds
    start = time.perf_counter()
    try:
        return kernel(*args, **kwargs)
    finally:
        attention_seconds += time.perf_counter() - start


def main() -> None:
    global attention_seconds
    cpu_kernels.paged_decode_attention = timed_attention  # the attention layer looks it up at each call
    llm = LLM(dtype="bfloat16", enable_prefix_caching=False)
    params = SamplingParams(max_tokens=1, temperature=0)
    prompt = [1000 + i % 40000 for i in range(4096)]
    llm.generate([prompt[:64]], params)  # warm-up
    print(f"{'prompt':>7s} {'TTFT ms':>9s} {'attention ms':>13s}")
    for length in (512, 1024, 2048, 4096):
        runs = []
        for _ in range(3):
            attention_seconds = 0.0
            start = time.perf_counter()
            llm.generate([prompt[:length]], params)
            runs.append((time.perf_counter() - start, attention_seconds))
        total, attention = statistics.median(runs)
        print(f"{length:7d} {total * 1e3:9.0f} {attention * 1e3:13.0f}", flush=True)


if __name__ == "__main__":
    main()
