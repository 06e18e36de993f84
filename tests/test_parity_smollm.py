"""Ember vs HF transformers on the real SmolLM2-135M-Instruct (fp32, CPU): the engine's correctness oracle."""

from __future__ import annotations

from typing import Any

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


def test_greedy_parity_with_hf(smollm: LLM, hf_smollm: Any) -> None:
    tokenizer = smollm.tokenizer
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert len({len(p) for p in prompt_ids}) == len(PROMPTS) and max(len(p) for p in prompt_ids) > 512
    params = SamplingParams(max_tokens=128, temperature=0, logprobs=5, ignore_eos=True)
    outputs = smollm.generate(prompt_ids, params)  # all eight batched through one engine
    for prompt, ids, out in zip(PROMPTS, prompt_ids, outputs, strict=True):
        hf_tokens, hf_tops = hf_greedy(hf_smollm, ids, 128)
        assert out.outputs[0].token_ids[:32] == hf_tokens[:32], f"first 32 tokens differ for {prompt[:30]!r}"
        assert_logprobs_close(out, hf_tokens, hf_tops, prompt[:30])
    assert smollm.engine.kv_cache.pool.num_free_blocks == smollm.engine.kv_cache.num_blocks
