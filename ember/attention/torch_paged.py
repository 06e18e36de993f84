"""Paged attention in plain PyTorch: the CPU backend and the reference for the GPU kernels.

The KV cache layout is described in `ember.attention.layout`; heads are outermost so a request's blocks
gather into [kv_heads, context, head_dim].
Decode attention is bound by memory traffic: the C kernel reads each cached row once, the PyTorch
fallback here must gather (copy) the context first.
A step's tokens arrive flattened; decodes (one query token each) come first and are attended in one
batched matmul over their gathered blocks, prefill chunks follow, one SDPA call each.
A layer with a sliding window (`window` > 0) lets a query at position p see the keys after p - window only (as
HF's masks do); the KV cache keeps whole contexts either way, since other layers of the model may need them.
With `softcap` > 0 (Gemma 2) each scaled score s becomes softcap * tanh(s / softcap) before the softmax.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ember.attention import cpu_kernels


@dataclass
class PrefillSpan:
    """One request's chunk of query tokens: rows [start, start+length) attend to `context_len` keys."""

    start: int
    length: int
    context_len: int
    block_table: torch.Tensor  # [num_blocks_for_context] block ids
    causal_mask: torch.Tensor | None  # [length, context_len] bool, None when the chunk has no prefix


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot of every new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int64, padded with block 0
    decode_context_lens: torch.Tensor | None  # [num_decodes] int64
    prefills: list[PrefillSpan]
    block_size: int
    use_native_decode: bool  # Ember's C kernels (CPU, fp32/bf16) for cache writes and decode attention
    # table of each decode row when rows share one (prefill chunks as rows, speculative drafts); None: row i
    # reads table i
    decode_row_tables: torch.Tensor | None = None
    use_triton: bool = False  # Ember's Triton kernels (CUDA; the CPU under EMBER_KERNELS=triton)
    # [num_decodes] decode rows by decreasing context length (Triton path): the decode kernel starts the longest
    # rows' programs first, so that short ones fill the end (None: in row order)
    decode_order: torch.Tensor | None = None

    @functools.cached_property
    def prefill_launch(self) -> Any:
        """The Triton prefill kernel's per-step inputs (tiles, chunk offsets), built on first use."""
        from ember.kernels.triton_attention import prefill_launch

        spans, decodes = self.prefills, self.num_decode_tokens
        starts = [span.start - decodes for span in spans]
        lengths = [span.length for span in spans]
        contexts = [span.context_len for span in spans]
        return prefill_launch(starts, lengths, contexts, self.slot_mapping.device)

    @functools.cached_property
    def prefill_block_tables(self) -> torch.Tensor:
        """[num_prefills, max_blocks] block tables of the prefill chunks, padded with block 0 (Triton path)."""
        width = max(len(span.block_table) for span in self.prefills)
        tables = torch.zeros(len(self.prefills), width, dtype=torch.int64, device=self.slot_mapping.device)
        for i, span in enumerate(self.prefills):
            tables[i, : len(span.block_table)] = span.block_table
        return tables

    @property
    def decode_rows_share_requests(self) -> bool:
        """Rows of one request read each other's new K/V, so all are stored before any attends."""
        return self.decode_row_tables is not None

    @functools.cached_property
    def decode_row_block_tables(self) -> torch.Tensor:
        """[rows, max_blocks]: each decode row's block table (for the PyTorch and Triton paths)."""
        assert self.decode_block_tables is not None
        if self.decode_row_tables is None:
            return self.decode_block_tables
        return self.decode_block_tables.index_select(0, self.decode_row_tables)

    @functools.cached_property
    def decode_biases(self) -> dict[int, torch.Tensor]:
        """`decode_bias` by window, each built once a step."""
        return {}

    def decode_bias(self, window: int = 0) -> torch.Tensor:
        """[1, num_decodes, 1, max_blocks * block_size]: 0 inside each context (its last `window` tokens under a
        sliding window), -inf elsewhere."""
        if window in self.decode_biases:
            return self.decode_biases[window]
        assert self.decode_block_tables is not None and self.decode_context_lens is not None
        keys = torch.arange(self.decode_block_tables.shape[1] * self.block_size, device=self.slot_mapping.device)
        lens = self.decode_context_lens.unsqueeze(1)
        hidden = keys.unsqueeze(0) >= lens
        if window:
            hidden |= keys.unsqueeze(0) < lens - window
        bias = torch.zeros(len(self.decode_context_lens), len(keys), device=keys.device)
        bias.masked_fill_(hidden, float("-inf"))
        self.decode_biases[window] = bias = bias.view(1, len(self.decode_context_lens), 1, -1)
        return bias

    def prefill_mask(self, span: PrefillSpan, window: int) -> torch.Tensor | None:
        """The chunk's [length, context_len] mask (True: attends) with a sliding window applied (0: none); None
        when plain causal attention over the chunk itself is the mask."""
        if not window or span.context_len <= window:
            return span.causal_mask
        positions = torch.arange(span.context_len - span.length, span.context_len, device=self.slot_mapping.device)
        keys = torch.arange(span.context_len, device=positions.device)
        in_window = keys.unsqueeze(0) > positions.unsqueeze(1) - window
        causal = keys.unsqueeze(0) <= positions.unsqueeze(1)
        return causal & in_window


