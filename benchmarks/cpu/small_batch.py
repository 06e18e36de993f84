"""Decode steps of a few requests on SmolLM2 (or `--model`; bf16 or fp32): milliseconds per step and the
linears' share, at batch 1 to 16. At these sizes a step reads every weight once, so the linears' time is their
bytes over memory bandwidth; from the GGUF's Q4_1 blocks (the default up to `quantized.MAX_ROWS` rows) they read about
a third of bf16's bytes and a sixth of fp32's.

Steps of up to `MAX_ROWS` single-token rows run as one C call (`models/decode_stack.py`), whose linears Python
does not see: the linears column then holds the LM head alone; `--no-decode-stack` runs the PyTorch model.
An A/B of the quantized kernels in one checkout: run it as is, then with EMBER_DISABLE_QUANTIZED_KERNELS=1 (or, on a
bf16 CPU, EMBER_KEEP_DEQUANTIZED_WEIGHTS=1: oneDNN on the dequantized weights past `MAX_ROWS` rows; on an AMX CPU,
EMBER_DISABLE_AMX=1 ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 runs Ember and oneDNN as on a CPU without AMX, e.g. Zen 4).
`.venv/bin/python benchmarks/cpu/small_batch.py [--batch-sizes 1,4,8,16] [--dtype float32] [--no-decode-stack]
[--model FILE.gguf]` (random_gguf.py writes one in another architecture's shape, e.g. Qwen3-0.6B's)
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams
from ember.models.packed_linear import PackedLinear
from ember.models.quantized import QuantizedLinear

DECODED = 128  # steps timed after the first token
LINEARS = (PackedLinear, QuantizedLinear)  # QuantizedLinear: GGUF blocks only (bf16 CPUs)
linear_seconds = 0.0


def timed(forward: Any) -> Any:
    def timed_linear(self: Any, x: Any) -> Any:
        global linear_seconds
        start = time.perf_counter()
        try:
            return forward(self, x)
        finally:
            linear_seconds += time.perf_counter() - start

    return timed_linear


def timed_generate(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """(wall seconds, linear seconds) of one batch."""
    global linear_seconds
    linear_seconds = 0.0
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return time.perf_counter() - start, linear_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16", help="comma-separated (default 1,2,4,8,16)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--no-decode-stack", action="store_true", help="run every step on the PyTorch model")
    parser.add_argument("--model", help="a model path (default: the embedded SmolLM2)")
    args = parser.parse_args()
    for linear in LINEARS:
        linear.forward = timed(linear.forward)  # type: ignore[method-assign]
    llm = LLM(args.model, dtype=args.dtype, enable_prefix_caching=False, max_model_len=4096)
    if args.no_decode_stack:
        llm.engine.runner.decode_stack = None
    print(f"decode steps of few rows in one C call: {llm.engine.runner.decode_stack is not None}")
    modules = list(llm.engine.runner.model.modules())
    blocks = sum(getattr(m, "small_steps", None) is not None for m in modules)
    print(f"linears multiplied from GGUF blocks at few rows: {blocks}")
    print(f"linears multiplied from GGUF blocks only: {sum(isinstance(m, QuantizedLinear) for m in modules)}")
    prompt = [1000 + i for i in range(64)]
    timed_generate(llm, [prompt], 2)  # warm-up
    print(f"{'batch':>5s} {'ms/step':>8s} {'linears':>8s} {'tok/s':>7s}")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        runs = []
        for _ in range(3):
            first, first_linear = timed_generate(llm, [prompt] * batch, 1)
            whole, whole_linear = timed_generate(llm, [prompt] * batch, DECODED + 1)
            runs.append(((whole - first) / DECODED, (whole_linear - first_linear) / DECODED))
        step, linear = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        print(f"{batch:5d} {step * 1e3:8.2f} {linear * 1e3:8.2f} {batch / step:7.1f}", flush=True)


if __name__ == "__main__":
    main()
