"""Triton kernels for paged attention: the CUDA path of the engine (and, under TRITON_INTERPRET=1, testable
on the CPU against `ember.attention.torch_paged`).

The cache layout is the one of `torch_paged` (keys [kv_heads, blocks, dim / P, block, P], values
[kv_heads, blocks, block / P, dim, P], P elements per 32-bit word): a kernel always loads whole blocks,
which are contiguous, so the permutation inside a block costs no coalescing.

- `write_kv`: scatter a step's new K/V to their slots.
- `paged_decode_attention`: flash-decoding. A program per (sequence, KV head, context split), the longest
  contexts' first: each reads each K/V block of its part of the context once for all the query heads of its
  GQA group and keeps an online softmax; a second kernel merges the splits by their log-sum-exp. The split
  count depends on the batch only (each context is cut into that many parts), so one CUDA graph serves every
  context length.
  Under a sliding window only the blocks of the window are read and cut into parts.
- `paged_prefill_attention`: causal attention of ragged query chunks over their paged context (cached
  prefix plus the chunk itself), all chunks of a step in one launch. Grid (head, query tile), the tiles that
  see the most keys first.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ember.attention.layout import cache_geometry
from ember.kernels import device_tensor
from ember.kernels.attention_tuning import AttentionTuning, tuning_for

# Triton's interpreter (TRITON_INTERPRET=1, the CPU test mode) multiplies bf16 dot operands as raw bits:
# there, dots take fp32 operands. Compiled kernels keep bf16 operands for the tensor cores.
DOT_IN_FP32 = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _key_offsets(tok, dims, BS: tl.constexpr, P: tl.constexpr):
    """Offsets inside a key block of (token, dim) pairs: [kv_heads, blocks, dim / P, BS, P] layout."""
    return slot_key_offsets(tok[:, None], dims[None, :], BS, P)


@triton.jit
def _value_offsets(tok, dims, D: tl.constexpr, P: tl.constexpr):
    """Offsets inside a value block of (token, dim) pairs: [kv_heads, blocks, BS / P, dim, P] layout."""
    return slot_value_offsets(tok[:, None], dims[None, :], D, P)


@triton.jit
def _write_kv_kernel(
    k, v, k_cache, v_cache, slots, NB, KVH, BS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, HEADS: tl.constexpr
):  # fmt: skip
    """One program per new token stores all its KV heads: a [heads, dim] tile, so each thread moves 16 bytes
    of the token's keys and values (a program per head left one 2-byte element per thread)."""
    t = tl.program_id(0)
    slot = tl.load(slots + t)
    block = slot // BS
    offset = slot % BS
    heads = tl.arange(0, HEADS)[:, None]
    dims = tl.arange(0, D)[None, :]
    # slot -1: a padding row of a CUDA-graph batch, stores nothing (the slot test is a tensor: Triton's
    # interpreter turns a tensor & a scalar bool into int32)
    store = (heads < KVH) & (dims * 0 + slot >= 0)
    row = (t * KVH + heads) * D + dims
    base = (heads * NB + block) * D * BS
    keys = to_cache_dtype(tl.load(k + row, mask=store), k_cache.dtype.element_ty)
    values = to_cache_dtype(tl.load(v + row, mask=store), v_cache.dtype.element_ty)
    tl.store(k_cache + base + slot_key_offsets(offset, dims, BS, P), keys, mask=store)
    tl.store(v_cache + base + slot_value_offsets(offset, dims, D, P), values, mask=store)


@triton.jit
def to_cache_dtype(x, dtype: tl.constexpr):
    """x as the cache's elements. Into float8 e4m3: rounded to the nearest (ties to even) in fp32 first, and
    saturated at +-448 (no infinity), as PyTorch's cast and the GPU's `satfinite` conversion do; the cast is then
    exact everywhere (Triton's interpreter rounds ties up and drops the carry: 1.9375 became 1.0, and 1,000 256)."""
    if dtype == tl.float8e4nv:
        x = tl.minimum(tl.maximum(x.to(tl.float32), -448.0), 448.0)
        bits = x.to(tl.uint32, bitcast=True)
        # a float8's step is 2^(e - 3) at binary exponent e >= -6, and 2^-9 below (its subnormals): adding and
        # taking away 2^(e + 20) (x's sign) rounds x to that step, ties to even
        exponent = tl.maximum((bits >> 23) & 0xFF, 127 - 6)
        magic = ((bits & 0x80000000) | ((exponent + 20) << 23)).to(tl.float32, bitcast=True)
        x = (x + magic) - magic
    return x.to(dtype)


