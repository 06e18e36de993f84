"""Ember's C decode-attention kernel against the PyTorch reference, and the engine on both paths."""

from __future__ import annotations

import pytest
import torch

from ember.attention import cpu_kernels
from ember.attention.torch_paged import decode_attention
from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="no C compiler to build Ember's CPU kernels")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    [
        (9, 3, 64, 16),
        (4, 4, 32, 8),
        (8, 2, 128, 32),
        (16, 8, 64, 16),
        (6, 1, 16, 4),
    ],
)
def test_decode_kernel_matches_reference(
    dtype: torch.dtype, tolerance: float, heads: int, kv_heads: int, head_dim: int, block_size: int
) -> None:
    generator = torch.Generator().manual_seed(heads * 1000 + head_dim)
    num_blocks, lengths = 96, [1, 2, block_size, block_size + 1, 5 * block_size - 3, 7 * block_size]
    k_cache = torch.randn(kv_heads, num_blocks, head_dim, block_size, generator=generator).to(dtype)
    v_cache = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=generator).to(dtype)
    q = torch.randn(len(lengths), heads, head_dim, generator=generator).to(dtype)
    max_blocks = -(-max(lengths) // block_size)
    tables = torch.randperm(num_blocks, generator=generator)[: len(lengths) * max_blocks].view(len(lengths), -1)
    lens = torch.tensor(lengths)
    keys = torch.arange(max_blocks * block_size)
    bias = torch.zeros(len(lengths), len(keys)).masked_fill_(keys >= lens.unsqueeze(1), float("-inf"))
    scale = head_dim**-0.5
    ref = decode_attention(
        q.float(), k_cache.float(), v_cache.float(), tables, bias.view(1, len(lengths), 1, -1), scale
    )
    out = cpu_kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert relative_error(out, ref) < tolerance


def test_engine_outputs_equal_on_kernel_and_pytorch_paths(tiny_models: dict) -> None:
    path = tiny_models["qwen2"][0]
    llm = LLM(str(path), num_blocks=64, block_size=8, dtype="float32")
    prompts = [[5, 6, 7], [9] * 30, list(range(3, 60))]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    assert llm.engine.runner.use_native_decode
    native = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    llm.engine.runner.use_native_decode = False
    fallback = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert native == fallback
