"""The engine loop (`Engine.step`) and the offline API (`LLM`).

`Engine` owns the model runner, the KV cache and the scheduler; each `step()` schedules, runs the
model once, appends sampled tokens, applies stop conditions and returns what is new for each request.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ember.config import (
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    available_memory_bytes,
)
from ember.engine.beam_search import BeamSearch, BeamSearchParams
from ember.engine.detokenizer import IncrementalDetokenizer
from ember.engine.kv_cache_manager import KVCacheManager
from ember.engine.model_runner import LaunchedStep, ModelRunner, kv_cache_bytes_per_block
from ember.engine.request import CompletionOutput, Request, RequestOutput, RequestStatus, TokenLogprob
from ember.engine.sampling_params import InvalidParameter, SamplingParams
from ember.engine.scheduler import ScheduledRequest, Scheduler
from ember.engine.structured_output import GrammarCompiler, StructuredOutputs
from ember.kernels import use_triton
from ember.models.loader import LoadedModel, load_model
from ember.models.lora import LoRAAdapter, adapter_files
from ember.spec.prediction import PredictedOutput
from ember.spec.speculator import Speculator, build_proposer, load_draft_model

logger = logging.getLogger(__name__)

PromptType = str | list[int]
DEFAULT_KV_CACHE_CAP = 4 << 30  # bytes; a larger CPU budget is asked for explicitly
CUDA_ACTIVATION_RESERVE = 2 << 30  # bytes of GPU memory left for activations and logits
NO_LOGPROBS: list[TokenLogprob | None] = [None]  # a sampled token's, read back without logprobs (shared, not mutated)
MAX_GRAPH_BATCH = 512  # larger decode batches run eagerly: more graphs cost start-up time and logits memory


def context_length(model: ModelConfig, asked: int | None) -> int:
    """The longest sequence served: as asked (`--max-model-len`), within the model's positions."""
    limit = model.max_position_embeddings
    if asked is not None and asked > limit:
        logger.warning("max_model_len %d is beyond the model's %d positions: capped at %d", asked, limit, limit)
    return min(asked or limit, limit)


