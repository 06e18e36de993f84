"""llama.cpp's own server API (`POST /completion`, `POST /infill`), so that clients written for `llama-server`
(editor plugins such as llama.vscode and llama.vim, scripts) run against Ember unchanged.

A request is a prompt (text or token ids) with llama.cpp's sampling fields and defaults (temperature 0.8, top_k
40, top_p 0.95, min_p 0.05; `n_predict` -1: until the context ends). `/infill` lays the prompt out for
fill-in-the-middle as llama.cpp does: the `input_extra` chunks (other files, as context) first, in a
repository-level layout (`<|repo_name|>`, `<|file_sep|>` before each file) when the tokenizer has those tokens,
else as plain text; then `input_prefix`, `input_suffix` and, after the middle token, `prompt` (the start of the
line being typed). The reply is llama.cpp's object: `content`, `stop`, `stop_type` (`eos`, `limit`, `word`),
`stopping_word`, `tokens_predicted`, `tokens_evaluated`, `timings`; streamed, a `data:` object per piece of text,
then one with `stop: true` and the totals. `response_fields` keeps only the fields named (`timings/prompt_n`: a
nested one), as llama.cpp does. llama.cpp's other knobs (samplers order, mirostat, DRY, `cache_prompt`, time
limits, ...) are ignored: the prefix cache is always on.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import ConfigDict, Field

from ember.engine.request import RequestOutput
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
        )


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

    def __init__(self, model: str, num_prompt_tokens: int) -> None:
        self.model = model
        self.num_prompt_tokens = num_prompt_tokens
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
        if not o.text and not o.token_ids:
            return None
        return {"content": o.text, "tokens": list(o.token_ids), "stop": False, "id_slot": 0}

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
