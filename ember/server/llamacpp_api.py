"""llama.cpp's own server API (`POST /completion`, `POST /infill`, `GET /props`), so that clients written for
`llama-server` (editor plugins such as llama.vscode and llama.vim, scripts) run against Ember unchanged.

A request is a prompt (text or token ids) with llama.cpp's sampling fields and defaults (temperature 0.8, top_k
40, top_p 0.95, min_p 0.05; `n_predict` -1: until the context ends). `/infill` lays the prompt out for
fill-in-the-middle as llama.cpp does: the `input_extra` chunks (other files, as context) first, in a
repository-level layout (`<|repo_name|>`, `<|file_sep|>` before each file) when the tokenizer has those tokens,
else as plain text; then `input_prefix`, `input_suffix` and, after the middle token, `prompt` (the start of the
line being typed). The reply is llama.cpp's object: `content`, `stop`, `stop_type` (`eos`, `limit`, `word`),
`stopping_word`, `tokens_predicted`, `tokens_evaluated`, `timings`; streamed, a `data:` object per piece of text,
then one with `stop: true` and the totals. `response_fields` keeps only the fields named (`timings/prompt_n`: a
nested one), as llama.cpp does. `n_probs` adds `completion_probabilities`: each generated token's logprob and
the most likely tokens' at its place, under the model (llama.cpp's `post_sampling_probs`, the probabilities
after its sampler chain, is not served). llama.cpp's other knobs (samplers order, mirostat, DRY, `cache_prompt`,
time limits, ...) are ignored: the prefix cache is always on. `GET /props` describes the server as llama.cpp's
does: the context size, the sampling defaults, the slots (sequences run at once), the chat template.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydantic import ConfigDict, Field

import ember
from ember.engine.request import RequestOutput, TokenLogprob
from ember.engine.sampling_params import SamplingParams
from ember.server.fill_in_middle import fim_prompt, fim_token_ids
from ember.server.protocol import OpenAIModel

REPO_TOKENS = ("<|repo_name|>", "<|file_sep|>")  # Qwen2.5-Coder's repository-level FIM layout


class ExtraChunk(OpenAIModel):
    filename: str = ""
    text: str = ""


class LlamaCppRequest(OpenAIModel):
    model_config = ConfigDict(extra="ignore")  # llama.cpp's many other knobs: ignored (see the module's note)
    prompt: str | list[int] = ""
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = Field(default_factory=list)
    n_predict: int = -1  # -1: until the context ends
    temperature: float = Field(0.8, ge=0.0)
    top_k: int = 40  # 0 or less: off
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = -1  # -1: random
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False
    n_probs: int = Field(0, ge=0, le=20)  # the most likely tokens' logprobs at each generated token's place
    stream: bool = False
    response_fields: list[str] | None = None

    def sampling_params(self) -> SamplingParams:
        """The engine's parameters (raises InvalidParameter naming a bad field)."""
        return SamplingParams(
            max_tokens=None if self.n_predict < 0 else self.n_predict,
            temperature=self.temperature,
            top_k=max(self.top_k, 0),
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=None if self.seed == -1 else self.seed,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            logprobs=self.n_probs or None,
        )


def defaults() -> dict[str, Any]:
    """llama.cpp's sampling defaults, as `/props` shows them."""
    request = LlamaCppRequest()
    names = ("n_predict", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "presence_penalty",
             "frequency_penalty", "seed", "n_probs", "ignore_eos", "stop")  # fmt: skip
    return {name: getattr(request, name) for name in names}


def props(model: str, context: int, slots: int, chat_template: str | None, tokenizer: Any) -> dict[str, Any]:
    """`GET /props`: what llama.cpp's server says of itself that Ember has an answer to."""

    def token(name: str) -> str:
        return getattr(tokenizer, name, None) or "" if tokenizer is not None else ""

    return {
        "default_generation_settings": {"n_ctx": context, "model": model, "params": defaults()},
        "total_slots": slots,
        "model_alias": model,
        "model_path": model,
        "modalities": {"vision": False, "audio": False},
        "chat_template": chat_template or "",
        "bos_token": token("bos_token"),
        "eos_token": token("eos_token"),
        "build_info": f"ember {ember.__version__}",
    }


