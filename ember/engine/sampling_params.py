"""Per-request generation settings, validated up front so a bad value never reaches the engine step."""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.engine.structured_output import StructuredOutputs

MAX_LOGPROBS = 20
# Below this temperature sampling is greedy (as in vLLM): the distribution is the argmax's to within float
# rounding, and dividing the logits by it would overflow float32.
GREEDY_TEMPERATURE = 1e-5
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # beyond it, dividing or multiplying the logits could overflow


class InvalidParameter(ValueError):
    """A bad request value, naming the field it came from (the `param` of the server's error body)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """How to generate one completion (or `n` of them) for a prompt; field meanings follow OpenAI/vLLM."""

    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0  # no stop token (EOS, stop_token_ids) or stop string ends the output before this many
    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE): greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False  # the text ends after the stop string (or stop token) that ended it
    skip_special_tokens: bool = True  # the text leaves special tokens (<|im_end|>, ...) out
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # top-k logprobs per generated token (the sampled token is always included)
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    allowed_token_ids: list[int] | None = None  # only these tokens may be generated
    bad_words: list[str] = field(default_factory=list)  # never generated, as the model's tokens (see engine)
    structured_outputs: StructuredOutputs | None = None  # constrain the output (JSON schema, regex, ...)
    # OpenAI's predicted output: text (or token ids) the output is expected to repeat. It drafts for speculative
    # decoding, so a reply that follows it comes several tokens a step; the output itself is the same.
    prediction: str | list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.bad_words = list(self.bad_words)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise InvalidParameter(message.split()[0], message)  # each message opens with its field's name

        check(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            f"max_tokens must be an integer >= 1, got {self.max_tokens!r}",
        )
        check(
            isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens),
            f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}",
        )
        check(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be -1, 0 or positive, got {self.top_k}")
        check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        check(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(
            -2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"
        )
        low, high = REPETITION_PENALTY_RANGE
        check(
            low <= self.repetition_penalty <= high,
            f"repetition_penalty must be in [{low:g}, {high:g}], got {self.repetition_penalty}",
        )
        check(
            self.seed is None or (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**63),
            f"seed must be a 64-bit signed integer, got {self.seed!r}",
        )
        check(all(isinstance(s, str) and s for s in self.stop), "stop must hold non-empty strings")
        check(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids must be non-negative integers",
        )
        check(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        check(
            self.logit_bias is None
            or all(isinstance(t, int) and t >= 0 and -100.0 <= b <= 100.0 for t, b in self.logit_bias.items()),
            "logit_bias must map token ids to values in [-100, 100]",
        )
        check(
            self.allowed_token_ids is None
            or (bool(self.allowed_token_ids) and all(isinstance(t, int) and t >= 0 for t in self.allowed_token_ids)),
            "allowed_token_ids must be a non-empty list of token ids",
        )
        check(all(isinstance(w, str) and w for w in self.bad_words), "bad_words must hold non-empty strings")
        check(
            self.prediction is None
            or isinstance(self.prediction, str)
            or all(isinstance(t, int) and t >= 0 for t in self.prediction),
            "prediction must be a string or a list of token ids",
        )
        check(
            self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputs),
            "structured_outputs must be a StructuredOutputs",
        )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(
                value is None or (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS),
                f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}",
            )

    def stop_token_set(self, eos_token_ids: list[int]) -> set[int]:
        """The tokens that end the output: `stop_token_ids`, and the model's EOS tokens unless `ignore_eos`."""
        return set(self.stop_token_ids) | (set() if self.ignore_eos else set(eos_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def adjusts_logits(self) -> bool:
        """Whether sampling changes the model's logits for this request: bias, token masks, penalties, grammar."""
        return bool(
            self.logit_bias
            or self.allowed_token_ids is not None
            or self.bad_words
            or self.min_tokens
            or self.uses_penalties
            or self.structured_outputs
        )

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
