"""Ember vs HF transformers on the real SmolLM2-135M-Instruct (fp32, CPU): the engine's correctness oracle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams
from ember.models import quantized
from ember.models.loader import default_model_path
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


def requantize(source: Path, target: Path) -> None:
    """The shipped Q4_1 SmolLM2 re-quantized as llama.cpp's Q4_K_M is for a width of 576, which is no whole number
    of K-quant super-blocks: Q5_0 matrices, Q8_0 for the embedding and the v of llama.cpp's "more bits" layers;
    and the down projections in Q5_1 (K-quants gguf-py cannot write). QKV then mixes Q5_0 and Q8_0 parts."""
    import gguf
    from gguf.quants import dequantize, quantize

    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(target), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name != gguf.Keys.General.ARCHITECTURE and not field.name.startswith("GGUF."):
            kind = field.types[0]
            writer.add_key_value(
                field.name, field.contents(), kind, sub_type=field.types[-1] if len(field.types) > 1 else None
            )
    layers = reader.fields["llama.block_count"].contents()
    more_bits = {i for i in range(layers) if i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2}
    types = gguf.GGMLQuantizationType
    for tensor in reader.tensors:
        w = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed([int(d) for d in tensor.shape])))
        if w.ndim == 1:
            writer.add_tensor(tensor.name, w)
            continue
        layer = int(tensor.name.split(".")[1]) if tensor.name.startswith("blk.") else -1
        if tensor.name == "token_embd.weight" or (tensor.name.endswith("attn_v.weight") and layer in more_bits):
            qtype = types.Q8_0
        else:
            qtype = types.Q5_1 if tensor.name.endswith("ffn_down.weight") else types.Q5_0
        writer.add_tensor(tensor.name, quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.skipif(not quantized.kernels_available(torch.float32), reason="needs the CPU's quantized kernels")
def test_a_llama_cpp_mix_of_formats_matches_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real model in llama.cpp's fallback types (`requantize`): every linear from its blocks in the one-call
    step, QKV in two kernels; greedy tokens equal those of transformers loading the same file (fp32)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "smollm2-mixed.gguf"
    requantize(default_model_path(), path)
    llm = LLM(str(path), num_blocks=256, dtype="float32")
    kernels = {
        m.small_steps.weight.kernels for m in llm.engine.runner.model.modules() if getattr(m, "small_steps", None)
    }
    assert llm.engine.runner.decode_stack is not None and {"q5", "q5+q8", "q8"} <= kernels
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    prompts = PROMPTS[:4]
    prompt_ids = [llm.tokenizer(prompt)["input_ids"] for prompt in prompts]
    outputs = llm.generate(prompt_ids, SamplingParams(max_tokens=32, temperature=0, logprobs=5, ignore_eos=True))
    for prompt, (hf_tokens, hf_tops), out in zip(prompts, hf_greedy(hf, prompt_ids, 32), outputs, strict=True):
        assert out.outputs[0].token_ids == hf_tokens, prompt
        assert_logprobs_close(out, hf_tokens, hf_tops, prompt[:30])