def infill_prompt(tokenizer: Any, body: LlamaCppRequest) -> list[int]:
    """The token ids of an /infill request (see the module's note); ValueError for a model without FIM tokens."""
    fim = fim_token_ids(tokenizer)
    if fim is None:
        raise ValueError("/infill needs a model trained to fill in the middle, with FIM tokens such as <|fim_prefix|>")

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    vocab = tokenizer.get_vocab()
    ids: list[int] = []
    if all(token in vocab for token in REPO_TOKENS):
        repo, file_sep = (vocab[token] for token in REPO_TOKENS)
        ids += [repo, *encode("myproject\n")]
        for chunk in body.input_extra:
            ids += [file_sep, *encode(f"{chunk.filename}\n{chunk.text}")]
        ids += [file_sep, *encode("filename\n")]
    else:
        for chunk in body.input_extra:
            ids += encode(chunk.text)
    typed = list(body.prompt) if isinstance(body.prompt, list) else encode(body.prompt)  # text or token ids
    return ids + fim_prompt(encode(body.input_prefix), encode(body.input_suffix), fim) + typed


class LlamaCppReply:
    """llama.cpp's reply to one request, built from the engine's outputs as they come (its timings too)."""

    def __init__(self, model: str, num_prompt_tokens: int, token_text: Callable[[int], str]) -> None:
        self.model = model
        self.num_prompt_tokens = num_prompt_tokens
        self.token_text = token_text
        self.probabilities: list[dict[str, Any]] = []  # `completion_probabilities`, when n_probs asks
        self.started = time.monotonic()
        self.first_token: float | None = None
        self.content = ""
        self.tokens: list[int] = []
        self.num_cached = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    def feed(self, out: RequestOutput) -> dict[str, Any] | None:
        """Take one delta; the streamed object for its new text (None when it has none)."""
        self.num_cached = max(self.num_cached, out.num_cached_tokens)
        if not out.outputs:
            return None
        o = out.outputs[0]
        if o.token_ids and self.first_token is None:
            self.first_token = time.monotonic()
        self.content += o.text
        self.tokens += o.token_ids
        self.finish_reason, self.stop_reason = o.finish_reason or self.finish_reason, o.stop_reason
        probabilities = [self.probability(lp) for lp in o.logprobs or []]
        self.probabilities += probabilities
        if not o.text and not o.token_ids:
            return None
        piece = {"content": o.text, "tokens": list(o.token_ids), "stop": False, "id_slot": 0}
        return {**piece, "completion_probabilities": probabilities} if probabilities else piece

    def probability(self, logprob: TokenLogprob) -> dict[str, Any]:
        """llama.cpp's entry for one generated token: its id, text, bytes and logprob, and the top tokens'."""

        def entry(token_id: int, value: float) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"id": token_id, "token": text, "bytes": list(text.encode()), "logprob": value}

        top = [entry(token_id, value) for token_id, value in logprob.top]
        return {**entry(logprob.token_id, logprob.logprob), "top_logprobs": top}

    def final(self, fields: list[str] | None, content: str | None = None) -> dict[str, Any]:
        """The last object: the whole text (or `content`: "" when streamed), why it stopped, and timings;
        only `fields` when given."""
        end = time.monotonic()
        first = self.first_token or end
        kind, word = stop_type(self.finish_reason, self.stop_reason)
        predicted, computed = len(self.tokens), self.num_prompt_tokens - self.num_cached
        prompt_ms, predicted_ms = (first - self.started) * 1000, (end - first) * 1000
        body = {
            "index": 0,
            "content": self.content if content is None else content,
            "tokens": [] if content is not None else self.tokens,
            "id_slot": 0,
            "stop": True,
            "model": self.model,
            "tokens_predicted": predicted,
            "tokens_evaluated": self.num_prompt_tokens,
            "tokens_cached": self.num_cached,
            "has_new_line": "\n" in self.content,
            "stop_type": kind,
            "stopping_word": word,
            "truncated": False,
            "timings": {
                "cache_n": self.num_cached,
                "prompt_n": computed,
                "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_ms / max(computed, 1),
                "prompt_per_second": computed / max(prompt_ms / 1000, 1e-9),
                "predicted_n": predicted,
                "predicted_ms": predicted_ms,
                "predicted_per_token_ms": predicted_ms / max(predicted, 1),
                "predicted_per_second": predicted / max(predicted_ms / 1000, 1e-9),
            },
        }
        if self.probabilities and content is None:
            body["completion_probabilities"] = self.probabilities
        return body if fields is None else select_fields(body, fields)


def stop_type(finish_reason: str | None, stop_reason: str | int | None) -> tuple[str, str]:
    """llama.cpp's `stop_type` and `stopping_word` for the engine's finish and stop reasons."""
    if finish_reason == "length":
        return "limit", ""
    if isinstance(stop_reason, str):
        return "word", stop_reason
    return ("eos", "") if finish_reason == "stop" else ("none", "")


def select_fields(body: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """llama.cpp's `response_fields`: each named field, a nested one by its path (`timings/prompt_n`), under
    the name asked for; fields the reply lacks are left out."""
    selected = {}
    for path in fields:
        value: Any = body
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            selected[path] = value
    return selected
