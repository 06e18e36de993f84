"""Ember's C kernels (paged decode attention, cache writes, fused elementwise ops) against their PyTorch
references, and the engine on both paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember.attention import cpu_kernels
from ember.attention.layout import to_cache_layout
from ember.attention.torch_paged import decode_attention, write_kv
from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams
from ember.kernels import elementwise, native
from tests.attention_cases import context_bias, decode_case
from tests.conftest import make_tiny_hf_model

pytestmark = pytest.mark.skipif(native.load() is None, reason="no C compiler to build Ember's CPU kernels")


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def random_caches(
    kv_heads: int, num_blocks: int, block_size: int, head_dim: int, dtype: torch.dtype, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random keys and values in the CPU cache layout."""
    keys = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=generator).to(dtype)
    values = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=generator).to(dtype)
    return to_cache_layout(keys, values)


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
    caches = random_caches(kv_heads, num_blocks, block_size, head_dim, dtype, generator)
    q = torch.randn(len(lengths), heads, head_dim, generator=generator).to(dtype)
    tables, lens, ref = decode_case(q, *caches, lengths, generator)
    out = cpu_kernels.paged_decode_attention(q, *caches, tables, lens, head_dim**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    assert relative_error(out, ref) < tolerance


@pytest.mark.parametrize(
    ("heads", "kv_heads", "lengths", "dtype", "head_dim"),
    [
        (9, 3, [3000], torch.bfloat16, 64),  # the AVX512-BF16 kernel where the CPU has it
        (6, 1, [3000], torch.bfloat16, 64),
        (4, 1, [2100, 10], torch.bfloat16, 64),
        (6, 2, [1500], torch.bfloat16, 32),  # the generic kernels
        (9, 3, [3000], torch.float32, 64),
        (4, 1, [2100, 10], torch.float32, 32),
    ],
)
def test_few_long_contexts_split_across_threads_match_reference(
    heads: int, kv_heads: int, lengths: list[int], dtype: torch.dtype, head_dim: int
) -> None:
    """Fewer (sequence, KV head) pairs than threads to keep busy: each long context is cut into parts that
    threads share, merged by their softmax statistics; a short context beside a long one leaves a part empty.
    The decode tokens' own K/V are stored by the call, as in a decode step."""
    generator = torch.Generator().manual_seed(heads + len(lengths))
    block_size, num_blocks = 16, 400
    caches = random_caches(kv_heads, num_blocks, block_size, head_dim, dtype, generator)
    q = torch.randn(len(lengths), heads, head_dim, generator=generator).to(dtype)
    k_new, v_new = (torch.randn(len(lengths), kv_heads, head_dim, generator=generator).to(dtype) for _ in range(2))
    tables, lens, _ = decode_case(q, *caches, lengths, generator)
    stored = tuple(c.clone() for c in caches)
    slots = torch.stack([tables[b, (n - 1) // block_size] * block_size + (n - 1) % block_size
                         for b, n in enumerate(lengths)])  # fmt: skip
    write_kv(*stored, k_new, v_new, slots, block_size, use_native=False)
    out = cpu_kernels.paged_decode_attention(q, *caches, tables, lens, head_dim**-0.5, k_new, v_new)
    assert torch.equal(caches[0], stored[0]) and torch.equal(caches[1], stored[1])
    keys = torch.arange(tables.shape[1] * block_size)
    bias = torch.zeros(len(lengths), len(keys)).masked_fill_(keys >= lens.unsqueeze(1), float("-inf"))
    reference = decode_attention(
        q.float(), *(c.float() for c in stored), tables, bias.view(1, len(lengths), 1, -1), head_dim**-0.5
    )
    assert max(relative_error(out[b], reference[b]) for b in range(len(lengths))) < TOLERANCE[dtype]


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    [(9, 3, 64, 16), (16, 8, 128, 16), (4, 4, 64, 32), (8, 1, 64, 16)],  # rows per tile: 2, 3, 6, none (G 8)
)
def test_rows_sharing_a_table_match_reference(
    dtype: torch.dtype, tolerance: float, heads: int, kv_heads: int, head_dim: int, block_size: int
) -> None:
    """Prefill chunks as kernel rows (rows of a sequence share its table, at consecutive context lengths; on
    AVX512-BF16 they attend in tiles of rows): chunks from the start and over a cached prefix, a tile cut by
    the chunk's end, rows of one table that do not continue each other, a decode row, a single-row chunk."""
    generator = torch.Generator().manual_seed(head_dim + heads)
    num_blocks = 64
    caches = random_caches(kv_heads, num_blocks, block_size, head_dim, dtype, generator)
    tables = torch.randperm(num_blocks, generator=generator)[: 4 * 12].view(4, 12)  # 4 sequences, 12 blocks each
    # (sequence, first context length, rows); the second chunk reads the first's table but does not continue it
    chunks = [(0, 1, 13), (0, 100, 41), (2, 140, 1), (1, 30, 20), (3, 7, 1)]
    row_tables = torch.tensor([seq for seq, _, n in chunks for _ in range(n)])
    lens = torch.tensor([first + i for _, first, n in chunks for i in range(n)])
    q = torch.randn(len(lens), heads, head_dim, generator=generator).to(dtype)
    out = cpu_kernels.paged_decode_attention(q, *caches, tables, lens, head_dim**-0.5, row_tables=row_tables)
    keys = torch.arange(12 * block_size)
    bias = torch.zeros(len(lens), len(keys)).masked_fill_(keys >= lens.unsqueeze(1), float("-inf"))
    reference = decode_attention(
        q.float(), *(c.float() for c in caches), tables[row_tables], bias.view(1, len(lens), 1, -1), head_dim**-0.5
    )
    assert relative_error(out, reference) < tolerance
    row_errors = [relative_error(out[i], reference[i]) for i in range(len(lens))]
    assert max(row_errors) < 3 * tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "lengths"),
    [
        (8, 2, 64, [1, 20, 37, 38, 64, 65, 100, 129, 200, 333]),  # one (row, KV head) pair per thread and more
        (4, 1, 64, [1500, 2300]),  # few long contexts: cut into parts that threads share
        (6, 2, 32, [900, 40]),  # the generic kernels
    ],
)
@pytest.mark.parametrize("window", [37, 64, 512])
def test_sliding_window_decode_matches_reference(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, lengths: list[int], window: int
) -> None:
    """Under a sliding window each row sees its last `window` tokens: windows within a block and on block
    edges, contexts shorter and longer than the window, on every path of the kernel."""
    generator = torch.Generator().manual_seed(window + len(lengths))
    block_size, num_blocks = 16, 400
    caches = random_caches(kv_heads, num_blocks, block_size, head_dim, dtype, generator)
    q = torch.randn(len(lengths), heads, head_dim, generator=generator).to(dtype)
    tables, lens, ref = decode_case(q, *caches, lengths, generator, window)
    out = cpu_kernels.paged_decode_attention(q, *caches, tables, lens, head_dim**-0.5, window=window)
    assert max(relative_error(out[b], ref[b]) for b in range(len(lengths))) < TOLERANCE[dtype]
    whole = cpu_kernels.paged_decode_attention(q, *caches, tables, lens, head_dim**-0.5)
    if max(lengths) > window:  # the window matters
        assert any(relative_error(whole[b], ref[b]) > 0.05 for b in range(len(lengths)))
    else:  # a window past every context changes nothing
        assert torch.equal(whole, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "lengths", "rows_share"),
    [
        (8, 4, 64, [1, 20, 37, 100, 129, 200, 333, 64], False),  # rows one by one
        (8, 2, 64, [1500, 2300], False),  # few long contexts: parts merged
        (9, 3, 64, list(range(40, 52)), True),  # a prefill chunk as rows (tiles on AVX512-BF16)
        (6, 2, 32, [900, 40], False),  # the generic kernels
    ],
)
def test_soft_capped_scores_match_reference(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, lengths: list[int], rows_share: bool
) -> None:
    """Gemma 2's soft-capping (score -> cap * tanh(score / cap)) on every path of the kernel, with scores large
    enough that the cap changes the output."""
    generator = torch.Generator().manual_seed(len(lengths) + head_dim)
    block_size, num_blocks, softcap = 16, 400, 1.5
    caches = random_caches(kv_heads, num_blocks, block_size, head_dim, dtype, generator)
    q = (3 * torch.randn(len(lengths), heads, head_dim, generator=generator)).to(dtype)
    tables, lens, ref = decode_case(q, *caches, lengths, generator, softcap=softcap)
    row_tables = None
    if rows_share:  # every row reads the first row's table
        row_tables = torch.zeros(len(lengths), dtype=torch.int64)
        ref = decode_attention(q.float(), *(c.float() for c in caches), tables[row_tables],
                               context_bias(lens, tables.shape[1] * block_size), head_dim**-0.5, softcap)  # fmt: skip
    out = cpu_kernels.paged_decode_attention(
        q, *caches, tables, lens, head_dim**-0.5, row_tables=row_tables, softcap=softcap
    )
    assert max(relative_error(out[b], ref[b]) for b in range(len(lengths))) < 3 * TOLERANCE[dtype]
    uncapped = cpu_kernels.paged_decode_attention(q, *caches, tables, lens, head_dim**-0.5, row_tables=row_tables)
    assert relative_error(uncapped, ref) > 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliding_window_rows_sharing_a_table_match_reference(dtype: torch.dtype) -> None:
    """Prefill chunks as kernel rows under a sliding window: each row of a chunk starts its window elsewhere."""
    generator = torch.Generator().manual_seed(11)
    heads, kv_heads, head_dim, block_size, num_blocks, window = 9, 3, 64, 16, 64, 29
    caches = random_caches(kv_heads, num_blocks, block_size, head_dim, dtype, generator)
    tables = torch.randperm(num_blocks, generator=generator)[:24].view(2, 12)
    row_tables = torch.tensor([0] * 13 + [1] * 30)
    lens = torch.tensor([*range(20, 33), *range(100, 130)])
    q = torch.randn(len(lens), heads, head_dim, generator=generator).to(dtype)
    out = cpu_kernels.paged_decode_attention(
        q, *caches, tables, lens, head_dim**-0.5, row_tables=row_tables, window=window
    )
    bias = context_bias(lens, 12 * block_size, window)
    reference = decode_attention(q.float(), *(c.float() for c in caches), tables[row_tables], bias, head_dim**-0.5)
    assert max(relative_error(out[i], reference[i]) for i in range(len(lens))) < 3 * TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [4, 16])
