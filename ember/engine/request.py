"""A request's state inside the engine, and the outputs handed back to callers."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ember.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ember.spec.prediction import PredictedOutput


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """A generated (or prompt) token's logprob under the model, with the top alternatives at that position."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


PENDING_TOKEN = -1  # placeholder of a token still on the device


class Request:
    """One sequence being generated. `n > 1` requests are expanded into one Request per sample."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: list[int],
        max_tokens: int,
        prompt: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.group_id = request_id.rpartition("#")[0]  # the user request it samples for ("<group id>#<index>")
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.max_tokens = max_tokens
        self.stop_ids = params.stop_token_set(eos_token_ids)
        # most requests take the raw logits: a batch of them passes `adjust_logits` after one check of this
        self.adjusts_logits = params.adjusts_logits
        self.all_token_ids: list[int] = list(prompt_token_ids)
        # async scheduling: the last tokens of all_token_ids may be placeholders for tokens sampled on the GPU
        # and not read back yet (at most two: the step in flight and the one scheduled behind it)
        self.num_pending_tokens = 0
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        # only ever appended to in place; shrinking it (freeing, trimming) puts a new list in its place, which is how
        # `DecodeGraphs` knows the table it holds on the device for this request is stale
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []  # prefix-cache hashes of the full blocks of all_token_ids
        self.num_cached_blocks = 0  # leading blocks already registered in the prefix cache
        self.num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at admission
        self.lora_id = 0  # the LoRA adapter it runs with (`LoRAAdapter.adapter_id`); 0: the base model
        self.priority = 0  # the "priority" scheduling policy serves lower values first
        self.arrival = 0  # its place in the order requests reached the scheduler
        self.cache_salt: str | None = None  # its prefix cache is shared only with requests of the same salt
        self.first_scheduled: float | None = None  # time.monotonic() when the scheduler first admitted it
        # an embedding request ("last" or "mean" pooling of the prompt's final hidden states) samples nothing: it
        # ends when its prompt is computed, with `embedding` (L2-normalized, fp32, on the host)
        self.pooling: str | None = None
        self.pooled_sum: torch.Tensor | None = None  # mean pooling: the sum over the first `num_pooled` positions
        self.num_pooled = 0
        self.embedding: torch.Tensor | None = None
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.num_preemptions = 0
        self.spec_token_ids: list[int] = []  # drafted tokens to verify in the next step
        self.num_draft_tokens = 0  # speculative decoding: tokens drafted for this request so far
        self.num_accepted_tokens = 0  # of which the target model accepted
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] = []  # position 0 has none
        # for the prefix cache: the final hidden state of each full prompt block's last position (it scores the
        # token after the block), until the cache takes it; and, after a cache hit, the one before the first
        # computed token
        self.prompt_block_hidden: dict[int, torch.Tensor] = {}
        self.prompt_boundary_hidden: torch.Tensor | None = None
        self.output_text = ""
        self.detokenizer: Any = None  # set by the engine when a tokenizer exists
        self.grammar: Any = None  # structured output: the xgrammar matcher, advanced with every committed token
        self.bad_words_token_ids: list[list[int]] = []  # set by the engine from params.bad_words
        self.prediction: PredictedOutput | None = None  # set by the engine from params.prediction

    @property
    def rank(self) -> tuple[int, int]:
        """Its place under the priority policy: by priority, then by arrival."""
        return self.priority, self.arrival

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs were asked for and some are not known yet."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    @property
    def below_min_tokens(self) -> bool:
        """Fewer output tokens than `min_tokens`: the stop tokens are masked and stop strings not looked for."""
        return self.num_output_tokens < self.params.min_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_committed_tokens(self) -> int:
        """Tokens known on the host: all but the pending placeholders."""
        return len(self.all_token_ids) - self.num_pending_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens : self.num_committed_tokens]

    @property
    def num_output_tokens(self) -> int:
        return self.num_committed_tokens - self.num_prompt_tokens

    def add_pending_token(self) -> None:
        """A token is being sampled on the device: hold its place (scheduling counts it) until `commit`."""
        self.all_token_ids.append(PENDING_TOKEN)
        self.num_pending_tokens += 1

    def commit(self, token: int) -> None:
        """Record a sampled token: it takes the oldest pending place, or is appended."""
        if self.num_pending_tokens:
            self.all_token_ids[len(self.all_token_ids) - self.num_pending_tokens] = token
            self.num_pending_tokens -= 1
        else:
            self.all_token_ids.append(token)

    def drop_pending_tokens(self) -> None:
        """Forget placeholders whose tokens will not be committed (the request finished before them)."""
        if self.num_pending_tokens:
            del self.all_token_ids[-self.num_pending_tokens :]
            self.num_pending_tokens = 0

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED


@dataclass
class CompletionOutput:
    """One sample of a request. For streaming, `text` and `token_ids` hold only the new part."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    cumulative_logprob: float | None = None  # a beam search output's: its tokens' logprobs summed


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_draft_tokens: int = 0  # speculative decoding, over all samples: tokens drafted
    num_accepted_tokens: int = 0  # of which accepted by the target model
    embedding: list[float] | None = None  # an embedding request's, once finished
    first_scheduled: float | None = None  # time.monotonic() when it first ran (its first sample's): queue time ends
