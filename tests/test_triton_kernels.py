"""Ember's Triton kernels against their PyTorch references. Without a GPU they run in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py) on small shapes; on a GPU the same tests run compiled."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytest.importorskip("triton")

from ember.attention.layout import pack_factor, to_cache_layout  # noqa: E402
from ember.attention.torch_paged import block_keys, block_values, prefill_attention  # noqa: E402
from ember.attention.torch_paged import write_kv as torch_write_kv  # noqa: E402
from ember.kernels import triton_attention, triton_elementwise  # noqa: E402
from ember.kernels.attention_tuning import DEFAULT  # noqa: E402
from ember.kernels.elementwise import rms_norm_reference, rotate_reference  # noqa: E402
from tests.attention_cases import decode_case  # noqa: E402

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def random_caches(
    kv_heads: int, num_blocks: int, block_size: int, head_dim: int, dtype: torch.dtype, seed: int, layout: str = DEVICE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random K/V of `dtype` in the cache layout of `layout` ("cpu": 32-bit groups, "cuda": 16-byte groups) on
    DEVICE."""
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=generator).to(dtype)
    values = torch.randn(kv_heads, num_blocks, block_size, head_dim, generator=generator).to(dtype)
    k_cache, v_cache = to_cache_layout(keys, values, pack_factor(dtype, torch.device(layout)))
    return k_cache.to(DEVICE), v_cache.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("block_size", "head_dim", "layout", "kv_heads"), [(16, 32, "cpu", 2), (32, 64, "cuda", 3)]
)  # 3 KV heads: the program's head tile is masked
def test_write_kv_matches_pytorch(
    dtype: torch.dtype, block_size: int, head_dim: int, layout: str, kv_heads: int
) -> None:
    num_blocks, tokens = 12, 37
    generator = torch.Generator().manual_seed(block_size)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:tokens].to(DEVICE)
    k = torch.randn(tokens, kv_heads, head_dim, generator=generator).to(dtype).to(DEVICE)
    v = torch.randn(tokens, kv_heads, head_dim, generator=generator).to(dtype).to(DEVICE)
    expected = random_caches(kv_heads, num_blocks, block_size, head_dim, dtype, 1, layout)
    actual = tuple(c.clone() for c in expected)
    torch_write_kv(*expected, k, v, slots, block_size, use_native=False)
    padded = torch.cat([slots, torch.full((3,), -1, device=DEVICE)])  # padding rows of a graph batch: no store
    triton_attention.write_kv(torch.cat([k, k[:3]]), torch.cat([v, v[:3]]), *actual, padded)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size", "num_splits", "layout", "window", "softcap", "pages"),
    [
        (4, 2, 32, 16, 2, "cpu", 0, 0.0, 1),
        (6, 1, 64, 16, 4, "cuda", 37, 0.0, 1),
        (8, 8, 32, 32, 1, "cpu", 64, 0.0, 1),
        (9, 3, 64, 16, 16, "cuda", 0, 0.0, 1),
        (8, 4, 32, 16, 2, "cuda", 0, 0.8, 1),  # Gemma 2's soft-capped scores
        (6, 1, 64, 16, 4, "cuda", 37, 0.0, 4),  # several blocks per loop trip: splits end inside a trip
        (9, 3, 64, 16, 1, "cuda", 0, 0.0, 2),
    ],
)
def test_paged_decode_matches_reference(
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    num_splits: int,
    layout: str,
    window: int,
    softcap: float,
    pages: int,
) -> None:
    """Ragged contexts spanning many blocks, several GQA ratios, contexts split across programs (more splits
    than blocks too), both cache layouts, sliding windows within a block and on block edges (shorter and
    longer than contexts), soft-capped scores, one block or several per loop trip; a context of length 0 (a
    padding row) gives zeros. The rows' programs start in the engine's order, longest context first."""
    check_decode(dtype, dtype, heads, kv_heads, head_dim, block_size, num_splits, layout, window, softcap, pages)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_without_prefetch_matches_reference(dtype: torch.dtype) -> None:
    """One block a trip loading its table entry, keys, then values in turn (`decode_prefetch` off: a tuning option,
    and what compiled fp32 takes)."""
    check_decode(dtype, dtype, 6, 1, 64, 16, 4, "cuda", 37, 0.0, 1, prefetch=False)
    check_decode(dtype, dtype, 4, 2, 32, 16, 2, "cpu", 0, 0.0, 1, prefetch=False)