@dataclass
class RequestGroup:
    """The `n` samples of one user request, and how much of each was already returned."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    final_only: bool = False  # hand back one output when the group finishes, none per step
    sent_tokens: list[int] = field(default_factory=list)
    sent_finish: list[bool] = field(default_factory=list)
    prompt_logprobs_sent: bool = False

    def __post_init__(self) -> None:
        self.sent_tokens = [0] * len(self.children)
        self.sent_finish = [False] * len(self.children)

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)

    def take_delta(self) -> RequestOutput:
        """What each sample produced since the last call (only samples with something new). Runs for every
        streamed request at every step: one pass over the samples, no property chains."""
        outputs = []
        finished = True
        drafted = accepted = 0
        for i, child in enumerate(self.children):
            drafted += child.num_draft_tokens
            accepted += child.num_accepted_tokens
            child_finished = child.status is RequestStatus.FINISHED
            finished = finished and child_finished
            sent = self.sent_tokens[i]
            committed = len(child.all_token_ids) - child.num_pending_tokens
            new_ids = child.all_token_ids[child.num_prompt_tokens + sent : committed]  # O(new)
            if not new_ids and (self.sent_finish[i] or not child_finished):
                continue
            logprobs = child.logprobs[sent:] if child.params.logprobs is not None else None
            text = child.detokenizer.take_delta(child_finished) if child.detokenizer else ""
            outputs.append(CompletionOutput(i, text, new_ids, logprobs, child.finish_reason, child.stop_reason))
            self.sent_tokens[i] = committed - child.num_prompt_tokens
            self.sent_finish[i] = child_finished
        first = self.children[0]
        prompt_logprobs = None
        wants_prompt_logprobs = first.params.prompt_logprobs is not None and not self.prompt_logprobs_sent
        if wants_prompt_logprobs and len(first.prompt_logprobs) >= first.num_prompt_tokens - 1:
            prompt_logprobs = [None, *first.prompt_logprobs]
            self.prompt_logprobs_sent = True
        return RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_token_ids,
            outputs,
            finished,
            prompt_logprobs,
            first.num_cached_tokens or 0,
            drafted,
            accepted,
            first.embedding.tolist() if finished and first.embedding is not None else None,
            first.first_scheduled,
        )


POOLING = ("last", "mean")  # an embedding: the prompt's last final hidden state, or their mean


class Engine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        dtype = config.torch_dtype()
        for name, path in config.lora.modules.items():  # a wrong path is reported before the model loads
            adapter_files(name, path)
        kv_dtype = config.cache.kv_torch_dtype(dtype)
        if kv_dtype != dtype and not use_triton(torch.device(config.device)):  # before the model loads too
            raise ValueError(
                f"--kv-cache-dtype {config.cache.kv_cache_dtype} runs on Ember's Triton kernels only: use --device "
                "cuda (the CPU's kernels keep the model's dtype in the cache)"
            )
        self.loaded = loaded or load_model(config.model, config.load_format, dtype, config.device, config.seed)
        self.model_config = self.loaded.config
        self.tokenizer = self.loaded.tokenizer
        self.max_model_len = context_length(self.model_config, config.scheduler.max_model_len)
        for rotary in self.loaded.model.rotaries():
            rotary.serve_context(self.max_model_len)
        block_size = config.cache.block_size
        draft = load_draft_model(config.speculative, config.device, dtype)
        num_blocks = self._num_blocks(config.cache, dtype, kv_dtype, draft.config if draft else None)
        self.kv_cache = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        tokens = num_blocks * block_size
        gib = num_blocks * kv_cache_bytes_per_block(self.model_config, block_size, kv_dtype) / 2**30
        logger.info(
            "KV cache: %s blocks of %d tokens, %s tokens (%s, %.2f GiB): %.1f requests of %s tokens at once",
            f"{num_blocks:,}", block_size, f"{tokens:,}", str(kv_dtype).removeprefix("torch."), gib,
            tokens / self.max_model_len, f"{self.max_model_len:,}",
        )  # fmt: skip
        self.scheduler = Scheduler(config.scheduler, self.kv_cache, config.lora.max_loras)
        graph_max_batch = 0 if config.enforce_eager else min(config.scheduler.max_num_seqs, MAX_GRAPH_BATCH)
        self.runner = ModelRunner(
            self.loaded.model,
            num_blocks,
            block_size,
            config.device,
            dtype,
            graph_max_batch,
            self.max_model_len,
            self.loaded.gguf_blocks,
            config.lora.enable,
            config.lora.max_rank,
            kv_dtype,
        )
        for name, path in config.lora.modules.items():
            self.load_lora(name, path)
        proposer = None
        if config.speculative.method is not None:
            proposer = build_proposer(
                config.speculative, self.model_config.vocab_size, num_blocks, block_size, config.device, dtype, draft
            )
        # async scheduling (on by default where it applies): decode steps on CUDA graphs, without a speculative
        # method (its drafts need the tokens first; predicted outputs draft in plain steps, see _schedule_behind)
        applies = self.runner.decode_graphs is not None and proposer is None
        self.async_scheduling = applies and config.async_scheduling is not False
        if config.async_scheduling and not applies:
            logger.warning(
                "async scheduling needs CUDA-graph decode steps (CUDA, no --enforce-eager) and no speculative "
                "decoding; steps run one after the other"
            )
        stack = self.runner.decode_stack
        max_rows = stack.max_rows if stack is not None else None
        # without a proposer, it drafts from predicted outputs only
        self.speculator = Speculator(config.speculative, proposer, self.max_model_len, max_rows)
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        generation_eos = self.loaded.generation_config.get("eos_token_id")  # e.g. Qwen2.5's <|endoftext|> too
        eos.update([generation_eos] if isinstance(generation_eos, int) else generation_eos or [])
        self.eos_token_ids = sorted(eos)
        self.groups: dict[str, RequestGroup] = {}
        self._ids = itertools.count()
        self._in_flight: LaunchedStep | None = None  # a launched step not read back yet
        self.num_overlapped_steps = 0  # steps launched while the one before was still in flight
        self._grammar_compiler: GrammarCompiler | None = None  # built on the first structured-output request
        self._grammar_compiler_lock = threading.Lock()

    def _num_blocks(
        self, cache: CacheConfig, dtype: torch.dtype, kv_dtype: torch.dtype, draft: ModelConfig | None
    ) -> int:
        """KV-cache blocks (of `kv_dtype` elements) from the memory budget; a draft model keeps as many blocks of
        its own (of its `dtype`), out of the same budget."""
        if cache.num_blocks is not None:
            return cache.num_blocks
        budget = cache.kv_cache_memory
        if budget is None and self.config.device.startswith("cuda"):
            free, total = torch.cuda.mem_get_info(torch.device(self.config.device))
            # what is already used (weights, the CUDA context) counts against the utilization target;
            # a reserve is kept for activations and the sampler's logits
            budget = int(total * cache.gpu_memory_utilization) - (total - free) - CUDA_ACTIVATION_RESERVE
        elif budget is None:
            budget = min(int(available_memory_bytes() * cache.memory_fraction), DEFAULT_KV_CACHE_CAP)
        per_block = kv_cache_bytes_per_block(self.model_config, cache.block_size, kv_dtype)
        if draft is not None:
            per_block += kv_cache_bytes_per_block(draft, cache.block_size, dtype)
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget} bytes holds no block of {per_block} bytes")
        if cache.max_sequences is not None:
            num_blocks = min(num_blocks, cache.max_sequences * (-(-self.max_model_len // cache.block_size) + 1))
        return int(num_blocks)

    # ------------------------------------------------------------------------------------------------
    # Requests in

    def compile_grammar(self, spec: StructuredOutputs) -> GrammarCompiler:
        """Compile a structured-output constraint (cached); raises ValueError when it is invalid. Thread-safe:
        the server calls it off the engine thread, so that `add_request` finds it compiled."""
        with self._grammar_compiler_lock:
            if self._grammar_compiler is None:
                if self.tokenizer is None:
                    raise ValueError("structured output needs the model's tokenizer (dummy weights have none)")
                self._grammar_compiler = GrammarCompiler(self.tokenizer, self.model_config.vocab_size)
        self._grammar_compiler.compile(spec)
        return self._grammar_compiler

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidParameter("prompt", "this model has no tokenizer (dummy weights): pass prompt token ids")
            return prompt, self.tokenizer(prompt)["input_ids"]
        ids = list(prompt)
        vocab = self.model_config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise InvalidParameter("prompt", f"prompt token ids must be integers in [0, {vocab})")
        return None, ids

    def _check_token_ids(self, params: SamplingParams) -> None:
        """Token ids in the parameters must be the model's: one past the vocabulary would fail the whole step."""
        vocab = self.model_config.vocab_size
        fields = {
            "stop_token_ids": params.stop_token_ids,
            "logit_bias": list(params.logit_bias or ()),
            "allowed_token_ids": params.allowed_token_ids or [],
            "prediction": params.prediction if isinstance(params.prediction, list) else [],
        }
        for name, token_ids in fields.items():
            if token_ids and max(token_ids) >= vocab:
                raise InvalidParameter(name, f"{name} must hold token ids below the vocabulary size {vocab}")

    def bad_words_token_ids(self, bad_words: list[str]) -> list[list[int]]:
        """Each bad word as the model's tokens, as it would be written at the start of the text and after a
        space (vLLM's rule): `" Paris"` is one token, `"Paris"` another. A word of blanks only (`"\\n"`) is
        taken as it is."""
        if not bad_words:
            return []
        if self.tokenizer is None:
            raise InvalidParameter("bad_words", "bad_words needs the model's tokenizer (dummy weights have none)")
        spellings = [s for w in bad_words for s in ((w.lstrip(), " " + w.lstrip()) if w.strip() else (w,))]
        encoded = self.tokenizer(spellings, add_special_tokens=False)["input_ids"]  # one call for them all
        return [list(ids) for ids in dict.fromkeys(tuple(ids) for ids in encoded if ids)]  # in order, no repeats

    def prediction_token_ids(self, prediction: str | list[int] | None) -> list[int]:
        """A predicted output as tokens, at most a context's worth (the output cannot use more)."""
        if not isinstance(prediction, str):
            return (prediction or [])[: self.max_model_len]
        if self.tokenizer is None:
            raise InvalidParameter("prediction", "a prediction as text needs the model's tokenizer (dummy weights "
                                   "have none): give token ids")  # fmt: skip
        return self.tokenizer(prediction, add_special_tokens=False)["input_ids"][: self.max_model_len]

    def _check_some_token_stays_allowed(self, params: SamplingParams, bad_words: list[list[int]]) -> None:
        """With `allowed_token_ids`, some allowed token must be one that neither a bad word nor `min_tokens`
        can take away: a step with every token masked would have nothing to sample."""
        if params.allowed_token_ids is None:
            return
        removable = {word[-1] for word in bad_words}
        if params.min_tokens:
            removable |= params.stop_token_set(self.eos_token_ids)
        if set(params.allowed_token_ids) <= removable:
            raise InvalidParameter(
                "allowed_token_ids", "allowed_token_ids holds only tokens that bad_words or min_tokens take away"
            )

    def add_request(
        self,
        prompt: PromptType,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        final_only: bool = False,
        lora: str | None = None,
        pooling: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> str:
        """Validate and queue a request; returns its id. Raises ValueError with a clear message.

        With `final_only`, `step` returns the request's whole output once, when it finishes, instead of a
        delta at every step: offline generation skips building (and merging) an output per token. `lora`: the
        name of a loaded LoRA adapter to generate with (None: the base model). `pooling` ("last" or "mean"): an
        embedding request, which computes the prompt and ends with its `embedding`; `params` are then unused.
        `priority`: under the "priority" scheduling policy, lower values are served first (any int; default 0).
        `cache_salt` (vLLM's): the request's prefix cache is its own, shared only with requests of the same salt,
        so that one tenant cannot learn from cache hits (time to first token) what another's prompts held."""
        if priority and not self.scheduler.by_priority:
            raise InvalidParameter(
                "priority", f"priority={priority} needs the priority scheduling policy (--scheduling-policy priority)"
            )
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise InvalidParameter("cache_salt", "cache_salt must be a non-empty string")
        if pooling is not None:
            if pooling not in POOLING:
                raise InvalidParameter("pooling", f"pooling must be one of {', '.join(POOLING)}, got {pooling!r}")
            params = SamplingParams(max_tokens=1)
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        lora_id = self.lora_adapter(lora).adapter_id if lora is not None else 0
        text, ids = self.tokenize(prompt)
        self._check_token_ids(params)
        bad_words = self.bad_words_token_ids(params.bad_words)
        prediction = self.prediction_token_ids(params.prediction)
        if not ids:
            raise InvalidParameter("prompt", "the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, but the model's context is {self.max_model_len} tokens "
                "(prompt plus at least one generated token must fit)"
            )
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise ValueError(
                f"max_tokens={max_tokens} plus the prompt's {len(ids)} tokens exceeds the model's context of "
                f"{self.max_model_len} tokens; lower max_tokens to at most {room}"
            )
        compiler = self.compile_grammar(params.structured_outputs) if params.structured_outputs else None
        needed = self.kv_cache.blocks_for(len(ids) + max_tokens)
        if needed > self.kv_cache.num_blocks:
            raise ValueError(
                f"this request needs {needed} KV-cache blocks (prompt {len(ids)} + max_tokens {max_tokens}) but "
                f"the cache has only {self.kv_cache.num_blocks}; raise --kv-cache-memory or lower max_tokens"
            )
        self._check_some_token_stays_allowed(params, bad_words)
        children = []
        for index in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_seed = (params.seed + index + 2**63) % 2**64 - 2**63  # the next seeds, wrapping in int64
                child_params = SamplingParams(**{**params.__dict__, "seed": child_seed})
            child = Request(f"{request_id}#{index}", ids, child_params, self.eos_token_ids, max_tokens, text)
            if self.tokenizer is not None and pooling is None:
                child.detokenizer = IncrementalDetokenizer(
                    self.tokenizer, params.stop, params.include_stop_str_in_output, params.skip_special_tokens
                )
            child.bad_words_token_ids = bad_words
            child.lora_id = lora_id
            child.pooling = pooling
            child.priority = priority
            child.cache_salt = cache_salt
            if prediction:
                child.prediction = PredictedOutput(prediction)
            if compiler is not None:
                assert params.structured_outputs is not None
                child.grammar = compiler.matcher(params.structured_outputs, child.stop_ids)
            children.append(child)
        self.groups[request_id] = RequestGroup(request_id, text, ids, children, final_only)
        for child in children:
            self.scheduler.add(child)
        return request_id

    # ------------------------------------------------------------------------------------------------
    # LoRA adapters (between steps: the server calls these on the engine thread)

    @property
    def lora_names(self) -> list[str]:
        return list(self.runner.lora.adapters) if self.runner.lora is not None else []

    def lora_adapter(self, name: str) -> LoRAAdapter:
        lora = self.runner.lora
        if lora is None:
            raise InvalidParameter("model", f"LoRA adapter {name!r} asked for, but LoRA is off (--enable-lora)")
        if name not in lora.adapters:
            loaded = ", ".join(map(repr, lora.adapters)) or "none"
            raise InvalidParameter("model", f"no LoRA adapter named {name!r} is loaded (loaded: {loaded})")
        return lora.adapters[name]

    def load_lora(self, name: str, path: str) -> None:
        """Load a PEFT adapter under `name`; raises ValueError when LoRA is off or the adapter does not fit."""
        self.runner.load_lora(name, path)

    def unload_lora(self, name: str) -> None:
        """Unload an adapter no unfinished request uses (raises ValueError otherwise)."""
        adapter_id = self.lora_adapter(name).adapter_id
        users = sum(1 for group in self.groups.values() for child in group.children if child.lora_id == adapter_id)
        if users:
            raise ValueError(f"LoRA adapter {name!r} is in use by {users} unfinished requests; unload it after them")
        self.runner.unload_lora(name)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its KV blocks at once; returns its final delta."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return None
        for child in group.children:
            self._finish(child, "abort")
        return group.take_delta()

    # ------------------------------------------------------------------------------------------------
    # The step

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix (e.g. after changing weights); False while requests hold blocks."""
        return self.kv_cache.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return the new tokens/text of every request that progressed.

        With async scheduling, a decode step is launched and, while the device runs it, the next one (the
        same requests, one token further) is scheduled and launched behind it before the first is read
        back: the host's scheduling and bookkeeping overlap the device's work.
        """
        if self._in_flight is not None:
            return self._read_back_in_flight()
        self.speculator.propose(self.scheduler.running)
        scheduled = self.scheduler.schedule().scheduled
        if not scheduled:
            return []
        if self.async_scheduling and self.runner.can_launch(scheduled):
            self._in_flight = self._launch(scheduled, None)
            return self._read_back_in_flight()
        return self._apply(scheduled, self.runner.execute(scheduled).sampled)

    def _launch(self, scheduled: list[ScheduledRequest], previous: LaunchedStep | None) -> LaunchedStep:
        launched = self.runner.launch(scheduled, previous)
        for s in scheduled:
            s.request.add_pending_token()
        return launched

    def _read_back_in_flight(self) -> list[RequestOutput]:
        """Launch the step behind the one in flight when it can be scheduled now, then read the one in flight."""
        in_flight = self._in_flight
        assert in_flight is not None
        ahead = self._schedule_behind(in_flight)
        self._in_flight = self._launch(ahead, in_flight) if ahead else None
        self.num_overlapped_steps += ahead is not None
        tokens = in_flight.token_ids()
        sampled = {s.request.request_id: ([t], NO_LOGPROBS) for s, t in zip(in_flight.scheduled, tokens, strict=True)}
        return self._apply(in_flight.scheduled, sampled)

    def _schedule_behind(self, in_flight: LaunchedStep) -> list[ScheduledRequest] | None:
        """The next step, scheduled before `in_flight`'s tokens are known: its requests one token further, when
        they are all that runs (nothing waits to be admitted) and the pool has the blocks. Requests that end
        on length with the token in flight are left out; one that stops on a stop token wastes its row. A
        request with a predicted output stops the chain: its drafts come from its tokens, in a plain step."""
        if self.scheduler.waiting or len(self.scheduler.running) != len(in_flight.scheduled):
            return None
        requests = []
        for s in in_flight.scheduled:
            request = s.request
            if request.is_finished or request.prediction is not None:
                return None
            if request.num_output_tokens + 1 < request.max_tokens and request.num_tokens < self.max_model_len:
                requests.append(request)
        scheduled = self.scheduler.schedule_decodes(requests) if requests else None
        assert scheduled is None or self.runner.can_launch(scheduled), "scheduled a step the runner cannot launch"
        return scheduled

    def _apply(
        self, scheduled: list[ScheduledRequest], sampled_by_id: dict[str, tuple[list[int], list[TokenLogprob | None]]]
    ) -> list[RequestOutput]:
        """Commit the sampled tokens, apply stop conditions, and collect each touched request's new output."""
        touched: dict[str, RequestGroup] = {}
        for s in scheduled:
            request = s.request
            if request.prompt_block_hidden:
                self.kv_cache.cache_prompt_logprobs(request)
            if request.embedding is not None and not request.is_finished:  # an embedding request, done
                self._finish(request, "stop")
                touched[request.group_id] = self.groups[request.group_id]
                continue
            sampled = sampled_by_id.get(request.request_id)
            if sampled is None or request.is_finished:  # finished while its step was in flight
                continue
            tokens, logprobs = sampled
            for token, logprob in zip(tokens, logprobs, strict=True):
                request.commit(token)
                if logprob is not None:
                    request.logprobs.append(logprob)
                self._check_stop(request, token)
                if request.is_finished:
                    break
            if s.spec_token_ids:
                num_accepted = len(tokens) - 1
                self.speculator.record(request, len(s.spec_token_ids), num_accepted)
                if not request.is_finished and num_accepted < len(s.spec_token_ids):
                    self.scheduler.rollback(request, len(s.spec_token_ids) - num_accepted)
            group = self.groups[request.group_id]
            if request.is_finished or not group.final_only:  # a final-only group has nothing new until one ends
                touched[request.group_id] = group
        outputs = []
        for group_id, group in touched.items():
            if group.final_only and not group.finished:
                continue
            outputs.append(group.take_delta())
            if outputs[-1].finished:
                del self.groups[group_id]
        return outputs

    def _check_stop(self, request: Request, token: int) -> None:
        grammar = request.grammar
        if grammar is not None and not grammar.accept_token(token):  # the mask allowed only tokens it accepts
            logger.error("request %s: the grammar rejected token %d; aborting it", request.request_id, token)
            self._finish(request, "abort")
            return
        if token in request.stop_ids:  # masked while below min_tokens
            if request.detokenizer and request.params.include_stop_str_in_output:  # vLLM's: its text ends the output
                request.detokenizer.add_token(token, find_stop=False)
            self._finish(request, "stop", token)
            return
        stop_string = None
        if request.detokenizer:  # with this token counted: stop strings end the text from the min_tokens-th on
            stop_string = request.detokenizer.add_token(token, find_stop=not request.below_min_tokens)
        if stop_string is not None:
            self._finish(request, "stop", stop_string)
        elif grammar is not None and grammar.is_terminated():  # the grammar's end, with no stop token to allow
            self._finish(request, "stop")
        elif request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str, stop_reason: str | int | None = None) -> None:
        request.drop_pending_tokens()
        self.scheduler.finish(request, reason, stop_reason)
        self.speculator.finish(request)


