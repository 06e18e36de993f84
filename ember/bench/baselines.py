"""The baselines Ember is measured against, on the same weights: HF transformers `generate`.

hf-naive serves one request at a time; hf-static pads fixed batches. Both force exactly
`max_new_tokens` per request (EOS ignored, like the workload asks), greedy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ember.bench.workloads import BenchRequest


def load_hf_model(source_dir: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    from ember.models.loader import with_dense_weights

    return AutoModelForCausalLM.from_pretrained(str(with_dense_weights(source_dir)), dtype=dtype).eval()


def hf_naive(model: Any, requests: list[BenchRequest], advance: Callable[[int], None]) -> float:
    """One request at a time; returns wall seconds."""
    start = time.perf_counter()
    with torch.inference_mode():
        for r in requests:
            model.generate(
                torch.tensor([r.prompt_ids]),
                max_new_tokens=r.max_new_tokens,
                min_new_tokens=r.max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            advance(1)
    return time.perf_counter() - start


def hf_static(model: Any, requests: list[BenchRequest], advance: Callable[[int], None], batch_size: int = 16) -> float:
    """Left-padded batches of `batch_size`, each run until its longest output is done; returns wall seconds."""
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(requests), batch_size):
            batch = requests[i : i + batch_size]
            width = max(len(r.prompt_ids) for r in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, r in enumerate(batch):
                ids[row, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
                mask[row, width - len(r.prompt_ids) :] = 1
            longest = max(r.max_new_tokens for r in batch)
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=longest,
                min_new_tokens=longest,
                do_sample=False,
                pad_token_id=0,
            )
            advance(len(batch))
    return time.perf_counter() - start


BASELINES: dict[str, Callable[..., float]] = {"hf-naive": hf_naive, "hf-static": hf_static}