def check_decode(
    dtype: torch.dtype, cache_dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, block_size: int,
    num_splits: int, layout: str, window: int, softcap: float, pages: int, ordered: bool = True, prefetch: bool = True,
) -> None:  # fmt: skip
    """Decode attention of `dtype` queries over a `cache_dtype` cache against the fp32 reference, `pages` blocks a
    loop trip, one-block trips software-pipelined when `prefetch`; `ordered`: the rows' programs in order of
    decreasing context length, else in row order."""
    from ember.engine.decode_graphs import longest_first

    num_blocks = 64
    lengths = [1, block_size, block_size + 3, 5 * block_size - 1, 9 * block_size + 2, 0]
    k_cache, v_cache = random_caches(kv_heads, num_blocks, block_size, head_dim, cache_dtype, heads, layout)
    generator = torch.Generator().manual_seed(heads)
    q = torch.randn(len(lengths), heads, head_dim, generator=generator).to(dtype).to(DEVICE)
    tables, lens, ref = decode_case(q, k_cache, v_cache, lengths, generator, window, softcap)
    order = torch.from_numpy(longest_first(lens.numpy())).to(DEVICE) if ordered else None
    out = triton_attention.paged_decode_attention(
        q, k_cache, v_cache, tables.to(DEVICE), lens.to(DEVICE), head_dim**-0.5, num_splits, window=window,
        softcap=softcap, order=order, tuning=replace(DEFAULT, decode_pages=pages, decode_prefetch=prefetch),
    )  # fmt: skip
    assert out.dtype == dtype and relative_error(out[:-1].cpu(), ref[:-1]) < TOLERANCE[dtype]
    assert torch.equal(out[-1].cpu(), torch.zeros_like(out[-1].cpu()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size", "layout", "block_m", "window", "softcap", "pages"),
    [
        (4, 2, 32, 16, "cpu", 16, 0, 0.0, 1),
        (6, 3, 64, 32, "cuda", 64, 0, 0.0, 1),
        (4, 1, 32, 16, "cpu", 16, 13, 0.0, 1),
        (4, 2, 32, 16, "cuda", 16, 7, 0.8, 1),  # Gemma 2's: a window and soft-capped scores
        (6, 3, 64, 32, "cuda", 64, 0, 0.0, 2),  # several blocks of keys per loop trip
        (4, 2, 32, 16, "cuda", 16, 7, 0.8, 4),
    ],
)
def test_paged_prefill_matches_reference(
    dtype: torch.dtype,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    layout: str,
    block_m: int,
    window: int,
    softcap: float,
    pages: int,
) -> None:
    """Ragged chunks in one launch: whole prompts, and chunks after a cached prefix; query tiles of 16 rows
    and of 64 (CUDA's default), each longer than some chunks; a sliding window shorter than most chunks;
    soft-capped scores; one block of keys per loop trip or several."""
    check_prefill(dtype, dtype, heads, kv_heads, head_dim, block_size, layout, block_m, window, softcap, pages)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_prefill_without_prefetch_matches_reference(dtype: torch.dtype) -> None:
    """One block a trip loading its table entry, keys, then values in turn (`prefill_prefetch` off: a tuning
    option, and what compiled fp32 takes)."""
    check_prefill(dtype, dtype, 4, 2, 32, 16, "cuda", 16, 7, 0.8, 1, prefetch=False)
    check_prefill(dtype, dtype, 6, 3, 64, 32, "cuda", 64, 0, 0.0, 1, prefetch=False)


def check_prefill(
    dtype: torch.dtype, cache_dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, block_size: int,
    layout: str, block_m: int, window: int, softcap: float, pages: int, prefetch: bool = True,
) -> None:  # fmt: skip
    """Prefill attention of `dtype` queries over a `cache_dtype` cache against the fp32 reference, `block_m` query
    rows a program, `pages` blocks of keys a loop trip, one-block trips software-pipelined when `prefetch`."""
    num_blocks = 64
    k_cache, v_cache = random_caches(kv_heads, num_blocks, block_size, head_dim, cache_dtype, heads + 7, layout)
    chunks = [(0, 21), (block_size * 2 + 5, 9), (0, 1), (40, 40)]  # (cached prefix length, chunk length)
    generator = torch.Generator().manual_seed(heads)
    tables_list = [torch.randperm(num_blocks, generator=generator)[:8] for _ in chunks]
    total = sum(length for _, length in chunks)
    q = torch.randn(total, heads, head_dim, generator=generator).to(dtype)
    starts, row = [], 0
    expected = torch.empty(total, heads, head_dim)
    for (prefix, length), table in zip(chunks, tables_list, strict=True):
        context = prefix + length
        keys = block_keys(k_cache.cpu().float(), table)[:, :context]
        values = block_values(v_cache.cpu().float(), table)[:, :context]
        positions = torch.arange(prefix, context).unsqueeze(1)
        mask = torch.arange(context).unsqueeze(0) <= positions
        if window:
            mask &= torch.arange(context).unsqueeze(0) > positions - window
        expected[row : row + length] = prefill_attention(
            q[row : row + length].float(), keys, values, mask, head_dim**-0.5, softcap
        )
        starts.append(row)
        row += length
    lengths, contexts = [length for _, length in chunks], [prefix + length for prefix, length in chunks]
    launch = triton_attention.prefill_launch(starts, lengths, contexts, torch.device(DEVICE), block_m)
    tables = torch.stack(tables_list).to(DEVICE)
    tuning = replace(DEFAULT, prefill_pages=pages, prefill_prefetch=prefetch)
    out = triton_attention.paged_prefill_attention(
        q.to(DEVICE), k_cache, v_cache, tables, launch, head_dim**-0.5, window, softcap, tuning=tuning
    )
    assert out.dtype == dtype and relative_error(out.cpu(), expected) < TOLERANCE[dtype]


FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize(("dtype", "layout", "pages"), [(torch.bfloat16, "cuda", 1), (torch.float32, "cpu", 2)])
def test_fp8_cache_attention_matches_reference(dtype: torch.dtype, layout: str, pages: int) -> None:
    """Over a float8 cache (`--kv-cache-dtype fp8`: 16 elements a 16-byte group on CUDA) decode and prefill
    attention equal the reference on the same float8 keys and values, for bf16 and fp32 queries."""
    check_decode(dtype, FP8, 6, 2, 64, 16, 2, layout, 0, 0.0, pages, ordered=False)  # (rows in row order)
    check_prefill(dtype, FP8, 4, 2, 32, 16, layout, 16, 0, 0.0, pages)


@pytest.mark.parametrize("layout", ["cpu", "cuda"])
def test_fp8_cache_stores_round_to_nearest_and_saturate(layout: str) -> None:
    """Both store kernels (the K/V write, and q/k rotary with the store) put each key and value into a float8
    cache as PyTorch's cast does: rounded to nearest, and past +-448 saturated."""
    from ember.kernels.triton_qkv import qkv_to_cache

    heads, kv_heads, head_dim, block_size, num_blocks, tokens = 4, 2, 32, 16, 6, 11
    generator = torch.Generator().manual_seed(9)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator) * 3).to(torch.bfloat16)
    qkv[0, -5:] = 1000.0  # values past float8's range
    qkv[1, -5:] = -1000.0
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:tokens]
    cos, sin = torch.ones(tokens, head_dim // 2), torch.zeros(tokens, head_dim // 2)  # rotation by 0
    _, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    k, v = k.unflatten(1, (kv_heads, head_dim)), v.unflatten(1, (kv_heads, head_dim))
    expected = random_caches(kv_heads, num_blocks, block_size, head_dim, FP8, 2, layout)
    torch_write_kv(*expected, k.to(FP8).to(DEVICE), v.to(FP8).to(DEVICE), slots.to(DEVICE), block_size, False)
    assert expected[1].float().abs().max() == 448.0
    for store in ("write_kv", "qkv_to_cache"):
        actual = random_caches(kv_heads, num_blocks, block_size, head_dim, FP8, 2, layout)
        if store == "write_kv":
            triton_attention.write_kv(k.to(DEVICE), v.to(DEVICE), *actual, slots.to(DEVICE))
        else:
            qkv_to_cache(qkv.to(DEVICE), heads, cos.to(DEVICE), sin.to(DEVICE), *actual, slots.to(DEVICE))
        assert all(torch.equal(a.view(torch.uint8), e.view(torch.uint8)) for a, e in zip(actual, expected, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elementwise_kernels_match_pytorch(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(2)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype).to(DEVICE)

    tokens, hidden, eps = 19, 96, 1e-6
    x, residual, weight = randn(tokens, hidden), randn(tokens, hidden), randn(hidden)
    out = triton_elementwise.rms_norm(x, weight, eps)
    assert relative_error(out.cpu(), rms_norm_reference(x.cpu(), weight.cpu(), eps)) < TOLERANCE[dtype]
    expected_total = (x + residual).cpu()
    normed, total = triton_elementwise.add_rms_norm(x, residual.clone(), weight, eps)
    assert relative_error(total.cpu(), expected_total) < TOLERANCE[dtype]
    assert relative_error(normed.cpu(), rms_norm_reference(expected_total, weight.cpu(), eps)) < TOLERANCE[dtype]
    gemma = rms_norm_reference(x.cpu(), weight.cpu(), eps, unit_offset=True)  # Gemma's: scaled by 1 + weight
    assert relative_error(triton_elementwise.rms_norm(x, weight, eps, unit_offset=True).cpu(), gemma) < TOLERANCE[dtype]
    normed, _ = triton_elementwise.add_rms_norm(x, residual.clone(), weight, eps, unit_offset=True)
    expected = rms_norm_reference(expected_total, weight.cpu(), eps, unit_offset=True)
    assert relative_error(normed.cpu(), expected) < TOLERANCE[dtype]

    qkv = randn(tokens, 5 * 32)
    angles = torch.randn(tokens, 16, generator=generator).to(DEVICE)
    heads = qkv[:, : 3 * 32].view(tokens, 3, 32)  # a head count that is not a power of two: the tile is masked
    expected = rotate_reference(heads.cpu(), angles.cos().cpu(), angles.sin().cpu())
    triton_elementwise.rotary_(heads, angles.cos(), angles.sin())
    assert relative_error(heads.cpu(), expected) < TOLERANCE[dtype]

    gate_up = randn(tokens, 2 * 48)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate.cpu()) * up.cpu()
    assert relative_error(triton_elementwise.silu_and_mul(gate_up).cpu(), expected) < TOLERANCE[dtype]
    expected = torch.nn.functional.gelu(gate.cpu(), approximate="tanh") * up.cpu()  # Gemma's
    assert relative_error(triton_elementwise.silu_and_mul(gate_up, gelu=True).cpu(), expected) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size", "layout", "norm"),
    [
        (4, 2, 32, 16, "cpu", None),  # Llama's: rotary only
        (6, 3, 64, 32, "cuda", "llama"),  # Qwen3's q/k norms; 9 q and k heads and 3 v heads: masked tiles
        (4, 1, 32, 16, "cuda", "gemma"),  # Gemma 3's norms: scaled by 1 + weight
    ],
)
def test_qkv_to_cache_matches_the_separate_ops(
    dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, block_size: int, layout: str, norm: str | None
) -> None:
    """One kernel for q/k norms, rotary and the cache write equals the ops it replaces, from QKV rows with a
    stride past their width (a view); a padding row's slot -1 stores nothing."""
    from ember.kernels.triton_qkv import qkv_to_cache

    tokens, num_blocks, eps = 13, 12, 1e-6
    generator = torch.Generator().manual_seed(head_dim + kv_heads)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    width = (heads + 2 * kv_heads) * head_dim
    qkv = randn(tokens, width + 8)[:, :width]
    angles = torch.randn(tokens, head_dim // 2, generator=generator)
    cos, sin = angles.cos(), angles.sin()
    weights = (randn(head_dim), randn(head_dim)) if norm else (None, None)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:tokens]
    slots[4] = -1
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.unflatten(1, (heads, head_dim)), k.unflatten(1, (kv_heads, head_dim)), v.unflatten(1, (kv_heads, -1))
    if norm:
        q, k = (rms_norm_reference(x, w, eps, norm == "gemma") for x, w in zip((q, k), weights, strict=True))
    q, k = rotate_reference(q, cos, sin), rotate_reference(k, cos, sin)
    expected = random_caches(kv_heads, num_blocks, block_size, head_dim, dtype, 1, layout)
    actual = tuple(c.clone() for c in expected)
    stored = slots >= 0
    torch_write_kv(*expected, k[stored].to(DEVICE), v[stored].to(DEVICE), slots[stored].to(DEVICE), block_size, False)
    out = qkv_to_cache(
        qkv.to(DEVICE), heads, cos.to(DEVICE), sin.to(DEVICE), *actual, slots.to(DEVICE),
        *(w.to(DEVICE) if w is not None else None for w in weights), eps, norm == "gemma",
    )  # fmt: skip
    assert out.shape == q.shape and out.is_contiguous()
    assert relative_error(out.cpu(), q) < TOLERANCE[dtype]
    for cache, reference in zip(actual, expected, strict=True):
        assert relative_error(cache.cpu(), reference.cpu()) < TOLERANCE[dtype]
    untouched = random_caches(kv_heads, num_blocks, block_size, head_dim, dtype, 1, layout)[0]
    changed = (actual[0] != untouched).flatten(2, -1).any(dim=2).cpu()  # [kv_heads, blocks]: a padding row's
    assert changed.sum() == kv_heads * len(set((slots[stored] // block_size).tolist()))  # block stays untouched


def test_radix_thresholds_match_sorting() -> None:
    """The radix search keeps what sorting the vocabulary keeps: peaked and flat rows, each filter alone and
    both, k = 1 and k beyond the vocabulary, rows of both signs, -inf tokens (a banned token), tied logits,
    a vocabulary over several tiles with a partial last one, and a row with no filter (keeps everything)."""
    from ember.kernels import triton_sampling
    from tests.sampling_reference import kept_by_sorting

    vocab = triton_sampling.UNROLL * triton_sampling.BLOCK + 451  # a second loop trip, its tiles partly past the row
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([8.0, 8.0, 0.5, 8.0, 1.0, 3.0, 3.0, 3.0, 1.0, 3.0])
    logits = torch.randn(len(scales), vocab, generator=generator) * scales.unsqueeze(1)
    logits[5] -= 40.0  # every logit negative
    logits[6, 3:] = float("-inf")  # three tokens left; top-k 10 keeps the -inf ones too, at probability 0
    logits[7] = logits[7].round()  # ties: about 20 distinct values
    logits[8] = logits[8].round()
    top_ks = [0, 40, 0, 0, 7, 1, 10, 20, 0, 3 * vocab]
    top_ps = [0.9, 0.8, 0.9, 1.0, 0.5, 1.0, 1.0, 1.0, 0.37, 0.95]
    logits = logits.to(DEVICE)
    expected = kept_by_sorting(logits, top_ks, top_ps)
    assert expected[3].all() and expected[7].sum() > 20 and expected[2].sum() > 100  # ties; a flat nucleus
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=DEVICE)
    thresholds = triton_sampling.radix_thresholds(logits, ks, torch.tensor(top_ps, device=DEVICE))
    assert thresholds[3] == float("-inf")
    assert torch.equal(logits >= thresholds.unsqueeze(1), expected)


def test_window_and_radix_thresholds_together_match_sorting(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CUDA path the sampler's thresholds come from the window of likeliest tokens where it holds a row's
    kept set, else from the radix search: a peaked top-p row, a flat one (the search), top-k with top-p, a row
    with no filter."""
    from ember.engine.sampler import NUCLEUS_WINDOW, top_k_top_p_thresholds
    from tests.sampling_reference import kept_by_sorting

    generator = torch.Generator().manual_seed(4)
    scales = torch.tensor([8.0, 0.5, 2.0, 1.0]).unsqueeze(1)
    logits = (torch.randn(4, 2 * NUCLEUS_WINDOW + 77, generator=generator) * scales).to(DEVICE)
    top_ks, top_ps = [0, 0, 30, 0], [0.9, 0.9, 0.6, 1.0]
    expected = kept_by_sorting(logits, top_ks, top_ps)
    assert expected[0].sum() < NUCLEUS_WINDOW < expected[1].sum()
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    assert torch.equal(logits >= top_k_top_p_thresholds(logits, top_ks, top_ps).unsqueeze(1), expected)


@pytest.mark.skipif(DEVICE != "cuda", reason="real shapes run compiled on a GPU only")
def test_top_k_top_p_at_qwen3_vocabulary_on_gpu() -> None:
    """256 rows of 151,936 logits: top-k keeps exactly the tokens at or above the k-th largest logit; top-p
    keeps all tokens at or above its threshold, whose mass reaches p while the mass strictly above it does not
    (within fp32 summation error, which orders the sums differently from any sort)."""
    from ember.kernels import triton_sampling

    rows, vocab = 256, 151936
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, vocab, generator=generator) * torch.linspace(0.5, 8.0, rows).unsqueeze(1)).to(DEVICE)
    no_top_k, no_top_p = torch.full((rows,), vocab, device=DEVICE), torch.ones(rows, device=DEVICE)
    thresholds = triton_sampling.radix_thresholds(logits, torch.full_like(no_top_k, 50), no_top_p).unsqueeze(1)
    assert torch.equal(logits >= thresholds, logits >= logits.topk(50, dim=1).values[:, -1:])
    thresholds = triton_sampling.radix_thresholds(logits, no_top_k, torch.full_like(no_top_p, 0.9)).unsqueeze(1)
    probs = torch.softmax(logits, dim=1)
    at_or_above = (probs * (logits >= thresholds)).sum(dim=1)
    above = (probs * (logits > thresholds)).sum(dim=1)
    assert bool((at_or_above >= 0.9 - 1e-4).all()) and bool((above < 0.9 + 1e-4).all())


def test_sampler_filters_through_the_triton_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CUDA path `filter_logits` (top-k, top-p, min-p) masks what the CPU path masks."""
    from ember.engine.request import Request
    from ember.engine.sampler import filter_logits
    from ember.engine.sampling_params import SamplingParams

    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 300, generator=generator) * 4).to(DEVICE)
    params = [SamplingParams(temperature=1.0, top_k=k, top_p=p, min_p=m)
              for k, p, m in ((10, 0.8, 0.05), (0, 0.6, 0.0), (5, 1.0, 0.0), (0, 1.0, 0.1))]  # fmt: skip
    requests = [Request(str(i), [1], p, [], 1) for i, p in enumerate(params)]
    expected = filter_logits(logits.cpu(), requests)
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    assert torch.equal(filter_logits(logits, requests).cpu(), expected)


def test_gumbel_race_draws_from_the_softmax() -> None:
    """600 rows of the same logits in one call: each token's share within 5 standard errors of its softmax
    probability, a -inf token never drawn; the same seed gives the same tokens, another seed others."""
    from ember.kernels import triton_sampling

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(40, generator=generator) * 1.5
    logits[[4, 17]] = float("-inf")
    rows = 600
    batch = logits.expand(rows, -1).to(DEVICE)
    tokens = triton_sampling.gumbel_race(batch, seed=11).cpu()
    share = torch.bincount(tokens, minlength=40).float() / rows
    p = torch.softmax(logits, dim=0)
    assert share[4] == share[17] == 0
    assert bool(((share - p).abs() <= 5 * (p * (1 - p) / rows).sqrt() + 1e-9).all())
    assert torch.equal(triton_sampling.gumbel_race(batch[:50], seed=11).cpu(), tokens[:50])
    assert not torch.equal(triton_sampling.gumbel_race(batch[:50], seed=12).cpu(), tokens[:50])


def test_raced_rows_keep_to_their_filters_and_seeded_rows_to_their_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the Gumbel race on (CUDA path), unseeded rows draw only tokens their top-k/top-p keep, and seeded
    rows draw what the default path draws."""
    from ember.engine import sampler
    from ember.engine.request import Request
    from ember.engine.sampling_params import SamplingParams

    generator = torch.Generator().manual_seed(5)
    logits = (torch.randn(6, 300, generator=generator) * 3).to(DEVICE)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, seed=s)
              for t, k, p, s in ((1.0, 3, 1.0, None), (0.7, 0, 0.5, None), (1.3, 0, 1.0, None),
                                 (0.9, 20, 0.9, 7), (1.5, 0, 0.7, 8), (1.0, 2, 1.0, None))]  # fmt: skip

    def requests() -> list[Request]:
        return [Request(str(i), [1], p, [], 1) for i, p in enumerate(params)]

    expected = sampler.sample_tokens(logits.cpu(), requests())
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    monkeypatch.setattr(sampler, "RACE_UNSEEDED_ROWS", True)
    kept = sampler.sampling_logits(logits, requests()) > float("-inf")
    for _ in range(5):
        tokens = sampler.sample_tokens(logits, requests())
        assert bool(kept[torch.arange(6), tokens.to(DEVICE)].all())
        assert torch.equal(tokens[3:5].cpu(), expected[3:5])


def test_seeded_top_k_top_p_sampling_on_the_triton_path_equals_the_default_path(
    tiny_models: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seeded requests draw the same tokens whether top-k/top-p ran as the CPU's ranking or the Triton kernel."""
    from ember.engine.engine import LLM
    from ember.engine.sampling_params import SamplingParams

    path = str(tiny_models["qwen3"][0])
    prompts = [[5, 6, 7], list(range(3, 40)), [9] * 12]
    params = [SamplingParams(max_tokens=12, temperature=t, top_k=k, top_p=p, seed=s, ignore_eos=True)
              for t, k, p, s in ((0.9, 20, 0.9, 7), (1.5, 0, 0.7, 8), (1.2, 3, 1.0, 9))]  # fmt: skip
    expected = [o.outputs[0].token_ids for o in LLM(path, num_blocks=64, dtype="float32").generate(prompts, params)]
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    llm = LLM(path, num_blocks=64, dtype="float32")
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected


def test_engine_on_an_fp8_kv_cache(tiny_models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kv_cache_dtype="fp8"`: a byte a cached element, so a memory budget holds 4x the blocks of an fp32 cache;
    the model reads its float8 keys and values back in prefill (prompt logprobs) and decode (CUDA-graph steps):
    the prompt's logprobs stay near the fp32 cache's, and differ (the cache really is float8)."""
    from ember.engine.engine import LLM
    from ember.engine.sampling_params import SamplingParams

    path = str(tiny_models["qwen3"][0])
    prompt = list(range(3, 40))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=0)
    budget = 1 << 20
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    runs = {}
    for kv_dtype in ("auto", "fp8"):
        llm = LLM(path, dtype="float32", kv_cache_memory=budget, kv_cache_dtype=kv_dtype)
        assert llm.engine.runner.kv_cache.dtype == (torch.float8_e4m3fn if kv_dtype == "fp8" else torch.float32)
        runs[kv_dtype] = (llm.engine.kv_cache.num_blocks, llm.generate([prompt], params)[0])
    (blocks, exact), (fp8_blocks, fp8) = runs["auto"], runs["fp8"]
    assert fp8_blocks == 4 * blocks
    assert len(fp8.outputs[0].token_ids) == 6 and fp8.prompt_logprobs is not None
    pairs = zip(exact.prompt_logprobs[1:], fp8.prompt_logprobs[1:], strict=True)
    differences = [abs(e.logprob - f.logprob) for e, f in pairs]  # of each prompt token
    # float8 keeps 4 significant bits: here 0.09 nats on average (a bf16 cache: 0.008, about 11x less)
    assert 0 < sum(differences) / len(differences) < 0.15 and max(differences) < 0.5, differences


def test_an_fp8_kv_cache_off_the_triton_kernels_is_a_clear_error(tiny_models: dict) -> None:
    from ember.engine.engine import LLM

    with pytest.raises(ValueError, match="--kv-cache-dtype fp8 runs on Ember's Triton kernels only"):
        LLM(str(tiny_models["qwen3"][0]), dtype="float32", kv_cache_dtype="fp8")


def test_unseeded_rows_draw_by_the_gumbel_race_in_the_engine(
    tiny_models: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CUDA path an unseeded sampled request draws by the Gumbel race (the default), its steps overlapped
    by async scheduling: under top-k 1 every draw is the greedy token."""
    from ember.engine.engine import LLM
    from ember.engine.sampling_params import SamplingParams
    from ember.kernels import triton_sampling

    path = str(tiny_models["qwen3"][0])
    prompts = [[5, 6, 7], list(range(3, 30))]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(path, num_blocks=64, dtype="float32").generate(prompts, greedy)]
    races = []
    race = triton_sampling.gumbel_race
    monkeypatch.setattr(triton_sampling, "gumbel_race", lambda *args: races.append(1) or race(*args))
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    llm = LLM(path, num_blocks=64, dtype="float32")
    sampled = SamplingParams(max_tokens=10, temperature=1.0, top_k=1, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, sampled)] == expected
    assert len(races) >= 9 and llm.engine.num_overlapped_steps > 0


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma2", "gemma3"])  # Gemma: local and global layers
def test_engine_on_triton_kernels_equals_the_default_path(
    tiny_models: dict, monkeypatch: pytest.MonkeyPatch, family: str
) -> None:
    """The whole CUDA code path (Triton attention and elementwise kernels, q/k norms for Qwen3), with
    chunked prefill over a cached prefix and speculative drafts, gives the greedy tokens of the default path."""
    from ember.engine.engine import LLM
    from ember.engine.sampling_params import SamplingParams

    path = str(tiny_models[family][0])
    prompts = [[5, 6, 7], [9] * 30, list(range(3, 60))]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(path, num_blocks=64, dtype="float32").generate(prompts, params)]
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    llm = LLM(path, num_blocks=64, dtype="float32", max_num_batched_tokens=24, speculative=f"draft:{path}")
    assert llm.engine.runner.use_triton and not llm.engine.runner.use_native_decode
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected
    assert llm.engine.speculator.stats.num_draft_tokens > 0


@pytest.mark.skipif(DEVICE != "cuda", reason="real shapes run compiled on a GPU only")
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_kernels_at_qwen3_shapes_on_gpu(dtype: torch.dtype) -> None:
    """Qwen3-0.6B's attention shape (16 heads, 8 KV heads, dim 128), 64 contexts up to 1,500 tokens."""
    heads, kv_heads, head_dim, block_size, num_blocks = 16, 8, 128, 16, 8192
    generator = torch.Generator().manual_seed(0)
    k_cache, v_cache = random_caches(kv_heads, num_blocks, block_size, head_dim, dtype, 3)
    lengths = torch.randint(1, 1500, (64,), generator=generator).tolist()
    q = torch.randn(len(lengths), heads, head_dim, generator=generator).to(dtype).to(DEVICE)
    tables, lens, ref = decode_case(q, k_cache, v_cache, lengths, generator)
    out = triton_attention.paged_decode_attention(q, k_cache, v_cache, tables.to(DEVICE), lens.to(DEVICE), 128**-0.5)
    assert relative_error(out.cpu(), ref) < TOLERANCE[dtype]


def test_decode_graph_steps_equal_eager_steps(tiny_models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode steps on the persistent, padded buffers of `DecodeGraphs` (CUDA graphs; run eagerly on the CPU)
    give the tokens and logprobs of eager steps (on the CPU, the default path's), as requests finish at
    different lengths (the batch moves through the buckets) and a small cache preempts."""
    from ember.engine.engine import LLM
    from ember.engine.sampling_params import SamplingParams

    path = str(tiny_models["qwen3"][0])
    prompts = [list(range(3, 3 + n)) for n in (4, 19, 33, 7, 50, 12)]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True, logprobs=2) for m in (3, 30, 14, 26, 11, 40)]
    eager = LLM(path, num_blocks=9, dtype="float32", max_num_seqs=6, device=DEVICE, enforce_eager=True)
    expected = [o.outputs[0] for o in eager.generate(prompts, params)]
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    llm = LLM(path, num_blocks=9, dtype="float32", max_num_seqs=6, device=DEVICE)
    outputs = [o.outputs[0] for o in llm.generate(prompts, params)]
    graphs = llm.engine.runner.decode_graphs
    assert graphs is not None and graphs.buckets == [1, 2, 4, 6]
    assert set(graphs.replays) == {1, 2, 4, 6} and llm.engine.scheduler.num_preemptions > 0
    # table rows: none lost, and only the last step's request still holds one
    assert len(graphs.slots) == 1 and len(graphs.free_slots) == graphs.max_batch - 1
    assert llm.engine.kv_cache.pool.num_free_blocks == eager.engine.kv_cache.pool.num_free_blocks == 9
    for graph_out, eager_out in zip(outputs, expected, strict=True):
        assert graph_out.token_ids == eager_out.token_ids
        graph_logprobs = [lp.logprob for lp in graph_out.logprobs]
        assert graph_logprobs == pytest.approx([lp.logprob for lp in eager_out.logprobs], abs=1e-5)


def test_graph_steps_copy_a_table_again_once_its_block_list_is_replaced(
    tiny_models: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`DecodeGraphs` keeps each request's block table on the device and sends only the entries it gained; a request
    whose block list was replaced (blocks freed and taken again: preemption, rejected drafts) has its table copied
    again. Over random K/V (every block different), each graph step's logprobs are an eager step's over the same
    blocks, and differ once the blocks do."""
    from ember.engine.engine import LLM
    from ember.engine.request import Request
    from ember.engine.sampling_params import SamplingParams
    from ember.engine.scheduler import ScheduledRequest

    monkeypatch.setenv("EMBER_KERNELS", "triton")
    runner = LLM(str(tiny_models["qwen3"][0]), num_blocks=16, dtype="float32", max_num_seqs=2).engine.runner
    graphs = runner.decode_graphs
    assert graphs is not None
    generator = torch.Generator().manual_seed(0)
    for k_cache, v_cache in runner.kv_caches:
        k_cache.copy_(torch.randn(k_cache.shape, generator=generator))
        v_cache.copy_(torch.randn(v_cache.shape, generator=generator))
    tokens = list(range(3, 43))
    request = Request("r#0", tokens, SamplingParams(temperature=0, logprobs=1), [], 64)

    def step(start: int) -> tuple[float, float]:
        """The top logprob of the token after `start` (the request's last), by a graph step and by an eager one."""
        request.all_token_ids = tokens[: start + 1]
        scheduled = [ScheduledRequest(request, start, 1)]
        graph = runner.execute(scheduled).sampled["r#0"][1][0]
        runner.decode_graphs = None
        try:
            eager = runner.execute(scheduled).sampled["r#0"][1][0]
        finally:
            runner.decode_graphs = graphs
        assert graph is not None and eager is not None
        return graph.logprob, eager.logprob

    request.block_ids = [3, 5]
    first = step(20)
    request.block_ids.append(8)  # appended in place: only the new entry is sent
    appended = step(33)
    request.block_ids = [9, 2, 8]  # replaced: copied again
    replaced = step(33)
    for graph, eager in (first, appended, replaced):
        assert graph == pytest.approx(eager, abs=1e-5)
    assert replaced[1] != pytest.approx(appended[1], abs=1e-3)  # other blocks, another answer
    assert graphs.replays[1] == 3


def test_seeded_speculative_sampling_with_logprobs_runs_on_the_device(tiny_models: dict) -> None:
    """Sampling with a seed (a CPU generator) verifies drafts on the device's logits, and logprobs of the
    accepted tokens are gathered there: reproducible, one logprob per token, each consistent with its top-2."""
    from ember.engine.engine import LLM
    from ember.engine.sampling_params import SamplingParams

    path = str(tiny_models["qwen3"][0])
    llm = LLM(path, num_blocks=64, dtype="float32", device=DEVICE, speculative=f"draft:{path}")  # drafts every step
    prompt = [5, 6, 7, 8] * 6
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=3, logprobs=2, ignore_eos=True)
    first, again = (llm.generate([prompt], params)[0] for _ in range(2))
    assert first.num_draft_tokens > 0
    tokens = first.outputs[0].token_ids
    assert len(tokens) == 16 and tokens == again.outputs[0].token_ids
    logprobs = first.outputs[0].logprobs or []
    assert [lp.token_id for lp in logprobs] == tokens
    for lp in logprobs:  # the chosen token's logprob is the top one's when it ranks first, else at most that
        assert len(lp.top) == 2 and lp.logprob <= lp.top[0][1] + 1e-6
        assert (lp.rank == 1) == (lp.token_id == lp.top[0][0]) or lp.logprob == pytest.approx(lp.top[0][1])


def test_graph_batch_padding_stores_nothing(tiny_models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three decodes padded to a batch of four write the KV cache at their own three slots only."""
    from ember.engine.model_runner import ModelRunner
    from ember.engine.request import Request
    from ember.engine.sampling_params import SamplingParams
    from ember.engine.scheduler import ScheduledRequest
    from ember.models.loader import load_model

    monkeypatch.setenv("EMBER_KERNELS", "triton")
    model = load_model(str(tiny_models["qwen3"][0]), "auto", torch.float32, DEVICE).model
    runner = ModelRunner(model, 16, 16, DEVICE, torch.float32, graph_max_batch=8)
    tables = {5: [3], 20: [7, 2], 33: [9, 4, 11]}  # prompt length -> blocks; its last token is decoded
    scheduled = []
    for i, (length, blocks) in enumerate(tables.items()):
        request = Request(str(i), list(range(3, 3 + length)), SamplingParams(temperature=0), [], 4)
        request.block_ids = blocks
        scheduled.append(ScheduledRequest(request, length - 1, 1))
    before = runner.kv_cache.clone()
    result = runner.execute(scheduled)
    assert runner.decode_graphs is not None and dict(runner.decode_graphs.replays) == {4: 1}
    assert sorted(result.sampled) == ["0", "1", "2"]
    after = runner.kv_cache.clone()
    changed = (after != before).transpose(0, 3).flatten(1).sum(1)  # per block
    layers, _, kv_heads, _, _, head_dim = runner.kv_cache.shape
    assert changed.nonzero().flatten().tolist() == [2, 3, 11]
    assert changed.max().item() <= layers * 2 * kv_heads * head_dim  # one token's keys and values per block
    # what warm-up and capture run: a batch of padding rows alone stores nothing and computes finite states
    runner.decode_graphs._pad(8)
    hidden = runner.decode_graphs._forward(8)()
    assert torch.equal(runner.kv_cache, after) and hidden.shape[0] == 8 and bool(hidden.isfinite().all())


def run_to_end(engine: Any, prompts: list[list[int]], params: list[Any], abort_at: int | None = None) -> list[Any]:
    """Add the requests, step until all end (aborting the second after `abort_at` steps); their Requests."""
    ids = [engine.add_request(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
    requests = [engine.groups[i].children[0] for i in ids]
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        if steps == abort_at:
            engine.abort_request(ids[1])
    return requests


def test_async_scheduling_gives_the_tokens_of_plain_steps(tiny_models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode steps scheduled and launched behind the step in flight (input tokens taken on the device): with
    requests ending on length and on a stop token while a step is in flight, one whose logprobs force plain
    steps for a while, a seeded sampled one, and an abort, the tokens are those of plain steps, every block is
    freed, and no prefix-cache hash was taken over a placeholder."""
    from ember.engine.block_pool import hash_block
    from ember.engine.engine import LLM
    from ember.engine.sampling_params import SamplingParams

    path = str(tiny_models["qwen3"][0])
    prompts = [list(range(3, 3 + n)) for n in (4, 19, 33, 7, 12)]

    def params(stop: int | None = None) -> list[SamplingParams]:
        return [
            SamplingParams(max_tokens=m, temperature=0.8 if i == 4 else 0, seed=3, ignore_eos=True,
                           logprobs=1 if i == 0 else None, stop_token_ids=[stop] if i == 3 and stop else [])
            for i, m in enumerate((3, 21, 14, 19, 17))
        ]  # fmt: skip

    plain = LLM(path, num_blocks=40, dtype="float32", max_num_seqs=8).engine  # the default path: greedy tokens agree
    stop = run_to_end(plain, prompts, params())[3].output_token_ids[6]  # request 3 stops at its 7th token or before
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    results = {}
    for async_scheduling in (False, None):  # None, the default: on, since decode steps replay graphs here
        engine = LLM(path, num_blocks=40, dtype="float32", max_num_seqs=8, async_scheduling=async_scheduling).engine
        requests = run_to_end(engine, prompts, params(stop), abort_at=8)
        results[async_scheduling] = [(r.output_token_ids, r.finish_reason) for r in requests]
        assert engine.kv_cache.pool.num_free_blocks == 40 and not engine.scheduler.running
        for r in requests:
            hashes, parent = [], None
            for start in range(0, len(r.all_token_ids) - 15, 16):
                parent = hash_block(parent, tuple(r.all_token_ids[start : start + 16]))
                hashes.append(parent)
            assert r.block_hashes == hashes[: len(r.block_hashes)] and r.num_pending_tokens == 0
    assert engine.async_scheduling and engine.num_overlapped_steps > 10
    assert results[None] == results[False]
    assert results[None][3][1] == "stop" and results[None][1][1] == "abort"


@pytest.mark.skipif(DEVICE != "cuda", reason="stream order: a GPU only")
def test_launched_step_reads_back_without_waiting_for_the_work_queued_behind_it() -> None:
    """Async scheduling reads step N's tokens after step N+1 is queued: reading must not wait for N+1."""
    from ember.engine.model_runner import LaunchedStep

    launched = LaunchedStep.start([], torch.arange(8, device="cuda"))
    torch.cuda._sleep(1_000_000_000)  # about half a second of device work queued behind, like step N+1
    behind = torch.cuda.Event()
    behind.record()
    assert launched.token_ids() == list(range(8))
    assert not behind.query()  # read back while the work behind it still runs
    torch.cuda.synchronize()


@pytest.mark.skipif(DEVICE != "cuda", reason="device synchronization: a GPU only")
@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 0}, {"temperature": 1.0}, {"temperature": 0.7, "top_k": 20, "top_p": 0.9}, {"top_p": 0.5}],
)
def test_async_decode_steps_do_not_synchronize_the_device(tiny_models: dict, sampling: dict[str, Any]) -> None:
    """Issue #7's rule: no host-device synchronization inside a decode step but the read-back of its sampled tokens
    (an event the step recorded, which PyTorch's sync debug mode does not count). Under that mode set to "error",
    steady-state steps schedule, launch, sample (greedy, the Gumbel race, top-k/top-p thresholds; one row seeded)
    and read back with no stream or device synchronize and no blocking copy."""
    from ember.engine.engine import LLM
    from ember.engine.sampling_params import SamplingParams

    engine = LLM(str(tiny_models["qwen3"][0]), num_blocks=128, dtype="bfloat16", device="cuda", max_num_seqs=8).engine
    assert engine.async_scheduling
    for i, n in enumerate((5, 17, 30, 9)):
        params = SamplingParams(max_tokens=40, ignore_eos=True, seed=7 if i == 1 else None, **sampling)
        engine.add_request(list(range(3, 3 + n)), params)
    for _ in range(8):  # prompts, then the first overlapped steps (bounded: 40 tokens each)
        engine.step()
    assert engine._in_flight is not None
    overlapped = engine.num_overlapped_steps
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert engine.num_overlapped_steps == overlapped + 10
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_cache.pool.num_free_blocks == 128


def test_async_scheduling_without_graphs_warns_when_asked_for_and_runs_plain_steps(
    tiny_models: dict, caplog: pytest.LogCaptureFixture
) -> None:
    from ember.engine.engine import LLM

    path = str(tiny_models["qwen3"][0])
    with caplog.at_level("WARNING"):
        llm = LLM(path, num_blocks=16, dtype="float32", device="cpu")  # by default: off here, silently
    assert not llm.engine.async_scheduling and "async scheduling" not in caplog.text
    with caplog.at_level("WARNING"):
        llm = LLM(path, num_blocks=16, dtype="float32", device="cpu", async_scheduling=True)
    assert not llm.engine.async_scheduling and "async scheduling needs CUDA-graph decode steps" in caplog.text


def test_triton_kernels_on_the_cpu_without_the_interpreter_are_a_clear_error(
    tiny_models: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not Triton's "0 active drivers" at the first step: a message at start-up saying what to set."""
    from ember.engine.engine import LLM

    monkeypatch.setenv("EMBER_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        LLM(str(tiny_models["qwen3"][0]), num_blocks=16, dtype="float32", device="cpu")


def test_predicted_outputs_still_draft_under_async_scheduling(
    tiny_models: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request with a predicted output steps plainly (its drafts need its tokens); the rest of the batch and
    later requests overlap as before, and every output is the one of plain steps."""
    from ember.engine.engine import LLM
    from ember.engine.sampling_params import SamplingParams

    path = str(tiny_models["qwen3"][0])
    prompts = [list(range(3, 3 + n)) for n in (9, 14)]
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(path, num_blocks=40, dtype="float32").generate(prompts, greedy)]
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    llm = LLM(path, num_blocks=40, dtype="float32", max_num_seqs=8)
    predicted = SamplingParams(**{**greedy.__dict__, "prediction": expected[0]})
    right, plain = llm.generate(prompts, [predicted, greedy])
    assert [right.outputs[0].token_ids, plain.outputs[0].token_ids] == expected
    assert right.num_draft_tokens == right.num_accepted_tokens > 0
    overlapped = llm.engine.num_overlapped_steps
    alone = llm.generate(prompts[1:], greedy)[0]  # no prediction in the batch: steps overlap
    assert alone.outputs[0].token_ids == expected[1] and llm.engine.num_overlapped_steps - overlapped > 10