def block_keys(k_cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Keys of `blocks` as plain rows: [kv_heads, len(blocks) * block_size, head_dim]."""
    kv_heads, _, _, block_size, _ = k_cache.shape
    return k_cache.index_select(1, blocks).permute(0, 1, 3, 2, 4).reshape(kv_heads, len(blocks) * block_size, -1)


def block_values(v_cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Values of `blocks` as plain rows: [kv_heads, len(blocks) * block_size, head_dim]."""
    kv_heads, _, _, head_dim, _ = v_cache.shape
    return v_cache.index_select(1, blocks).transpose(3, 4).reshape(kv_heads, -1, head_dim)


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    use_native: bool,
) -> None:
    """Scatter new keys/values ([num_tokens, kv_heads, head_dim]) into the slots of `slot_mapping`."""
    if use_native:
        cpu_kernels.write_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    pack = k_cache.shape[-1]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache[:, blocks, :, offsets, :] = k.unflatten(2, (-1, pack))
    v_cache[:, blocks, offsets // pack, :, offsets % pack] = v


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Single-token queries [D, heads, head_dim] over their paged contexts, GQA without repeating K/V."""
    num_decodes, num_heads, head_dim = q.shape
    kv_heads = v_cache.shape[0]
    group = num_heads // kv_heads
    k = block_keys(k_cache, block_tables.flatten()).view(kv_heads, num_decodes, -1, head_dim)  # [kv_heads, D, L, d]
    v = block_values(v_cache, block_tables.flatten()).view(kv_heads, num_decodes, -1, head_dim)
    qg = q.view(num_decodes, kv_heads, group, head_dim).transpose(0, 1)  # [kv_heads, D, group, head_dim]
    scores = soft_cap(torch.matmul(qg, k.transpose(2, 3)).float() * scale, softcap)  # [kv_heads, D, group, L]
    probs = torch.softmax(scores + bias, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)  # [kv_heads, D, group, head_dim]
    return out.transpose(0, 1).reshape(num_decodes, num_heads, head_dim)


def soft_cap(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    return scores if not softcap else softcap * torch.tanh(scores / softcap)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, softcap: float = 0.0
) -> torch.Tensor:
    """Causal attention of one chunk ([Lq, heads, d]) over its keys ([kv_heads, Lk, d])."""
    if softcap:  # SDPA cannot cap scores: spelled out, in fp32
        group = q.shape[1] // k.shape[0]
        keys, values = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # [heads, Lk, d]
        scores = soft_cap(torch.matmul(q.transpose(0, 1), keys.transpose(1, 2)).float() * scale, softcap)
        if mask is None:
            mask = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool, device=q.device).tril(k.shape[1] - q.shape[0])
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).to(v.dtype)
        return torch.matmul(probs, values).transpose(0, 1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.unsqueeze(0),
        v.unsqueeze(0),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(0).transpose(0, 1)


def attend_decodes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Store the decode tokens' new K/V ([D, kv_heads, head_dim]) and attend their queries to their contexts."""
    assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
    slots = meta.slot_mapping[: len(k)]
    if meta.use_native_decode:
        new_kv: tuple[torch.Tensor | None, ...] = (k, v)  # the kernel stores them while their blocks are in cache
        if meta.decode_rows_share_requests:  # rows of one request read each other's K/V: store all first
            write_kv(k_cache, v_cache, k, v, slots, meta.block_size, use_native=True)
            new_kv = (None, None)
        tables, lens, rows = meta.decode_block_tables, meta.decode_context_lens, meta.decode_row_tables
        return cpu_kernels.paged_decode_attention(
            q, k_cache, v_cache, tables, lens, scale, *new_kv, rows, window, softcap
        )
    write_kv(k_cache, v_cache, k, v, slots, meta.block_size, use_native=False)
    tables = meta.decode_row_block_tables
    return decode_attention(q, k_cache, v_cache, tables, meta.decode_bias(window), scale, softcap)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend every query token to its request's context (to the
    keys after position - `window` under a sliding window; 0: all), scores capped at `softcap` (0: not).

    q: [num_tokens, heads, head_dim]; k, v: [num_tokens, kv_heads, head_dim]. Returns q's shape.
    """
    if meta.use_triton:
        from ember.attention.triton_paged import triton_paged_attention

        return triton_paged_attention(q, k, v, k_cache, v_cache, meta, scale, window, softcap)
    num_decodes = meta.num_decode_tokens
    if not meta.prefills:
        return attend_decodes(q, k, v, k_cache, v_cache, meta, scale, window, softcap)
    write_kv(
        k_cache,
        v_cache,
        k[num_decodes:],
        v[num_decodes:],
        meta.slot_mapping[num_decodes:],
        meta.block_size,
        meta.use_native_decode,
    )
    out = torch.empty_like(q)
    if num_decodes:
        d = slice(0, num_decodes)
        out[d] = attend_decodes(q[d], k[d], v[d], k_cache, v_cache, meta, scale, window, softcap)
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.length)
        if span.length == span.context_len:  # the whole context is this chunk: use the fresh K/V directly
            keys, values = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
        else:
            keys = block_keys(k_cache, span.block_table)[:, : span.context_len]
            values = block_values(v_cache, span.block_table)[:, : span.context_len]
        out[rows] = prefill_attention(q[rows], keys, values, meta.prefill_mask(span, window), scale, softcap)
    return out
