"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

On a GPU a decode step of a small model is a few milliseconds of kernels but several hundred kernel
launches from Python (about a dozen per layer), which would take longer than the kernels themselves.
A graph replays all of them in one call. Its kernels read fixed addresses, so the step's inputs are
copied into persistent buffers (one copy from pinned host memory, no sync), and a batch is padded up
to the next captured size: padding rows have slot -1 (the KV write skips them) and context length 0
(attention gives zeros), and their rows are dropped before the logits.

The decode kernel's split count depends on the batch size only (`triton_attention.decode_splits`), and
block tables are read through a buffer as wide as the longest sequence allowed, so one graph per bucket
serves every context length. The tables themselves stay on the device from step to step, a row per request:
a step sends only the entries they gained. On the CPU (EMBER_KERNELS=triton, a test mode) the same buffers and padding
run eagerly: everything but the capture itself is exercised without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ember.attention.torch_paged import AttentionMetadata
from ember.engine.request import Request
from ember.engine.scheduler import ScheduledRequest
from ember.kernels import device_tensor
from ember.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

# input ids, positions, slots, context lengths, and the rows by decreasing context length (the decode kernel
# starts the longest first): `bucket` values each, read by the graphs
NUM_FIELDS = 5
PADDING_ROW = np.array([[0], [0], [-1], [0]])  # token 0 at position 0, stored nowhere, attending to nothing


def longest_first(context_lens: np.ndarray) -> np.ndarray:
    """Row indices by decreasing context length (ties in row order)."""
    return np.argsort(-context_lens, kind="stable")


@dataclass
class TableSlot:
    """A request's row of `DecodeGraphs.slot_tables`: the blocks of its table already copied there."""

    index: int
    blocks: list[int]  # the request's `block_ids` list as copied (replaced, not shrunk, when blocks are freed)
    copied: int = 0


