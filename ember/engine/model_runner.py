"""Turns a scheduled step into tensors, runs the model over the paged KV cache, and samples.

Tokens of a step are flattened: single-token decodes first (attended in one batched call), then
prefill chunks. Logits are computed only at rows that need them: each request's last scheduled token
when it completes its sequence, and prompt positions of requests that asked for prompt logprobs.
On the Triton path, steps of single-token decodes run through `DecodeGraphs` (CUDA graphs on a GPU); on the
CPU, steps of few rows run through `NativeDecodeStack` (the whole model in one C call).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ember.attention import cpu_kernels
from ember.attention.layout import cache_views
from ember.attention.torch_paged import AttentionMetadata, PrefillSpan
from ember.config import ModelConfig
from ember.engine.decode_graphs import DecodeGraphs, longest_first
from ember.engine.request import TokenLogprob
from ember.engine.sampler import sample, sample_tokens, samples_without_sync, top_logprobs
from ember.engine.scheduler import ScheduledRequest
from ember.kernels import device_tensor, native, use_triton
from ember.kernels.attention_tuning import tuning_for
from ember.models.decode_stack import NativeDecodeStack
from ember.models.llama import LlamaForCausalLM
from ember.models.lora import LoRAModel
from ember.models.packed_linear import pack_linears
from ember.models.quantized import QuantizedMatrix
from ember.spec.verify import verify_drafts


@dataclass
class LaunchedStep:
    """A decode step whose sampled tokens are still on the device (async scheduling)."""

    scheduled: list[ScheduledRequest]
    tokens: torch.Tensor  # [len(scheduled)] on the device: the next step's inputs are gathered from here
    host_tokens: torch.Tensor  # the same, copied into pinned host memory once sampled (on CUDA)
    copied: torch.cuda.Event | None  # recorded after that copy (CUDA only)

    @classmethod
    def start(cls, scheduled: list[ScheduledRequest], tokens: torch.Tensor) -> LaunchedStep:
        """Queue the copy of the sampled tokens to the host right behind the sampling. Reading them back later
        then waits for this step alone: a plain `tokens.tolist()` would queue behind the step launched after
        it and wait for that one too, and the host's work would no longer overlap the device's."""
        if tokens.device.type != "cuda":
            return cls(scheduled, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(scheduled, tokens, host, copied)

    def token_ids(self) -> list[int]:
        """The sampled tokens, read back (this waits for this step, not for any step queued behind it)."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host_tokens.tolist()


@dataclass
class StepResult:
    # request id -> (new tokens, their logprobs): one token, or accepted drafts plus one when speculating
    sampled: dict[str, tuple[list[int], list[TokenLogprob | None]]]