def test_native_and_pytorch_cache_writes_agree(dtype: torch.dtype, block_size: int) -> None:
    """The C scatter, the decode kernel's own store of each token, and PyTorch's indexing write the same cache."""
    generator = torch.Generator().manual_seed(block_size)
    kv_heads, num_blocks, head_dim = 3, 24, 64
    plain = torch.zeros(kv_heads, num_blocks, block_size, head_dim, dtype=dtype)
    caches = [to_cache_layout(plain, plain) for _ in range(3)]
    lengths = torch.tensor([1, block_size, 3 * block_size + 1])
    tables = torch.stack([torch.randperm(num_blocks, generator=generator)[:4] for _ in lengths])
    last = lengths - 1
    slots = tables.gather(1, (last // block_size).unsqueeze(1)).squeeze(1) * block_size + last % block_size
    k = torch.randn(len(lengths), kv_heads, head_dim, generator=generator).to(dtype)
    v = torch.randn(len(lengths), kv_heads, head_dim, generator=generator).to(dtype)
    write_kv(*caches[0], k, v, slots, block_size, use_native=False)
    write_kv(*caches[1], k, v, slots, block_size, use_native=True)
    q = torch.randn(len(lengths), 3 * kv_heads, head_dim, generator=generator).to(dtype)
    cpu_kernels.paged_decode_attention(q, *caches[2], tables, lengths, head_dim**-0.5, k, v)
    for written in caches[1:]:
        assert torch.equal(written[0], caches[0][0]) and torch.equal(written[1], caches[0][1])
    assert caches[0][0].abs().sum() > 0


# Mistral's: a sliding window shorter than the prompts; Gemma 2's: soft-capped scores too
@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma2"])
def test_engine_outputs_equal_on_kernel_and_pytorch_paths(tiny_models: dict, family: str) -> None:
    path = tiny_models[family][0]
    llm = LLM(str(path), num_blocks=64, block_size=8, dtype="float32")
    prompts = [[5, 6, 7], [9] * 30, list(range(3, 60))]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    assert llm.engine.runner.use_native_decode
    native = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    llm.engine.runner.use_native_decode = False
    fallback = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert native == fallback


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_elementwise_kernels_match_pytorch(dtype: torch.dtype, tolerance: float) -> None:
    """Fused RMSNorm (+ residual), in-place rotary and SiLU-and-mul equal the PyTorch formulation."""
    generator = torch.Generator().manual_seed(7)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    tokens, hidden, eps = 37, 96, 1e-5
    x, residual, weight = randn(tokens, hidden), randn(tokens, hidden), randn(hidden)
    assert (
        relative_error(elementwise.rms_norm(x, weight, eps), elementwise.rms_norm_reference(x, weight, eps)) < tolerance
    )
    expected_sum = x + residual
    normed, total = elementwise.add_rms_norm(x, residual.clone(), weight, eps)
    assert torch.equal(total, expected_sum)
    assert relative_error(normed, elementwise.rms_norm_reference(expected_sum, weight, eps)) < tolerance
    gemma = elementwise.rms_norm_reference(x, weight, eps, unit_offset=True)  # Gemma's: scaled by 1 + weight
    assert relative_error(elementwise.rms_norm(x, weight, eps, unit_offset=True), gemma) < tolerance
    assert relative_error(gemma, elementwise.rms_norm_reference(x, weight, eps)) > 0.1
    normed, total = elementwise.add_rms_norm(x, residual.clone(), weight, eps, unit_offset=True)
    expected = elementwise.rms_norm_reference(expected_sum, weight, eps, unit_offset=True)
    assert torch.equal(total, expected_sum) and relative_error(normed, expected) < tolerance

    qkv = randn(tokens, 5 * 16)  # 3 query heads and 1 key head of 16 rotated in place, 1 value head untouched
    angles = torch.randn(tokens, 8, generator=generator)
    heads = qkv[:, : 4 * 16].view(tokens, 4, 16)
    expected = elementwise.rotate_reference(heads, angles.cos(), angles.sin())
    values = qkv[:, 4 * 16 :].clone()
    elementwise.rotary_(heads, angles.cos(), angles.sin())
    assert relative_error(heads, expected) < tolerance and torch.equal(qkv[:, 4 * 16 :], values)
    # partial rotary (Phi-4-mini's): the leading 12 of each head's 16 dims rotate, the other 4 stay
    leading, tails = heads[..., :12], heads[..., 12:].clone()
    expected = elementwise.rotate_reference(leading, angles[:, :6].cos(), angles[:, :6].sin())
    elementwise.rotary_(leading, angles[:, :6].cos(), angles[:, :6].sin())
    assert relative_error(leading, expected) < tolerance and torch.equal(heads[..., 12:], tails)

    gate_up = randn(tokens, 2 * 48)
    gate, up = gate_up.chunk(2, dim=-1)
    assert relative_error(elementwise.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up) < tolerance
    gelu = torch.nn.functional.gelu(gate, approximate="tanh") * up  # Gemma's
    assert relative_error(elementwise.gelu_tanh_and_mul(gate_up), gelu) < tolerance
    assert relative_error(gelu, torch.nn.functional.silu(gate) * up) > 0.05


@pytest.mark.skipif(not cpu_kernels.fast_bf16_attention(16, 64), reason="needs AVX512-BF16")
def test_prefill_as_kernel_rows_matches_sdpa(tmp_path: Path) -> None:
    """bf16 prefill chunks attend as rows of the AVX512-BF16 kernel (chunked, over cached prefixes); the
    tokens equal those of the SDPA path."""
    path = tmp_path / "tiny64"
    make_tiny_hf_model("llama3", path, head_dim=64, num_attention_heads=4, num_key_value_heads=2, hidden_size=128)
    shared = list(range(10, 58))  # three full blocks that later prompts find in the prefix cache
    prompts = [[*shared, 5, 6, 7], list(range(100, 190)), shared + [9] * 20, [3] * 40]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    llm = LLM(str(path), num_blocks=128, dtype="bfloat16", max_num_batched_tokens=40)  # 40-token chunks
    assert llm.engine.runner.native_prefill
    rows = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert llm.engine.kv_cache.prefix_hits > 0
    llm.engine.runner.native_prefill = False
    llm.engine.reset_prefix_cache()
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == rows


@pytest.mark.skipif(not cpu_kernels.fast_bf16_attention(16, 64), reason="the tiled kernel needs AVX512-BF16")
def test_a_row_attends_bit_identically_alone_and_in_a_tile() -> None:
    """A speculating request's rows attend in tiles; plain decoding attends one row at a time. The two must agree
    to the bit, or a draft could be accepted where plain greedy decoding picks another token (bf16 ties)."""
    generator = torch.Generator().manual_seed(7)
    heads, kv_heads, head_dim, block_size, num_blocks = 9, 3, 64, 16, 128
    caches = random_caches(kv_heads, num_blocks, block_size, head_dim, torch.bfloat16, generator)
    table = torch.randperm(num_blocks, generator=generator)[:64].view(1, 64)
    for first in range(5, 1000, 37):
        rows = 2 + first % 7
        q = torch.randn(rows, heads, head_dim, generator=generator).to(torch.bfloat16)
        lens = torch.arange(first, first + rows)
        tiled = cpu_kernels.paged_decode_attention(
            q, *caches, table, lens, head_dim**-0.5, row_tables=torch.zeros(rows, dtype=torch.int64)
        )
        for i in range(rows):
            alone = cpu_kernels.paged_decode_attention(q[i : i + 1], *caches, table, lens[i : i + 1], head_dim**-0.5)
            assert torch.equal(tiled[i], alone[0]), (first, i)
