"""When to speculate, how far, and how well it goes.

Each step, before scheduling, the speculator asks its proposer for drafts for the running requests
that are decoding; a request that came with a predicted output drafts from it instead (see `prediction.py`),
with or without a proposer. It skips the step entirely when more than `max_batch_size` requests run: with a
big batch the step is compute-bound, verifying drafts costs nearly as much as decoding them, and
users of other engines report 1.4-1.8x slowdowns under load. Per request, the draft length adapts to
the acceptance seen so far, and requests with repetition/presence/frequency penalties (whose logits
depend on every earlier token, drafts included) and requests with structured output (whose drafts the grammar
would have to check token by token) do not speculate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.config import SpeculativeConfig
from ember.engine.request import Request
from ember.models.loader import LoadedModel, load_model
from ember.spec.draft import DraftModelProposer
from ember.spec.ngram import NgramProposer
from ember.spec.proposer import Proposer
from ember.spec.suffix import SuffixProposer

# A predicted output is mostly right where it applies. SmolLM2 (bf16, CPU) repeating its prediction ran 2.9x
# plain decoding's tokens/s with 5 drafts a step and 3.5x with 8 (the CPU's one-call step holds 8 rows)
PREDICTION_DRAFT_TOKENS = 8


@dataclass
class SpecStats:
    num_steps: int = 0  # request-steps that verified at least one draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verifying request-step: accepted drafts plus the one the target adds."""
        return 1.0 + self.num_accepted_tokens / self.num_steps if self.num_steps else 0.0


def load_draft_model(config: SpeculativeConfig, device: str, dtype: torch.dtype) -> LoadedModel | None:
    """The draft model of `draft:<model>`, else None. Loaded before the KV cache is sized: its weights take
    memory, and its own KV cache shares the budget (see `Engine._num_blocks`)."""
    method = config.method or ""
    return load_model(method.removeprefix("draft:"), "auto", dtype, device) if method.startswith("draft:") else None


def build_proposer(
    config: SpeculativeConfig,
    vocab_size: int,
    num_blocks: int,
    block_size: int,
    device: str,
    dtype: torch.dtype,
    draft: LoadedModel | None = None,
) -> Proposer:
    """The proposer of `config.method`; `draft:<model>` uses `draft` when given, else loads the model."""
    method = config.method or ""
    if method == "ngram":
        return NgramProposer(config.prompt_lookup_max, config.prompt_lookup_min)
    if method == "suffix":
        return SuffixProposer()
    if method.startswith("draft:"):
        draft = draft or load_draft_model(config, device, dtype)
        assert draft is not None
        return DraftModelProposer(draft, vocab_size, num_blocks, block_size, device, dtype)
    raise ValueError(f"unknown speculative method {config.method!r}")


class Speculator:
    def __init__(
        self, config: SpeculativeConfig, proposer: Proposer | None, max_model_len: int, max_rows: int | None = None
    ) -> None:
        """`proposer`: None when only predicted outputs draft. `max_rows`: query rows a step may hold (running
        requests plus their drafts), when steps within it run much cheaper (the CPU's one-call step); drafts are
        then cut to fit, or skipped."""
        self.config = config
        self.proposer = proposer
        self.max_model_len = max_model_len
        self.max_rows = max_rows
        self.enabled = True
        self.stats = SpecStats()

    def draft_budget(self, request: Request) -> int:
        """Drafts for this request: adapted to its acceptance so far, never past max_tokens or the context."""
        k = self.config.num_speculative_tokens
        if request.prediction is not None:
            k = max(k, PREDICTION_DRAFT_TOKENS)
        if request.num_draft_tokens >= 2 * k:  # enough history: draft about what tends to be accepted, plus one
            rate = request.num_accepted_tokens / request.num_draft_tokens
            k = max(1, min(k, round(rate * k) + 1))
        room = min(request.max_tokens - request.num_output_tokens, self.max_model_len - request.num_tokens) - 1
        return max(0, min(k, room))

    def propose(self, running: list[Request]) -> None:
        """Set `spec_token_ids` on the decoding requests worth speculating on this step (and clear the rest:
        drafts of a request the last step could not schedule are not carried into a step that should not
        speculate)."""
        for request in running:
            request.spec_token_ids = []
        if not self.enabled or len(running) > self.config.max_batch_size:
            return
        candidates = [
            r
            for r in running
            if (r.prediction is not None or self.proposer is not None)
            and r.num_computed_tokens == r.num_tokens - 1
            and not r.params.uses_penalties
            and r.grammar is None
            and r.num_output_tokens > 0
            and not r.below_min_tokens  # each draft position would need its own stop-token mask
            and not r.bad_words_token_ids  # likewise its own bad-word mask, from the drafts before it
        ]
        if not candidates:
            return
        budgets = self._fit_rows([self.draft_budget(r) for r in candidates], len(running))
        proposed = []
        for request, budget in zip(candidates, budgets, strict=True):
            if request.prediction is not None:
                request.spec_token_ids = request.prediction.drafts(request, budget)
            else:
                proposed.append((request, budget))
        if proposed:
            assert self.proposer is not None
            requests, budgets = [r for r, _ in proposed], [k for _, k in proposed]
            for request, draft in zip(requests, self.proposer.propose(requests, budgets), strict=True):
                request.spec_token_ids = draft

    def _fit_rows(self, budgets: list[int], num_running: int) -> list[int]:
        """Cut the draft budgets so the step holds at most `max_rows` rows, spread evenly over the candidates;
        all zero when not every candidate can keep one draft."""
        if self.max_rows is None or num_running + sum(budgets) <= self.max_rows:
            return budgets
        room = self.max_rows - num_running
        if room < len(budgets):
            return [0] * len(budgets)
        share, extra = divmod(room, len(budgets))
        return [min(b, share + (i < extra)) for i, b in enumerate(budgets)]

    def record(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        if num_drafts == 0:
            return
        request.num_draft_tokens += num_drafts
        request.num_accepted_tokens += num_accepted
        self.stats.num_steps += 1
        self.stats.num_draft_tokens += num_drafts
        self.stats.num_accepted_tokens += num_accepted

    def finish(self, request: Request) -> None:
        if self.enabled and self.proposer is not None:  # a disabled one (a benchmark's baseline) learns nothing
            self.proposer.finish(request)
