"""One long conversation on SmolLM2 (bf16; or `--model`): the time to its first token and per token after it,
each with the share spent in attention, for prompts of 512 to 8,000 tokens. Attention grows with the prompt
(quadratically in prefill, linearly per decoded token), the matmuls do not; a sliding-window layer's attention
stops growing at its window.

An A/B of two checkouts: `PYTHONPATH=<checkout> .venv/bin/python benchmarks/cpu/long_prompt.py [--dtype float32]`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from ember.attention import cpu_kernels
from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams

DECODED = 128  # tokens timed after the first
attention_seconds = 0.0
kernel = cpu_kernels.paged_decode_attention


def timed_attention(*args: Any, **kwargs: Any) -> Any:
    global attention_seconds
    start = time.perf_counter()
    try:
        return kernel(*args, **kwargs)
    finally:
        attention_seconds += time.perf_counter() - start


def timed_generate(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """(wall seconds, attention seconds) of one request."""
    global attention_seconds
    attention_seconds = 0.0
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return time.perf_counter() - start, attention_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--model", help="a GGUF file or HF directory (default: the embedded SmolLM2)")
    parser.add_argument("--lengths", default="512,1024,2048,4096,8000", help="prompt lengths, comma-separated")
    args = parser.parse_args()
    cpu_kernels.paged_decode_attention = timed_attention  # the attention layer looks it up at each call
    llm = LLM(args.model, dtype=args.dtype, enable_prefix_caching=False)  # every run prefills its whole prompt
    prompt = [1000 + i % 40000 for i in range(8000)]
    timed_generate(llm, prompt[:64], 2)  # warm-up
    print(f"{'prompt':>7s} {'TTFT ms':>9s} {'attention':>10s} {'ms/token':>9s} {'attention':>10s}")
    for length in map(int, args.lengths.split(",")):
        first = [timed_generate(llm, prompt[:length], 1) for _ in range(3)]
        whole = [timed_generate(llm, prompt[:length], DECODED + 1) for _ in range(3)]
        ttft, ttft_attention = statistics.median(first)
        total, total_attention = statistics.median(whole)
        per_token, per_token_attention = (total - ttft) / DECODED, (total_attention - ttft_attention) / DECODED
        print(f"{length:7d} {ttft * 1e3:9.0f} {ttft_attention * 1e3:10.0f} {per_token * 1e3:9.2f} "
              f"{per_token_attention * 1e3:10.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