def batch_buckets(max_batch: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, then every multiple of 8 up to `max_batch` (and `max_batch` itself)."""
    sizes = {size for size in (1, 2, 4, *range(8, max_batch + 1, 8)) if size <= max_batch}
    return sorted(sizes | {max_batch})


class DecodeGraphs:
    """Runs single-token steps (up to `max_batch` requests) on persistent buffers, replaying captured graphs
    on CUDA. `run` returns the logits of the step's real rows."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        max_batch: int,
        max_model_len: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.width = -(-max_model_len // block_size)  # blocks of the longest sequence allowed
        # Block tables stay on the device between steps, a row per request (`slot_tables`): a step sends only the
        # entries its requests gained since, and the rows' slots, and a gather on the device lays them out in
        # `tables`, the graphs' input. Rebuilding every table on the host each step cost ~0.3 ms at batch 256 (a
        # Python list to int64 per entry). One flat buffer travels per step: for a bucket of B rows, the graphs'
        # fields (B values each), the rows' slots, then the new entries' places and blocks.
        size = (NUM_FIELDS + 1) * self.max_batch + 2 * self.max_batch * self.width
        self.host_staging = torch.zeros(size, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.staging = torch.zeros(size, dtype=torch.int64, device=device)
        self.tables = torch.zeros(self.max_batch, self.width, dtype=torch.int64, device=device)
        self.slot_tables = torch.zeros(self.max_batch, self.width, dtype=torch.int64, device=device)
        self.slots: dict[Request, TableSlot] = {}
        self.free_slots = list(range(self.max_batch))
        self.copied = torch.cuda.Event() if device.type == "cuda" else None  # the host buffer is free once passed
        self.graphs: dict[int, Callable[[], torch.Tensor]] = {}
        self.replays: Counter[int] = Counter()  # steps run per bucket
        self.pool = None

    def capture(self) -> None:
        """Capture every bucket, largest first (smaller graphs then reuse its memory pool). On the CPU each
        bucket's step simply runs eagerly when replayed."""
        start = time.perf_counter()
        if self.device.type == "cuda":
            logger.info("capturing CUDA graphs for %d decode batch sizes (--enforce-eager skips it)", len(self.buckets))
        for bucket in reversed(self.buckets):
            self.graphs[bucket] = self._capture(bucket) if self.device.type == "cuda" else self._forward(bucket)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            logger.info(
                "captured CUDA graphs for %d batch sizes in %.1f s", len(self.buckets), time.perf_counter() - start
            )

    def _fields(self, bucket: int) -> list[torch.Tensor]:
        """Input ids, positions, slots, context lengths and the rows' order of a `bucket`-row step (views of the
        staging buffer)."""
        return list(self.staging[: NUM_FIELDS * bucket].view(NUM_FIELDS, bucket))

    def _pad(self, bucket: int) -> None:
        """Make every row of `bucket` a padding row (the state warm-up and capture run in). The buckets' fields
        overlap in the staging buffer, so this is done right before each capture."""
        fields = self.host_staging[: NUM_FIELDS * bucket].numpy().reshape(NUM_FIELDS, bucket)
        fields[:-1] = PADDING_ROW
        fields[-1] = np.arange(bucket)
        self.staging[: NUM_FIELDS * bucket].copy_(self.host_staging[: NUM_FIELDS * bucket])

    def _forward(self, bucket: int) -> Callable[[], torch.Tensor]:
        """The step of `bucket` rows over the persistent buffers: the last hidden states [bucket, hidden]. The
        logits are computed outside the graph, for the real rows only: a graph's output stays allocated for
        as long as the graph, and fp32 logits for every bucket up to 256 would hold 2.6 GB at Qwen3's
        vocabulary."""
        input_ids, positions, slots, context_lens, order = self._fields(bucket)
        meta = AttentionMetadata(
            slot_mapping=slots,
            num_decode_tokens=bucket,
            decode_block_tables=self.tables[:bucket],
            decode_context_lens=context_lens,
            prefills=[],
            block_size=self.block_size,
            use_native_decode=False,
            use_triton=True,
            decode_order=order,
        )

        def forward() -> torch.Tensor:
            return self.model(input_ids, positions, self.kv_caches, meta)

        return forward

    @torch.inference_mode()
    def _capture(self, bucket: int) -> Callable[[], torch.Tensor]:
        forward = self._forward(bucket)
        self._pad(bucket)
        forward()  # compiles the Triton kernels for this shape outside the capture
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = forward()
        self.pool = graph.pool()

        def replay() -> torch.Tensor:
            graph.replay()
            return hidden

        return replay

    def fits(self, scheduled: list[ScheduledRequest]) -> bool:
        """Whether this step is one a graph runs: single tokens, no drafts, no prompt logprobs to record."""
        return 0 < len(scheduled) <= self.max_batch and all(
            s.num_tokens == 1 and not s.spec_token_ids and not s.request.needs_prompt_logprobs for s in scheduled
        )

    def _take_slots(self, scheduled: list[ScheduledRequest]) -> None:
        """A `slot_tables` row for each request of the step; the rows of requests absent from it (finished, or in an
        eager step) go back, so no finished request is held on to. A new row has its table copied in full."""
        new = [s.request for s in scheduled if s.request not in self.slots]
        if not new and len(self.slots) == len(scheduled):  # the same requests as the rows held
            return
        present = {s.request for s in scheduled}
        for request in [r for r in self.slots if r not in present]:
            self.free_slots.append(self.slots.pop(request).index)
        for request in new:
            self.slots[request] = TableSlot(self.free_slots.pop(), request.block_ids)

    def run(
        self, scheduled: list[ScheduledRequest], sources: tuple[torch.Tensor, list[int]] | None = None
    ) -> torch.Tensor:
        """Logits [len(scheduled), vocab] of a step that `fits`. With `sources` (tokens on the device, and for
        each row an index into them), the rows' input tokens come from there instead of the host."""
        n = len(scheduled)
        bucket = next(size for size in self.buckets if size >= n)
        if self.copied is not None:
            self.copied.synchronize()  # the last step's copy has left the host buffer
        bs = self.block_size
        self._take_slots(scheduled)
        token_ids, positions, slot_mapping, table_rows, places, blocks = [], [], [], [], [], []
        for s in scheduled:
            request, start = s.request, s.start
            table, slot = request.block_ids, self.slots[request]
            needed = start // bs + 1
            if slot.blocks is not table:  # its blocks were freed or trimmed since: copy the table again
                slot.blocks, slot.copied = table, 0
            if slot.copied < needed:
                first = slot.index * self.width
                places.extend(range(first + slot.copied, first + needed))
                blocks.extend(table[slot.copied : needed])
                slot.copied = needed
            token_ids.append(request.all_token_ids[start])
            positions.append(start)
            slot_mapping.append(table[needed - 1] * bs + start % bs)
            table_rows.append(slot.index)
        host = self.host_staging.numpy()
        fields = host[: NUM_FIELDS * bucket].reshape(NUM_FIELDS, bucket)
        fields[:-1, n:] = PADDING_ROW
        fields[0, :n] = token_ids
        fields[1, :n] = positions
        fields[2, :n] = slot_mapping
        fields[3, :n] = fields[1, :n] + 1
        fields[4] = longest_first(fields[3])
        rows_at = NUM_FIELDS * bucket
        places_at = rows_at + n
        blocks_at = places_at + len(places)
        end = blocks_at + len(blocks)
        host[rows_at:places_at] = table_rows
        host[places_at:blocks_at] = places
        host[blocks_at:end] = blocks
        self.staging[:end].copy_(self.host_staging[:end], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if places:
            self.slot_tables.view(-1).index_copy_(0, self.staging[places_at:blocks_at], self.staging[blocks_at:end])
        torch.index_select(self.slot_tables, 0, self.staging[rows_at:places_at], out=self.tables[:n])
        if sources is not None:
            tokens, rows = sources
            self._fields(bucket)[0][:n].copy_(tokens.index_select(0, device_tensor(rows, self.device)))
        self.replays[bucket] += 1
        return self.model.compute_logits(self.graphs[bucket]()[:n])
