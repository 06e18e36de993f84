"""Beam search: the `beam_width` most likely continuations of a prompt (vLLM's `use_beam_search`, `LLM.beam_search`).

It runs above the engine, as vLLM's does. Each step asks the engine for one more token of every live beam, with
that position's top 2 * beam_width logprobs; every (beam, token) pair is a candidate, the `beam_width` best that
did not stop live on, and those that ended at a stop token are set aside, finished. The prefix cache keeps the
steps cheap: a beam's earlier tokens sit in cached blocks, and only its last, partial block is computed again.
Candidates rank by cumulative logprob / length ** length_penalty, the length counting the prompt and not the stop
token (the rule of HF transformers and vLLM). After `max_tokens` steps, or once no beam lives, the best
`beam_width` of the finished and the living are the outputs, best first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ember.engine.request import CompletionOutput, RequestOutput
from ember.engine.sampling_params import MAX_LOGPROBS, InvalidParameter, SamplingParams

MAX_BEAM_WIDTH = MAX_LOGPROBS // 2  # each step reads 2 * beam_width logprobs


@dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0  # > 1 favors longer outputs, < 1 shorter ones
    include_stop_str_in_output: bool = False  # the text ends with the stop token's
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise InvalidParameter("n", f"n (the beam width) must be in [1, {MAX_BEAM_WIDTH}], got {self.beam_width}")
        if self.max_tokens < 1:
            raise InvalidParameter("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")

    def step_params(self) -> SamplingParams:
        """What each step asks the engine for, per beam: one token and the top logprobs at its position."""
        return SamplingParams(max_tokens=1, temperature=0.0, logprobs=2 * self.beam_width, ignore_eos=True)


@dataclass
class Beam:
    token_ids: list[int]  # generated so far
    cumulative_logprob: float
    stopped: bool = False  # ended at a stop token, its last


class BeamSearch:
    """One prompt's search. Drive it with `sequences` (what to extend next), the engine, and `advance`."""

    def __init__(
        self, prompt_ids: list[int], params: BeamSearchParams, eos_token_ids: list[int], max_model_len: int
    ) -> None:
        self.prompt_ids, self.params = prompt_ids, params
        self.stop_ids = set() if params.ignore_eos else set(eos_token_ids)
        self.max_steps = min(params.max_tokens, max_model_len - len(prompt_ids))
        self.live = [Beam([], 0.0)]
        self.stopped: list[Beam] = []
        self.steps = 0

    @property
    def done(self) -> bool:
        return not self.live or self.steps >= self.max_steps

    def sequences(self) -> list[list[int]]:
        """The prompt with each live beam's tokens: the sequences whose next token the step asks for."""
        return [self.prompt_ids + beam.token_ids for beam in self.live]

    def advance(self, tops: list[list[tuple[int, float]]]) -> None:
        """Take the step's top (token id, logprob) pairs of each live beam, in `sequences` order."""
        candidates = [
            Beam([*beam.token_ids, token], beam.cumulative_logprob + logprob, token in self.stop_ids)
            for beam, top in zip(self.live, tops, strict=True)
            for token, logprob in top
        ]
        candidates.sort(key=self.score, reverse=True)
        self.stopped += [beam for beam in candidates if beam.stopped]
        self.live = [beam for beam in candidates if not beam.stopped][: self.params.beam_width]
        self.steps += 1

    def score(self, beam: Beam) -> float:
        length = len(self.prompt_ids) + len(beam.token_ids) - beam.stopped
        return beam.cumulative_logprob / length**self.params.length_penalty

    def output(self, request_id: str, prompt: str | None, tokenizer: Any) -> RequestOutput:
        """The best beams as a finished request's samples, best first."""
        best = sorted(self.stopped + self.live, key=self.score, reverse=True)[: self.params.beam_width]
        outputs = []
        for index, beam in enumerate(best):
            shown = (
                beam.token_ids[:-1] if beam.stopped and not self.params.include_stop_str_in_output else beam.token_ids
            )
            text = tokenizer.decode(shown, skip_special_tokens=self.params.skip_special_tokens) if tokenizer else ""
            reason, stop_token = ("stop", beam.token_ids[-1]) if beam.stopped else ("length", None)
            outputs.append(
                CompletionOutput(
                    index, text, beam.token_ids, None, reason, stop_token, cumulative_logprob=beam.cumulative_logprob
                )
            )
        return RequestOutput(request_id, prompt, self.prompt_ids, outputs, True)
