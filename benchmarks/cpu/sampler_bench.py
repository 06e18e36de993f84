"""Time `sample()` on 64 x 49,152 random logits (SmolLM2's vocabulary, a cpu-64-sized batch) for the sampling
settings that matter: temperature alone, top-k + top-p, and top-p alone on peaked and on flat logits.

An A/B of two checkouts: `PYTHONPATH=<checkout> .venv/bin/python benchmarks/cpu/sampler_bench.py`.
"""

from __future__ import annotations

import time

import torch

from ember.engine.request import Request
from ember.engine.sampler import sample
from ember.engine.sampling_params import SamplingParams


def main() -> None:
    torch.manual_seed(0)
    flat = torch.randn(64, 49152)
    cases = [
        ("temperature 1", flat, SamplingParams(temperature=1.0)),
        ("top-k 50 + top-p 0.9", flat, SamplingParams(temperature=0.8, top_k=50, top_p=0.9)),
        ("top-p 0.9, peaked (x6)", flat * 6, SamplingParams(temperature=0.8, top_p=0.9)),
        ("top-p 0.9, flat", flat, SamplingParams(temperature=0.8, top_p=0.9)),
    ]
    for label, logits, params in cases:
        requests = [Request(str(i), [1], params, [], 1) for i in range(len(logits))]
        sample(logits, requests)  # warm-up
        start = time.perf_counter()
        for _ in range(5):
            sample(logits, requests)
        print(f"{label:26s} {(time.perf_counter() - start) / 5 * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