def cache_slots(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """The KV-cache slots of positions [start, end) of a sequence with block table `table`: a block's run of
    slots at a time (a prompt chunk of 8,192 tokens took ~1.2 ms of Python a token at a time)."""
    slots: list[int] = []
    for index in range(start // block_size, (end - 1) // block_size + 1):
        first = index * block_size
        base = table[index] * block_size - first
        slots.extend(range(base + max(start, first), base + min(end, first + block_size)))
    return slots


def pool(s: ScheduledRequest, hidden: torch.Tensor) -> None:
    """An embedding request's share of a step (`hidden`: its chunk's final hidden states): summed for a mean
    (positions summed before a preemption are skipped when recomputed); the embedding once the prompt is done."""
    request = s.request
    if request.pooling == "mean" and s.start + s.num_tokens > request.num_pooled:
        part = hidden[request.num_pooled - s.start if request.num_pooled > s.start else 0 :].float().sum(0)
        request.pooled_sum = part if request.pooled_sum is None else request.pooled_sum + part
        request.num_pooled = s.start + s.num_tokens
    if s.completes_sequence:
        assert request.pooling == "last" or request.pooled_sum is not None
        pooled = hidden[-1].float() if request.pooling == "last" else request.pooled_sum / request.num_prompt_tokens
        request.embedding = torch.nn.functional.normalize(pooled, dim=-1).cpu()


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * element


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        device: str,
        dtype: torch.dtype,
        graph_max_batch: int = 0,
        max_model_len: int | None = None,
        gguf_blocks: dict[str, QuantizedMatrix] | None = None,
        enable_lora: bool = False,
        max_lora_rank: int | None = None,
        kv_cache_dtype: torch.dtype | None = None,
    ) -> None:
        """`graph_max_batch` > 0: decode steps of up to that many requests run on `DecodeGraphs` (Triton path
        only), whose block tables are as wide as `max_model_len` (default: the model's). `gguf_blocks`: the
        quantized weights of a GGUF file, for the CPU's steps of few rows. `enable_lora`: the linears take LoRA
        adapters (`self.lora`); steps with adapter rows replay no CUDA graph. `kv_cache_dtype`: the cache's
        elements (default `dtype`; float8 e4m3 on the Triton path only)."""
        self.model = model
        self.config = model.config
        if torch.device(device).type == "cpu":
            pack_linears(model, blocks=gguf_blocks)
        self.block_size = block_size
        self.device = torch.device(device)
        cfg = self.config
        self.use_triton = use_triton(self.device)
        if self.use_triton and self.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(  # else Triton fails at the first step, looking for a GPU driver
                "EMBER_KERNELS=triton on the CPU runs Ember's Triton kernels in Triton's interpreter: set "
                "TRITON_INTERPRET=1 too (a test mode, slow), or unset EMBER_KERNELS"
            )
        if self.use_triton and (cfg.head_dim & (cfg.head_dim - 1) or cfg.head_dim < 16 or block_size < 16):
            raise ValueError(
                "Ember's Triton kernels need a power-of-two head_dim >= 16 and --block-size >= 16; "
                f"got head_dim {cfg.head_dim}, block size {block_size}"
            )
        if self.use_triton:
            tuning_for(
                self.device
            )  # the attention kernels' launch options: a bad tuning file fails here, not in a step
        cache_dtype = kv_cache_dtype or dtype
        assert cache_dtype == dtype or self.use_triton, "only the Triton kernels store another dtype (Engine checks)"
        shape = (cfg.num_hidden_layers, 2, cfg.num_key_value_heads, num_blocks, block_size, cfg.head_dim)
        # Zeroed (masked slots still meet 0 * value in attention) and touched now: a lazily zeroed cache moves
        # its page faults into the steps, which on the CPU measured 1-2 s of kernel time per cpu-64 run
        # (huge-page faults compact memory), against about 0.2 s per GiB once at start-up.
        self.kv_cache = torch.zeros(shape, dtype=cache_dtype, device=self.device)
        self.kv_caches = [cache_views(layer) for layer in self.kv_cache]
        self.use_native_decode = (
            not self.use_triton
            and self.device.type == "cpu"
            and dtype in (torch.float32, torch.bfloat16)
            and native.load() is not None
        )
        # On AVX512-BF16 the kernel also beats SDPA on prefill chunks (1.3-1.8x measured): every query token
        # then attends as a row of its own over the paged context, with no gathered copy and no mask.
        self.native_prefill = (
            self.use_native_decode
            and dtype == torch.bfloat16
            and cpu_kernels.fast_bf16_attention(block_size, cfg.head_dim)
        )
        # steps of up to 8 query rows (decodes, drafts, small bf16 prefill chunks): the whole model in one C call,
        # when every layer's linears have GGUF blocks
        self.decode_stack = (
            NativeDecodeStack.build(model, self.kv_caches, num_blocks, block_size) if self.use_native_decode else None
        )
        # wrapped after the C stack took the base weights and before graphs capture the forward (with no adapter)
        self.lora = LoRAModel(model, dtype, self.device, max_lora_rank) if enable_lora else None
        if self.lora is not None and self.decode_stack is not None:
            self.decode_stack.attach_lora(self.lora.tables())
        self.decode_graphs: DecodeGraphs | None = None
        if self.use_triton and graph_max_batch > 0:
            max_len = max_model_len or cfg.max_position_embeddings
            self.decode_graphs = DecodeGraphs(model, self.kv_caches, block_size, graph_max_batch, max_len, self.device)
            self.decode_graphs.capture()

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest]) -> StepResult:
        if self._graph_runs(scheduled):
            return self._execute_graph(scheduled)
        as_rows = [self.native_prefill or s.num_tokens == 1 or s.is_decode for s in scheduled]
        decodes = [s for s, rows in zip(scheduled, as_rows, strict=True) if rows]
        prefills = [s for s, rows in zip(scheduled, as_rows, strict=True) if not rows]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []  # one per plain request, 1 + drafts per speculating one
        prompt_rows: list[tuple[ScheduledRequest, int, int]] = []  # (step, first row, first position)
        pooling_rows: list[tuple[ScheduledRequest, int]] = []  # embedding requests: (step, first row)
        bs = self.block_size
        for s in decodes + prefills:
            request, row = s.request, len(input_ids)
            end = s.start + s.num_tokens
            tokens = request.all_token_ids + s.spec_token_ids if s.spec_token_ids else request.all_token_ids
            input_ids.extend(tokens[s.start : end])
            positions.extend(range(s.start, end))
            slots.extend(cache_slots(request.block_ids, s.start, end, bs))
            if request.pooling is not None:
                pooling_rows.append((s, row))
            elif s.completes_sequence:
                sample_rows.extend(range(row + s.num_tokens - 1 - len(s.spec_token_ids), row + s.num_tokens))
            if request.needs_prompt_logprobs and s.start < request.num_prompt_tokens:
                prompt_rows.append((s, row, s.start))
        meta = self._attention_metadata(decodes, prefills, slots)
        ids, position_ids = device_tensor(input_ids, self.device), device_tensor(positions, self.device)
        adapted = self.lora is not None and self.lora.set_step(
            [(s.request.lora_id, s.num_tokens) for s in decodes + prefills]
        )
        lora_slots = self.lora.batch.slots if adapted and self.lora is not None else None
        stack = self.decode_stack
        if (
            stack is not None
            and not prefills
            and len(input_ids) <= stack.max_rows
            and (lora_slots is not None or not adapted)
        ):
            hidden = stack(ids, position_ids, meta, lora_slots)
        else:
            hidden = self.model(ids, position_ids, self.kv_caches, meta)
        for s, row, first in prompt_rows:
            self._record_prompt_logprobs(s, hidden, row, first)
        for s, row in pooling_rows:
            pool(s, hidden[row : row + s.num_tokens])
        result = StepResult(sampled={})
        if sample_rows:
            logits = self.model.compute_logits(hidden[device_tensor(sample_rows, self.device)])
            completing = [s for s in decodes + prefills if s.completes_sequence and s.request.pooling is None]
            self._sample(logits, completing, result)
        return result

    def load_lora(self, name: str, path: str) -> None:
        """Load a LoRA adapter (raises ValueError when LoRA is off or the adapter does not fit this model)."""
        if self.lora is None:
            raise ValueError("LoRA adapters need the engine started with LoRA enabled (--enable-lora)")
        self.lora.load(name, path)
        if self.decode_stack is not None:
            self.decode_stack.attach_lora(self.lora.tables())

    def unload_lora(self, name: str) -> None:
        assert self.lora is not None
        self.lora.unload(name)
        if self.decode_stack is not None:
            self.decode_stack.attach_lora(self.lora.tables())

    def can_launch(self, scheduled: list[ScheduledRequest]) -> bool:
        """Whether `launch` takes this step: a graph decode step whose every row samples on the device."""
        return self._graph_runs(scheduled) and all(
            s.completes_sequence and samples_without_sync(s.request) for s in scheduled
        )

    def _graph_runs(self, scheduled: list[ScheduledRequest]) -> bool:
        """Whether a CUDA graph runs this step: one that `DecodeGraphs.fits`, with no adapter rows (the graphs
        hold the base model's forward)."""
        return (
            self.decode_graphs is not None
            and self.decode_graphs.fits(scheduled)
            and (self.lora is None or not any(s.request.lora_id for s in scheduled))
        )

    @torch.inference_mode()
    def launch(self, scheduled: list[ScheduledRequest], previous: LaunchedStep | None = None) -> LaunchedStep:
        """Run a step that `can_launch` takes and sample it, without waiting for the device. With `previous`
        (the step before, not read back yet), each row's input token is the one `previous` sampled for the
        same request."""
        assert self.decode_graphs is not None
        sources = None
        if previous is not None:
            row_of = {s.request.request_id: i for i, s in enumerate(previous.scheduled)}
            sources = (previous.tokens, [row_of[s.request.request_id] for s in scheduled])
        logits = self.decode_graphs.run(scheduled, sources)
        return LaunchedStep.start(scheduled, sample_tokens(logits, [s.request for s in scheduled]))

    def _execute_graph(self, scheduled: list[ScheduledRequest]) -> StepResult:
        assert self.decode_graphs is not None
        logits = self.decode_graphs.run(scheduled)
        rows = [i for i, s in enumerate(scheduled) if s.completes_sequence]
        result = StepResult(sampled={})
        if rows:
            if len(rows) < len(scheduled):
                logits = logits[device_tensor(rows, self.device)]
            self._sample(logits, [scheduled[i] for i in rows], result)
        return result

    @staticmethod
    def _sample(logits: torch.Tensor, completing: list[ScheduledRequest], result: StepResult) -> None:
        """Sample plain requests in one batch; verify each speculating request's drafts on its rows."""
        plain_rows, plain, row = [], [], 0
        for s in completing:
            if s.spec_token_ids:
                rows = logits[row : row + 1 + len(s.spec_token_ids)]
                result.sampled[s.request.request_id] = verify_drafts(rows, s.request, s.spec_token_ids)
            else:
                plain_rows.append(row)
                plain.append(s.request)
            row += 1 + len(s.spec_token_ids)
        if plain:
            if len(plain_rows) < len(logits):  # rows of speculating requests in between
                logits = logits[device_tensor(plain_rows, logits.device)]
            out = sample(logits, plain)
            for request, token, lp in zip(plain, out.token_ids, out.logprobs, strict=True):
                result.sampled[request.request_id] = ([token], [lp])

    def _attention_metadata(
        self, decodes: list[ScheduledRequest], prefills: list[ScheduledRequest], slots: list[int]
    ) -> AttentionMetadata:
        """Decode rows (one per query token of a decode, drafts included, and of every chunk when prefill
        runs on the native kernel) attend through their request's block table up to their own position;
        other prefill chunks are spans over their context."""
        device, bs = self.device, self.block_size
        decode_tables = decode_lens = row_tables = order = None
        num_decode_rows = sum(s.num_tokens for s in decodes)
        if decodes:
            max_blocks = -(-max(s.start + s.num_tokens for s in decodes) // bs)
            tables, context_lens, table_of_row = [], [], []
            for i, s in enumerate(decodes):
                table = s.request.block_ids[:max_blocks]
                tables.append(table + [0] * (max_blocks - len(table)))
                context_lens.extend(range(s.start + 1, s.start + s.num_tokens + 1))
                table_of_row.extend([i] * s.num_tokens)
            decode_tables = device_tensor(tables, device)
            decode_lens = device_tensor(context_lens, device)
            if self.use_triton:
                order = device_tensor(longest_first(np.array(context_lens)), device)
            if num_decode_rows > len(decodes):
                row_tables = device_tensor(table_of_row, device)
        spans = []
        row = num_decode_rows
        for s in prefills:
            context_len = s.start + s.num_tokens
            table = device_tensor(s.request.block_ids[: -(-context_len // bs)], device)
            mask = None
            if s.start > 0 and not self.use_triton:  # the SDPA path's mask; the Triton kernel masks itself
                query_pos = torch.arange(s.start, context_len, device=device).unsqueeze(1)
                mask = torch.arange(context_len, device=device).unsqueeze(0) <= query_pos
            spans.append(PrefillSpan(row, s.num_tokens, context_len, table, mask))
            row += s.num_tokens
        slot_mapping = device_tensor(slots, device)
        return AttentionMetadata(
            slot_mapping=slot_mapping,
            num_decode_tokens=num_decode_rows,
            decode_block_tables=decode_tables,
            decode_context_lens=decode_lens,
            prefills=spans,
            block_size=bs,
            use_native_decode=self.use_native_decode,
            use_triton=self.use_triton,
            decode_row_tables=row_tables,
            decode_order=order,
        )

    def _record_prompt_logprobs(self, s: ScheduledRequest, hidden: torch.Tensor, row: int, first: int) -> None:
        """Logprobs of prompt tokens first+1 .. at positions of this chunk (skipped when recomputed); after a
        prefix-cache hit, also of the chunk's first token, scored by the cached prefix's last hidden state. Keeps
        the last hidden state of each full prompt block for the prefix cache."""
        request = s.request
        last = min(s.start + s.num_tokens, request.num_prompt_tokens - 1)  # position whose next token is known
        known = len(request.prompt_logprobs)  # positions already recorded (e.g. before a preemption)
        begin = max(first, known)
        rows = hidden[row + begin - first : row + max(last, begin) - first]
        if known == first - 1 and request.prompt_boundary_hidden is not None:
            rows, begin = torch.cat([request.prompt_boundary_hidden.to(rows.device)[None], rows]), known
            request.prompt_boundary_hidden = None
        if begin < last:
            logprobs = torch.log_softmax(self.model.compute_logits(rows), dim=-1)
            targets = device_tensor(request.prompt_token_ids[begin + 1 : last + 1], self.device)
            k = request.params.prompt_logprobs
            request.prompt_logprobs.extend(top_logprobs(logprobs, targets, [k] * len(targets)))
        bs = self.block_size
        end = min(first + s.num_tokens, request.num_prompt_tokens)
        block_ends = range(first + (bs - 1 - first) % bs, end, bs)  # each full block's last position
        if block_ends:  # to the host in one copy: the prefix cache keeps them outside the KV cache's device memory
            kept = hidden[row - first + block_ends.start : row - first + end : bs].to("cpu", copy=True)
            request.prompt_block_hidden.update(
                (position // bs, h) for position, h in zip(block_ends, kept, strict=True)
            )