@triton.jit
def slot_key_offsets(offset, dims, BS: tl.constexpr, P: tl.constexpr):
    """Offsets inside a key block of the dims `dims` of the tokens at `offset` in the block (broadcast)."""
    return ((dims // P) * BS + offset) * P + dims % P


@triton.jit
def slot_value_offsets(offset, dims, D: tl.constexpr, P: tl.constexpr):
    return ((offset // P) * D + dims) * P + offset % P


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new keys/values [T, kv_heads, head_dim] at their slots (negative slots are skipped)."""
    if k.shape[0] == 0:
        return
    kv_heads, num_blocks, block_size, head_dim, pack = cache_geometry(v_cache)
    _write_kv_kernel[(k.shape[0],)](
        k.contiguous(), v.contiguous(), k_cache, v_cache, slot_mapping, num_blocks, kv_heads,
        BS=block_size, D=head_dim, P=pack, HEADS=triton.next_power_of_2(kv_heads),
    )  # fmt: skip


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """fp32-accumulated a @ b; fp32 operands multiply in full precision (not TF32) when IEEE."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b).to(tl.float32)


@triton.jit
def _softmax_step(qv, keys, visible, m_i, scale, DOT_FP32: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr):
    """An online softmax's step over a tile of keys [N, D]: the scores of the query rows `qv` [M, D] where
    `visible` ([M or 1, N]); (the new running max, the tile's probabilities, the factor that rescales what
    came before). A row with no visible key yet keeps a max of -inf."""
    if DOT_FP32:
        keys = keys.to(tl.float32)
    scores = _dot(qv, tl.trans(keys), IEEE) * scale  # [M, N]
    if SOFTCAP > 0:  # Gemma 2's: SOFTCAP * tanh(scores / SOFTCAP), tanh from a sigmoid (Triton has no tanh)
        scores = SOFTCAP * (2.0 * tl.sigmoid(2.0 * scores / SOFTCAP) - 1.0)
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp(scores - m_safe[:, None]), tl.exp(m_i - m_safe)


@triton.jit
def _accumulate(values, probs, alpha, l_i, acc, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """The normalizer and output after a tile: the earlier ones rescaled by `alpha`, plus its `probs` and
    `probs @ values`."""
    if DOT_FP32:
        values = values.to(tl.float32)
    return l_i * alpha + tl.sum(probs, axis=1), acc * alpha[:, None] + _dot(probs.to(values.dtype), values, IEEE)


@triton.jit
def _attend_tile(
    qv, keys, values, visible, m_i, l_i, acc, scale, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    SOFTCAP: tl.constexpr,
):  # fmt: skip
    """One tile of keys and values ([N, D] each, loaded) in the online softmax: (max, normalizer, output)."""
    m_new, probs, alpha = _softmax_step(qv, keys, visible, m_i, scale, DOT_FP32, IEEE, SOFTCAP)
    l_i, acc = _accumulate(values, probs, alpha, l_i, acc, DOT_FP32, IEEE)
    return m_new, l_i, acc


@triton.jit
def _attend_block(
    qv, k_cache, v_cache, base, visible, m_i, l_i, acc, scale, tok, dims,
    BS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    SOFTCAP: tl.constexpr,
):  # fmt: skip
    """The K/V block at `base` ([BS, D] each) in the online softmax: (max, normalizer, output). Its values are
    loaded after the scores, the order the decode kernel's launch options were tuned with."""
    keys = tl.load(k_cache + base + _key_offsets(tok, dims, BS, P)).to(qv.dtype)  # (from a float8 cache)
    m_new, probs, alpha = _softmax_step(qv, keys, visible, m_i, scale, DOT_FP32, IEEE, SOFTCAP)
    values = tl.load(v_cache + base + _value_offsets(tok, dims, D, P)).to(qv.dtype)
    l_i, acc = _accumulate(values, probs, alpha, l_i, acc, DOT_FP32, IEEE)
    return m_new, l_i, acc


@triton.jit
def _pipelined_trips(
    qv, m_i, l_i, acc, k_cache, v_cache, row_table, kv_base, first, last, scale, tok, dims,
    length, start, positions, row_ok, WINDOW, CAUSAL: tl.constexpr,
    BS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
    SOFTCAP: tl.constexpr,
):  # fmt: skip
    """The online softmax (max, normalizer, output) carried over the blocks [first, last) of a block-table row, one
    block a trip, software-pipelined by hand: a trip loads its keys together with the next block's values and the
    table entry of the block after, so it waits on one memory latency. One block at a time, a trip waited on
    three in a row: its table entry, its keys, then its values after the scores (sm_90 SASS). Visible keys: below
    `length` and from `start` on (decode), or causal to the query `positions` (CAUSAL: prefill; `length` the
    context, under its sliding WINDOW). Each block's base is a scalar: 16-byte vector loads in the CUDA layout
    (a per-token base defeats Triton's contiguity analysis: 2-byte loads, checked in the PTX)."""
    block = tl.load(row_table + first, mask=first < last, other=0)
    block_next = tl.load(row_table + first + 1, mask=first + 1 < last, other=0)
    value_offsets = _value_offsets(tok, dims, D, P)
    # masks along dims, constant along the tokens a value load vectorizes (a tensor: Triton's interpreter turns a
    # tensor & a scalar bool into int32)
    values = tl.load(v_cache + (kv_base + block) * D * BS + value_offsets, mask=(dims * 0 + first < last)[None, :])
    for page in range(first, last):
        # issued before the keys' load: Triton stages the keys for the product through shared memory right behind
        # their load, a wait that loads issued after it would queue behind
        values_next = tl.load(
            v_cache + (kv_base + block_next) * D * BS + value_offsets, mask=(dims * 0 + page + 1 < last)[None, :]
        )
        block_after = tl.load(row_table + page + 2, mask=page + 2 < last, other=0)
        keys = tl.load(k_cache + (kv_base + block) * D * BS + _key_offsets(tok, dims, BS, P))
        key_pos = page * BS + tok
        if CAUSAL:
            visible = _prefill_visible(key_pos, positions, length, row_ok, WINDOW)
        else:
            visible = ((key_pos < length) & (key_pos >= start))[None, :]
        m_i, l_i, acc = _attend_tile(
            qv, keys.to(qv.dtype), values.to(qv.dtype), visible, m_i, l_i, acc, scale, DOT_FP32, IEEE, SOFTCAP
        )  # (from a float8 cache)
        values, block, block_next = values_next, block_next, block_after
    return m_i, l_i, acc


@triton.jit
def _page_entries(row_table, page, last, PAGES: tl.constexpr):
    """The block-table entries of the PAGES logical pages from `page` (block 0 from `last` on), and which are real."""
    pages = page + tl.arange(0, PAGES)
    page_ok = pages < last
    return tl.load(row_table + pages, mask=page_ok, other=0), page_ok


@triton.jit
def _load_pages(
    k_cache, v_cache, blocks, page_ok, kv_base, tok, dims,
    PAGES: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, P: tl.constexpr, dtype: tl.constexpr,
):  # fmt: skip
    """The keys and values ([PAGES * BS, D] each, as `dtype`) of the PAGES `blocks` (zeros where not `page_ok`, for
    the caller to mask): a program has PAGES blocks in flight. Triton stages each for its product through shared
    memory right behind its load, so the values' load waits for the keys' (sm_90 SASS: two latencies a trip, the
    table entries loaded a trip ahead by the caller). The loads are [PAGES, BS, D] tiles: each block's base is
    constant along the vectorized axes, so they stay 16-byte vectors (a [PAGES * BS] per-token base would not),
    and are flattened for the products."""
    base = (kv_base + blocks) * D * BS
    ok = page_ok[:, None, None]
    keys = tl.load(k_cache + base[:, None, None] + _key_offsets(tok, dims, BS, P)[None, :, :], mask=ok, other=0.0)
    values = tl.load(v_cache + base[:, None, None] + _value_offsets(tok, dims, D, P)[None, :, :], mask=ok, other=0.0)
    return tl.reshape(keys, (PAGES * BS, D)).to(dtype), tl.reshape(values, (PAGES * BS, D)).to(dtype)


# Integer arguments that change from step to step (a table's width, the split count) are not specialized:
# Triton compiles a variant per value class (1, a multiple of 16, other), and a new class showing up mid-run
# would compile inside a step; none of them feeds a vectorized address.
@triton.jit(do_not_specialize=["MAXB", "SPLITS", "WINDOW"])
def _decode_split_kernel(
    q, k_cache, v_cache, tables, lens, order, out, mid_out, mid_lse, scale,
    H, KVH, NB, MAXB, SPLITS, WINDOW,
    G: tl.constexpr, G_PAD: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    PAGES: tl.constexpr, PREFETCH: tl.constexpr, DIRECT: tl.constexpr, ORDERED: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """The query heads of one KV head are the rows of matrix products (padded to G_PAD >= 16, the least
    `tl.dot` takes): the tensor cores do the work, and each K/V tile is loaded once for all of them. PAGES
    blocks per loop trip (`_load_pages`), or one. Grid (split, KV head, row rank), launched in that order (the
    first axis fastest): all the programs of a rank start together, its row read from `order` when ORDERED, so
    the longest contexts' programs start first and the short ones fill the end, instead of a long one last."""
    split = tl.program_id(0)
    kh = tl.program_id(1)
    rank = tl.program_id(2)
    b = tl.load(order + rank) if ORDERED else rank
    length = tl.load(lens + b)
    start = tl.maximum(length - WINDOW, 0)  # the first key the query sees
    num_pages = tl.cdiv(length, BS)
    start_page = start // BS
    split_pages = tl.cdiv(num_pages - start_page, SPLITS)  # each sequence's own context is cut into SPLITS parts
    first = start_page + split * split_pages
    last = tl.minimum(first + split_pages, num_pages)
    heads = tl.arange(0, G_PAD)
    head_ok = heads < G
    dims = tl.arange(0, D)
    tok = tl.arange(0, BS)
    q_rows = (b * H + kh * G + heads) * D
    qv = tl.load(q + q_rows[:, None] + dims[None, :], mask=head_ok[:, None], other=0.0)
    if DOT_FP32:
        qv = qv.to(tl.float32)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    if PAGES == 1 and PREFETCH:
        m_i, l_i, acc = _pipelined_trips(
            qv, m_i, l_i, acc, k_cache, v_cache, tables + b * MAXB, kh * NB, first, last, scale, tok, dims,
            length, start, 0, 0, 0, False, BS, D, P, DOT_FP32, IEEE, SOFTCAP,
        )  # fmt: skip
    elif PAGES == 1:
        for page in range(first, last):
            block = tl.load(tables + b * MAXB + page)
            key_pos = page * BS + tok
            visible = ((key_pos < length) & (key_pos >= start))[None, :]
            m_i, l_i, acc = _attend_block(
                qv, k_cache, v_cache, (kh * NB + block) * D * BS, visible, m_i, l_i, acc, scale, tok, dims,
                BS, D, P, DOT_FP32, IEEE, SOFTCAP,
            )  # fmt: skip
    else:
        blocks, page_ok = _page_entries(tables + b * MAXB, first, last, PAGES)
        for page in range(first, last, PAGES):
            next_blocks, next_ok = _page_entries(tables + b * MAXB, page + PAGES, last, PAGES)  # the next trip's
            keys, values = _load_pages(k_cache, v_cache, blocks, page_ok, kh * NB, tok, dims, PAGES, BS, D, P, qv.dtype)
            key_pos = page * BS + tl.arange(0, PAGES * BS)
            visible = ((key_pos < length) & (key_pos >= start) & (key_pos < last * BS))[None, :]
            m_i, l_i, acc = _attend_tile(qv, keys, values, visible, m_i, l_i, acc, scale, DOT_FP32, IEEE, SOFTCAP)
            blocks, page_ok = next_blocks, next_ok
    has_keys = l_i > 0
    result = acc / tl.where(has_keys, l_i, 1.0)[:, None]  # a context of length 0 (a padding row) gives zeros
    if DIRECT:  # one split: this program's result is the output
        tl.store(out + q_rows[:, None] + dims[None, :], result.to(out.dtype.element_ty), mask=head_ok[:, None])
    else:
        rows = (b * H + kh * G + heads) * SPLITS + split
        tl.store(mid_out + rows[:, None] * D + dims[None, :], result, mask=head_ok[:, None])
        lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(mid_lse + rows, lse, mask=head_ok)


@triton.jit(do_not_specialize=["SPLITS"])
def _decode_merge_kernel(mid_out, mid_lse, out, SPLITS, S_PAD: tl.constexpr, D: tl.constexpr):
    row = tl.program_id(0)  # (sequence, head)
    splits = tl.arange(0, S_PAD)
    ok = splits < SPLITS
    lse = tl.load(mid_lse + row * SPLITS + splits, mask=ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    weights = tl.where(ok & (lse > float("-inf")), tl.exp(lse - tl.where(top > float("-inf"), top, 0.0)), 0.0)
    total = tl.sum(weights, axis=0)
    dims = tl.arange(0, D)
    parts = tl.load(mid_out + (row * SPLITS + splits)[:, None] * D + dims[None, :], mask=ok[:, None], other=0.0)
    merged = tl.sum(parts * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out + row * D + dims, merged.to(out.dtype.element_ty))


MAX_DECODE_SPLITS = 32


def pipelined(q: torch.Tensor, enabled: bool) -> bool:
    """Whether an attention kernel's one-block trips are software-pipelined (`_pipelined_trips`): as `enabled`
    (`AttentionTuning.decode_prefetch`, `.prefill_prefetch`), up to head_dim 128 and not for compiled fp32 (the GPU
    tests' dtype), whose larger tiles spill registers with it on sm_90 (fp32 prefill: 255 registers and a spill;
    Gemma's head_dim 256 prefill: 132 bytes spilled with Triton 3.6)."""
    return enabled and q.shape[-1] <= 128 and (DOT_IN_FP32 or q.dtype != torch.float32)


NO_WINDOW = 1 << 30  # "no sliding window" as a window past any context: the kernels need no branch for it


@functools.cache
def _parallel_units(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return os.cpu_count() or 1


def decode_splits(num_seqs: int, kv_heads: int, device: torch.device, tuning: AttentionTuning | None = None) -> int:
    """Context splits per sequence: enough programs for about `programs_per_sm` per SM (of `tuning`, default the
    device's), at most MAX_DECODE_SPLITS.

    A function of the batch alone, so a CUDA graph captured for a batch size fits every later context.
    """
    per_sm = (tuning or tuning_for(device)).programs_per_sm
    return max(1, min(MAX_DECODE_SPLITS, per_sm * _parallel_units(device) // (num_seqs * kv_heads)))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    window: int = 0,
    softcap: float = 0.0,
    out: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
    tuning: AttentionTuning | None = None,
) -> torch.Tensor:
    """Single-token queries [D, heads, head_dim] over their paged contexts (their last `window` tokens under a
    sliding window; 0: all; scores capped at `softcap`, 0: not), each context cut into `num_splits` parts
    (default: `decode_splits`) merged by log-sum-exp. A context length of 0 gives zeros. The result goes to `out`
    (contiguous) when given. `order` ([D] row indices, e.g. by decreasing context length): the order the rows'
    programs start in (default: the rows' own). `tuning`: the launch options (default: the device's,
    `attention_tuning.tuning_for`)."""
    num_seqs, num_heads, head_dim = q.shape
    kv_heads, num_blocks, block_size, _, pack = cache_geometry(v_cache)
    group = num_heads // kv_heads
    tuning = tuning or tuning_for(q.device, k_cache.dtype)
    splits = num_splits or decode_splits(num_seqs, kv_heads, q.device, tuning)
    q = q.contiguous()
    out = torch.empty_like(q) if out is None else out
    mid_out = mid_lse = out  # unused when there is one split
    if splits > 1:
        mid_out = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(num_seqs, num_heads, splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(splits, kv_heads, num_seqs)](
        q, k_cache, v_cache, block_tables, context_lens, context_lens if order is None else order, out, mid_out,
        mid_lse, scale,
        num_heads, kv_heads, num_blocks, block_tables.shape[1], splits, window or NO_WINDOW,
        G=group, G_PAD=max(16, triton.next_power_of_2(group)), BS=block_size, D=head_dim, P=pack,
        PAGES=tuning.decode_pages, PREFETCH=pipelined(q, tuning.decode_prefetch), DIRECT=splits == 1,
        ORDERED=order is not None, DOT_FP32=DOT_IN_FP32, IEEE=q.dtype == torch.float32, SOFTCAP=float(softcap),
        num_warps=tuning.decode_warps, num_stages=tuning.decode_stages,
    )  # fmt: skip
    if splits > 1:
        _decode_merge_kernel[(num_seqs * num_heads,)](
            mid_out, mid_lse, out, splits, S_PAD=triton.next_power_of_2(splits), D=head_dim
        )
    return out


@triton.jit
def _prefill_visible(key_pos, positions, ctx, row_ok, WINDOW):
    """[rows, keys]: causal, within the sliding window, inside the context, for the tile's real rows."""
    in_window = key_pos[None, :] > positions[:, None] - WINDOW
    return (key_pos[None, :] <= positions[:, None]) & in_window & (key_pos[None, :] < ctx) & row_ok[:, None]


@triton.jit(do_not_specialize=["MAXB", "WINDOW"])
def _prefill_kernel(
    q, k_cache, v_cache, out, tables, tile_seq, tile_first, q_starts, q_lens, ctx_lens, scale,
    H, KVH, NB, MAXB, WINDOW,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
    PAGES: tl.constexpr, PREFETCH: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """A BLOCK_M-row query tile of one chunk and head against its keys, one block (PAGES blocks) per trip. Grid
    (head, tile), the first axis launched fastest: a tile's heads start together (a KV head's query heads read
    its blocks close in time), tiles in `prefill_launch`'s order, the most keys first."""
    h = tl.program_id(0)
    tile = tl.program_id(1)
    kh = h // G
    seq = tl.load(tile_seq + tile)
    first = tl.load(tile_first + tile)
    q_start = tl.load(q_starts + seq)
    q_len = tl.load(q_lens + seq)
    ctx = tl.load(ctx_lens + seq)
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    positions = ctx - q_len + rows  # absolute position of each query token
    dims = tl.arange(0, D)
    tok = tl.arange(0, BS)
    q_off = ((q_start + rows) * H + h) * D
    qv = tl.load(q + q_off[:, None] + dims[None, :], mask=row_ok[:, None], other=0.0)
    if DOT_FP32:
        qv = qv.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    last_position = tl.minimum(ctx - q_len + first + BLOCK_M, ctx)  # keys past the tile's last query are masked
    first_key = tl.maximum(ctx - q_len + first - WINDOW + 1, 0)  # keys before the tile's first window are too
    last_page = tl.cdiv(last_position, BS)
    if PAGES == 1 and PREFETCH:
        m_i, l_i, acc = _pipelined_trips(
            qv, m_i, l_i, acc, k_cache, v_cache, tables + seq * MAXB, kh * NB, first_key // BS, last_page, scale,
            tok, dims, ctx, 0, positions, row_ok, WINDOW, True, BS, D, P, DOT_FP32, IEEE, SOFTCAP,
        )  # fmt: skip
    elif PAGES == 1:
        for blk in range(first_key // BS, last_page):
            block = tl.load(tables + seq * MAXB + blk)
            visible = _prefill_visible(blk * BS + tok, positions, ctx, row_ok, WINDOW)
            m_i, l_i, acc = _attend_block(
                qv, k_cache, v_cache, (kh * NB + block) * D * BS, visible, m_i, l_i, acc, scale, tok, dims,
                BS, D, P, DOT_FP32, IEEE, SOFTCAP,
            )  # fmt: skip
    else:
        blocks, page_ok = _page_entries(tables + seq * MAXB, first_key // BS, last_page, PAGES)
        for blk in range(first_key // BS, last_page, PAGES):
            next_blocks, next_ok = _page_entries(tables + seq * MAXB, blk + PAGES, last_page, PAGES)  # the next trip's
            keys, values = _load_pages(k_cache, v_cache, blocks, page_ok, kh * NB, tok, dims, PAGES, BS, D, P, qv.dtype)
            visible = _prefill_visible(blk * BS + tl.arange(0, PAGES * BS), positions, ctx, row_ok, WINDOW)
            m_i, l_i, acc = _attend_tile(qv, keys, values, visible, m_i, l_i, acc, scale, DOT_FP32, IEEE, SOFTCAP)
            blocks, page_ok = next_blocks, next_ok
    result = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out + q_off[:, None] + dims[None, :], result.to(out.dtype.element_ty), mask=row_ok[:, None])


@dataclass
class PrefillLaunch:
    """Per-step inputs of the prefill kernel, built once a step (not once a layer)."""

    tile_seq: torch.Tensor  # [tiles] chunk of each BLOCK_M query tile
    tile_first: torch.Tensor  # [tiles] its first query row within the chunk
    q_starts: torch.Tensor  # [chunks] first row of each chunk in q
    q_lens: torch.Tensor  # [chunks]
    context_lens: torch.Tensor  # [chunks] the chunk's last query sits at position context_len - 1
    block_m: int


def prefill_launch(
    q_starts: list[int], q_lens: list[int], context_lens: list[int], device: torch.device, block_m: int | None = None
) -> PrefillLaunch:
    """Query tiles of `block_m` rows (default: the device's `AttentionTuning.prefill_block_m`)."""
    block_m = block_m or tuning_for(device).prefill_block_m
    tiles = [(seq, first) for seq, length in enumerate(q_lens) for first in range(0, length, block_m)]
    # the tiles that see the most keys (a long cached prefix, the end of a long chunk) first: a long one started
    # last would set the kernel's end while the short ones had left the GPU idle
    keys = [context_lens[seq] - q_lens[seq] + min(first + block_m, q_lens[seq]) for seq, first in tiles]
    tiles = [tiles[i] for i in sorted(range(len(tiles)), key=keys.__getitem__, reverse=True)]
    seqs, firsts = [seq for seq, _ in tiles], [first for _, first in tiles]
    return PrefillLaunch(
        *(device_tensor(values, device) for values in (seqs, firsts, q_starts, q_lens, context_lens)), block_m
    )


# fp32 tiles hold twice the bytes of bf16 ones: at 4 warps ptxas spills registers on sm_90 (tests/test_triton_ptx.py)
PREFILL_WARPS_FP32 = 8


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    launch: PrefillLaunch,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
    out: torch.Tensor | None = None,
    tuning: AttentionTuning | None = None,
) -> torch.Tensor:
    """Causal attention of ragged chunks. q: [T, heads, head_dim] (chunk i at rows q_starts[i] ... + q_lens[i], its
    last query at position context_lens[i] - 1); K/V of every chunk already in the cache. Under a sliding window (0:
    none) a query at position p sees the keys after p - window; scores are capped at `softcap` (0: not). The result
    goes to `out` (contiguous) when given. `tuning`: the launch options (default: the device's,
    `attention_tuning.tuning_for`; the query-tile height is `launch`'s)."""
    _, num_heads, head_dim = q.shape
    kv_heads, num_blocks, block_size, _, pack = cache_geometry(v_cache)
    tuning = tuning or tuning_for(q.device, k_cache.dtype)
    q = q.contiguous()
    out = torch.empty_like(q) if out is None else out
    _prefill_kernel[(num_heads, len(launch.tile_seq))](
        q, k_cache, v_cache, out, block_tables, launch.tile_seq, launch.tile_first,
        launch.q_starts, launch.q_lens, launch.context_lens, scale,
        num_heads, kv_heads, num_blocks, block_tables.shape[1], window or NO_WINDOW,
        G=num_heads // kv_heads, BLOCK_M=launch.block_m, BS=block_size, D=head_dim, P=pack,
        PAGES=tuning.prefill_pages, PREFETCH=pipelined(q, tuning.prefill_prefetch), DOT_FP32=DOT_IN_FP32,
        IEEE=q.dtype == torch.float32, SOFTCAP=float(softcap),
        num_warps=PREFILL_WARPS_FP32 if q.dtype == torch.float32 else tuning.prefill_warps,
    )  # fmt: skip
    return out