def merge_output(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a streamed delta into the accumulated output of the same request."""
    if acc is None:
        acc = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids, [], False)
    by_index = {o.index: o for o in acc.outputs}
    for d in delta.outputs:
        o = by_index.get(d.index)
        if o is None:
            o = by_index[d.index] = CompletionOutput(d.index, "", [], None if d.logprobs is None else [])
        o.text += d.text
        o.token_ids.extend(d.token_ids)
        if d.logprobs is not None and o.logprobs is not None:
            o.logprobs.extend(d.logprobs)
        o.finish_reason, o.stop_reason = d.finish_reason, d.stop_reason
    acc.outputs = [by_index[i] for i in sorted(by_index)]
    acc.finished = delta.finished
    if delta.prompt_logprobs is not None:
        acc.prompt_logprobs = delta.prompt_logprobs
    acc.num_cached_tokens = max(acc.num_cached_tokens, delta.num_cached_tokens)
    acc.num_draft_tokens = max(acc.num_draft_tokens, delta.num_draft_tokens)  # running totals
    acc.num_accepted_tokens = max(acc.num_accepted_tokens, delta.num_accepted_tokens)
    acc.embedding = delta.embedding or acc.embedding
    acc.first_scheduled = acc.first_scheduled or delta.first_scheduled
    return acc


class LLM:
    """Offline inference: `LLM().generate(prompts, SamplingParams(...))`.

    With no model, loads the embedded default (SmolLM2-135M-Instruct). Keyword arguments configure the
    engine: dtype, device, seed, load_format, block_size, kv_cache_dtype ("auto" or "fp8"), num_blocks,
    kv_cache_memory, max_sequences (a cache of that many whole contexts at most), enable_prefix_caching,
    max_num_seqs, max_num_batched_tokens, max_model_len, scheduling_policy ("fcfs" or "priority"), speculative
    ("ngram", "suffix", "draft:<model>"), num_speculative_tokens, speculative_max_batch_size, prompt_lookup_min
    and prompt_lookup_max (ngram), enforce_eager (no CUDA graphs), async_scheduling (None, the default: where it
    applies), enable_lora, lora_modules ({name: PEFT directory}), max_lora_rank and max_loras.
    `generate(..., lora="name")` runs prompts with an adapter.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        cache_keys = {
            "block_size",
            "kv_cache_dtype",
            "num_blocks",
            "kv_cache_memory",
            "memory_fraction",
            "gpu_memory_utilization",
            "max_sequences",
            "enable_prefix_caching",
        }
        sched_keys = {"max_num_seqs", "max_num_batched_tokens", "max_model_len", "scheduling_policy"}
        spec_keys = {"speculative": "method", "num_speculative_tokens": "num_speculative_tokens"}
        spec_keys["speculative_max_batch_size"] = "max_batch_size"
        spec_keys |= {"prompt_lookup_min": "prompt_lookup_min", "prompt_lookup_max": "prompt_lookup_max"}
        lora_keys = {"enable_lora": "enable", "lora_modules": "modules", "max_lora_rank": "max_rank"}
        lora_keys["max_loras"] = "max_loras"
        cache = CacheConfig(**{k: v for k, v in kwargs.items() if k in cache_keys})
        sched = SchedulerConfig(
            **{"policy" if k == "scheduling_policy" else k: v for k, v in kwargs.items() if k in sched_keys}
        )
        spec = SpeculativeConfig(**{spec_keys[k]: v for k, v in kwargs.items() if k in spec_keys})
        lora = LoRAConfig(**{lora_keys[k]: v for k, v in kwargs.items() if k in lora_keys})
        taken = cache_keys | sched_keys | spec_keys.keys() | lora_keys.keys()
        rest = {k: v for k, v in kwargs.items() if k not in taken}
        self.engine = Engine(
            EngineConfig(model=model, cache=cache, scheduler=sched, speculative=spec, lora=lora, **rest)
        )
        self.tokenizer = self.engine.tokenizer

    def _submit(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: SamplingParams | Sequence[SamplingParams] | None,
        final_only: bool = False,
        lora: str | Sequence[str | None] | None = None,
        pooling: str | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[str]:
        prompts_given = prompt_list(prompts)
        params_list = (
            list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts_given)
        )
        if len(params_list) != len(prompts_given):
            raise ValueError(f"{len(params_list)} sampling params for {len(prompts_given)} prompts")
        loras = [lora] * len(prompts_given) if lora is None or isinstance(lora, str) else list(lora)
        if len(loras) != len(prompts_given):
            raise ValueError(f"{len(loras)} LoRA adapter names for {len(prompts_given)} prompts")
        priorities = [0] * len(prompts_given) if priority is None else list(priority)
        if len(priorities) != len(prompts_given):
            raise ValueError(f"{len(priorities)} priorities for {len(prompts_given)} prompts")
        ids = []
        try:
            for prompt, p, adapter, rank in zip(prompts_given, params_list, loras, priorities, strict=True):
                options = dict(final_only=final_only, lora=adapter, pooling=pooling, priority=rank)
                ids.append(self.engine.add_request(prompt, p, **options))
        except ValueError:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return ids

    def stream(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora: str | Sequence[str | None] | None = None,
    ) -> Iterator[RequestOutput]:
        """Submit all prompts to one engine and yield each step's deltas as they are produced."""
        ids = set(self._submit(prompts, params, lora=lora))
        try:
            while ids:
                for out in self.engine.step():
                    if out.finished:
                        ids.discard(out.request_id)
                    yield out
        finally:
            for request_id in ids:  # the consumer stopped early: free what is left
                self.engine.abort_request(request_id)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora: str | Sequence[str | None] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate to completion; outputs in the order of `prompts`. `lora`: an adapter's name for every prompt,
        or one name (or None: the base model) per prompt. `priority`: one per prompt, lower first (the engine must
        run the "priority" scheduling policy)."""
        ids = self._submit(prompts, params, final_only=True, lora=lora, priority=priority)
        return self._run_to_end(ids, use_tqdm)

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        lora: str | Sequence[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Beam search (see `beam_search.py`): per prompt, in their order, its `beam_width` best continuations as
        the output's samples, best first, each with its `cumulative_logprob`. The prompts' searches step
        together: each engine run extends every live beam of every prompt by one token."""
        engine = self.engine
        tokenized = [engine.tokenize(p) for p in prompt_list(prompts)]
        searches = [BeamSearch(ids, params, engine.eos_token_ids, engine.max_model_len) for _, ids in tokenized]
        while live := [search for search in searches if not search.done]:
            sequences = [ids for search in live for ids in search.sequences()]
            outputs = self.generate(sequences, params.step_params(), lora=lora)
            tops = iter(out.outputs[0].logprobs[0].top for out in outputs)  # type: ignore[index]
            for search in live:
                search.advance([next(tops) for _ in search.live])
        return [
            search.output(f"beam-{index}", text, self.tokenizer)
            for index, (search, (text, _)) in enumerate(zip(searches, tokenized, strict=True))
        ]

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling: str = "last",
        lora: str | Sequence[str | None] | None = None,
    ) -> list[list[float]]:
        """L2-normalized embeddings of the prompts, in their order: the final hidden state of each prompt's last
        token (`pooling="last"`, as embedding models of the Qwen3 and Llama families use) or the mean of all."""
        outputs = self._run_to_end(self._submit(prompts, None, final_only=True, lora=lora, pooling=pooling), False)
        return [out.embedding for out in outputs]  # type: ignore[misc]

    def _run_to_end(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        """Step the engine until the requests `ids` end; their outputs in that order."""
        results: dict[str, RequestOutput] = {}
        progress = _progress(len(ids)) if use_tqdm else None
        try:
            while len(results) < len(ids):
                for out in self.engine.step():  # final-only: one whole output per request, when it ends
                    results[out.request_id] = out
                    if progress is not None:
                        progress[0].advance(progress[1])
        finally:
            if progress is not None:
                progress[0].stop()
            for request_id in ids:
                if request_id not in results:  # interrupted (Ctrl-C, an error): free what is left
                    self.engine.abort_request(request_id)
        return [results[i] for i in ids]


def prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """One prompt (text or token ids) or several, as a non-empty list."""
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]  # type: ignore[list-item]
    if not prompts:
        raise ValueError("no prompts given")
    return list(prompts)  # type: ignore[arg-type]


def _progress(total: int) -> tuple[Any, Any]:
    from rich.progress import Progress

    progress = Progress(transient=True)
    task = progress.add_task("generating", total=total)
    progress.start()
    return progress, task
