"""Ember vs HF transformers on the real SmolLM2-135M-Instruct (fp32, CPU): the engine's correctness oracle."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams
from tests.parity import assert_logprobs_close, hf_greedy

STORY = (
    "The lighthouse keeper had lived alone on the island for eleven years. Every evening he climbed the "
    "spiral stairs, trimmed the wick and wound the clockwork that turned the great lens. Ships he never saw "
    "passed in the dark, guided by a light he never left. "
)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "List three colors:",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Translate to French: 'Good morning, how are you today?'\nFrench:",
    'import numpy as np\n\ndef normalize(vectors):\n    """Scale each row to unit length."""\n',
    STORY * 3 + "One night, a storm",
    STORY * 12 + "In the morning,",  # about 600 tokens: prefilled in chunks, mixed with decodes
]


@pytest.fixture(scope="module")
def hf_references(smollm: LLM, hf_smollm: Any) -> list[tuple[list[int], list[int], list[set[int]]]]:
    """(prompt ids, HF greedy tokens, HF top-5 per position) for each prompt, computed once."""
    prompt_ids = [smollm.tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    return [(ids, *ref) for ids, ref in zip(prompt_ids, hf_greedy(hf_smollm, prompt_ids, 128), strict=True)]


def test_greedy_parity_with_hf_fp32(smollm: LLM, hf_references: list) -> None:
    prompt_ids = [ids for ids, _, _ in hf_references]
    assert len({len(p) for p in prompt_ids}) == len(PROMPTS) and max(len(p) for p in prompt_ids) > 512
    params = SamplingParams(max_tokens=128, temperature=0, logprobs=5, ignore_eos=True)
    outputs = smollm.generate(prompt_ids, params)  # all eight batched through one engine
    for prompt, (_, hf_tokens, hf_tops), out in zip(PROMPTS, hf_references, outputs, strict=True):
        assert out.outputs[0].token_ids[:32] == hf_tokens[:32], f"first 32 tokens differ for {prompt[:30]!r}"
        assert_logprobs_close(out, hf_tokens, hf_tops, prompt[:30])
    assert smollm.engine.kv_cache.pool.num_free_blocks == smollm.engine.kv_cache.num_blocks


def test_bf16_logprobs_close_to_hf_fp32(hf_references: list) -> None:
    """bf16 (the CPU default where bf16 units exist) diverges earlier, but only between near-ties."""
    llm = LLM(num_blocks=1024, dtype="bfloat16")
    params = SamplingParams(max_tokens=128, temperature=0, logprobs=5, ignore_eos=True)
    outputs = llm.generate([ids for ids, _, _ in hf_references], params)
    for prompt, (_, hf_tokens, hf_tops), out in zip(PROMPTS, hf_references, outputs, strict=True):
        assert_logprobs_close(out, hf_tokens, hf_tops, prompt[:30])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_logprobs_close_to_hf_fp32(hf_references: list) -> None:
    """The GPU path (Triton kernels, bf16) against the same HF fp32 references."""
    llm = LLM(num_blocks=1024, dtype="bfloat16", device="cuda")
    assert llm.engine.runner.use_triton
    params = SamplingParams(max_tokens=128, temperature=0, logprobs=5, ignore_eos=True)
    outputs = llm.generate([ids for ids, _, _ in hf_references], params)
    for prompt, (_, hf_tokens, hf_tops), out in zip(PROMPTS, hf_references, outputs, strict=True):
        assert_logprobs_close(out, hf_tokens, hf_tops, prompt[:30])
