"""The host's time per decode step: the engine around a model that costs nothing.

On a GPU, a decode step's kernels at batch 256 take a few milliseconds; the Python around them (scheduling,
building the step's inputs, sampling's launch, committing tokens, outputs) is paid on top unless it
overlaps them. This script measures that Python on this machine: the model is replaced by a stub that
returns fixed logits at once, and the engine takes the CUDA path's code (`EMBER_KERNELS=triton`: the
decode-graph input buffers, graph buckets, Triton-path metadata), run eagerly on the CPU. It prints the
milliseconds per decode step and a cProfile of the top functions.

Usage: .venv/bin/python benchmarks/host_overhead.py [--batch 256] [--steps 300] [--prompt-tokens 32]
       [--api generate|stream] [--async-scheduling] [--profile 25]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ["EMBER_KERNELS"] = "triton"  # the CUDA path's host code; the stubbed model runs no kernel
os.environ.setdefault("TRITON_INTERPRET", "1")  # what that mode asks for on the CPU (no kernel runs here)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams
from ember.models.loader import DUMMY_PRESETS

VOCAB = 1024  # small: on a GPU, reading the logits (argmax, sampling) is device work, not the host's
TINY_QWEN3 = {**DUMMY_PRESETS["qwen3-0.6b"], "model_type": "qwen3", "vocab_size": VOCAB, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16}  # fmt: skip


def stub_model(llm: LLM, max_rows: int) -> None:
    """Replace the model's forward and logits by constant tensors: what is left of a step is the host's."""
    model = llm.engine.runner.model
    hidden = torch.zeros(llm.engine.config.scheduler.max_num_batched_tokens, TINY_QWEN3["hidden_size"])
    logits = torch.randn(max_rows, VOCAB, generator=torch.Generator().manual_seed(0))
    model.forward = lambda input_ids, *_: hidden[: len(input_ids)]  # type: ignore[method-assign]
    model.compute_logits = lambda h: logits[: len(h)]  # type: ignore[method-assign]


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, api: str) -> None:
    if api == "generate":
        llm.generate(prompts, params)
    else:
        for _ in llm.stream(prompts, params):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="requests decoding together")
    parser.add_argument("--steps", type=int, default=300, help="tokens generated per request")
    parser.add_argument(
        "--prompt-tokens", type=int, default=32, help="tokens per prompt (a serving batch's: several hundred)"
    )
    parser.add_argument("--api", choices=["generate", "stream"], default="generate")
    parser.add_argument("--async-scheduling", action="store_true")
    parser.add_argument("--profile", type=int, default=25, metavar="N", help="print the top N functions (0: none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config_dir = Path(tempfile.mkdtemp())
    (config_dir / "config.json").write_text(json.dumps(TINY_QWEN3))
    blocks_per_request = -(-(args.prompt_tokens + args.steps) // 16)  # the default block size
    llm = LLM(
        str(config_dir), load_format="dummy", dtype="float32", device="cpu", max_num_seqs=args.batch,
        max_num_batched_tokens=8192, enable_prefix_caching=False, max_model_len=2048,
        async_scheduling=args.async_scheduling, num_blocks=args.batch * blocks_per_request + 64,
    )  # fmt: skip
    shutil.rmtree(config_dir)
    stub_model(llm, max(args.batch, 8192))
    random.seed(0)
    prompts = [[random.randint(0, VOCAB - 1) for _ in range(args.prompt_tokens)] for _ in range(args.batch)]
    params = SamplingParams(max_tokens=args.steps, temperature=0, ignore_eos=True)
    run(llm, prompts[:2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), args.api)
    timings: list[Any] = []
    overlapped = -llm.engine.num_overlapped_steps
    for profiled in (False, True) if args.profile else (False,):
        profiler = cProfile.Profile() if profiled else None
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        run(llm, prompts, params, args.api)
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
        else:
            timings.append(time.perf_counter() - start)
            overlapped += llm.engine.num_overlapped_steps
    per_step = 1000 * timings[0] / args.steps
    print(f"batch {args.batch}, {args.prompt_tokens}-token prompts, {args.steps} steps, api {args.api}, "
          f"async {args.async_scheduling}: "
          f"{per_step:.2f} ms of host time per step (prefill step included)"
          + (f", {overlapped} of them launched behind another" if args.async_scheduling else ""))  # fmt: skip


if __name__ == "__main__":
    main()
