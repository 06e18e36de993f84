"""OpenAI API request and response models (the subset Ember serves), as pydantic models.

Requests validate types and ranges here; anything the engine does not support yet is rejected with a
clear message instead of being silently ignored, vLLM's extra sampling fields included. Other unknown
fields are ignored, each named once in the server's log.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field

from ember.engine.beam_search import BeamSearchParams
from ember.engine.sampling_params import MAX_LOGPROBS, InvalidParameter, SamplingParams
from ember.engine.structured_output import StructuredOutputs

MAX_N = 16
# request fields that beam search cannot honor: a value other than the field's default is refused with it
NOT_WITH_BEAM_SEARCH = (
    "stream",
    "stop",
    "stop_token_ids",
    "min_tokens",
    "logit_bias",
    "allowed_token_ids",
    "bad_words",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "structured_outputs",
    "prediction",
    "prompt_logprobs",
    "logprobs",
    "top_logprobs",
    "tools",
    "response_format",
)

# vLLM's extra sampling fields that Ember does not implement: the values that ask for nothing (clients written
# for vLLM send them), and what to do instead. Any other value is refused rather than ignored.
VLLM_FIELDS_NOT_SUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "best_of": ((None, 1), "ask for 'n' samples"),
    **{
        f"guided_{kind}": ((None,), f"vLLM's newer form is served: 'structured_outputs': {{\"{kind}\": ...}}")
        for kind in ("json", "regex", "choice", "grammar")
    },
}
logger = logging.getLogger("ember.server")
_unknown_fields_logged: set[str] = set()


def check_unknown_fields(extra: dict[str, Any], not_supported: dict[str, tuple[tuple[Any, ...], str]]) -> None:
    """Refuse the fields of `not_supported` (name: the values that ask for nothing, what to do instead) when they
    ask for something, an object when any of its values is set; log any other unknown field, once each."""
    for name, value in extra.items():
        if name in not_supported:
            fine, instead = not_supported[name]
            asks = any(v is not None for v in value.values()) if isinstance(value, dict) else value not in fine
            if asks:
                raise InvalidParameter(name, f"'{name}' is not supported by this server: {instead}")
        elif name not in _unknown_fields_logged:
            _unknown_fields_logged.add(name)
            logger.warning("request field %r is not an Ember field: ignored", name)


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def content_text(content: str | list[dict[str, Any]] | None) -> str:
    """A message's (or a prediction's) content as text: a string as it is, text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise ValueError(f"content part of type {part.get('type')!r} is not supported (only 'text')")
        if not isinstance(part.get("text"), str):
            raise ValueError("a content part of type 'text' needs a 'text' string")
        texts.append(part["text"])
    return "".join(texts)


class PredictedOutputField(OpenAIModel):
    """OpenAI's predicted output: text the reply is expected to repeat (a file sent back with a few lines
    edited). It drafts for speculative decoding; the reply is the model's own either way."""

    type: Literal["content"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        try:
            return content_text(self.content)
        except ValueError as e:
            raise InvalidParameter("prediction", f"prediction: {e}") from e


class StreamOptions(OpenAIModel):
    include_usage: bool = False  # a last chunk, with no choices, carries the usage
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far

    @property
    def usage_in_every_chunk(self) -> bool:
        return self.include_usage and self.continuous_usage_stats


class StructuredOutputsField(OpenAIModel):
    """Ember's (and vLLM's) extension: constrain the output; exactly one field."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def spec(self) -> StructuredOutputs:
        return StructuredOutputs(
            json=self.json_, json_object=self.json_object, regex=self.regex, choice=self.choice, grammar=self.grammar
        )


# the sampling fields a model's generation_config.json may give defaults for (vLLM's `--generation-config auto`)
MODEL_SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The sampling defaults a model's generation config recommends (Qwen3's temperature 0.6, top_p 0.95,
    top_k 20, ...), for requests that do not set them."""
    return {name: generation_config[name] for name in MODEL_SAMPLING_DEFAULTS if name in generation_config}


def model_max_new_tokens(generation_config: dict[str, Any]) -> int | None:
    """The reply length a model's generation config sets (`max_new_tokens`): the default max_tokens of requests
    that leave it out, as in vLLM; a request that sets max_tokens keeps it."""
    value = generation_config.get("max_new_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class Admission(TypedDict, total=False):
    """A request's engine options beside sampling: `Engine.add_request`'s `priority` and `cache_salt`."""

    priority: int
    cache_salt: str | None


class SamplingFields(OpenAIModel):
    """Fields shared by chat and text completions. Unknown fields are kept (`model_extra`) to be checked."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    min_tokens: int = Field(0, ge=0)  # vLLM's: no stop token or string ends the output before this many
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False  # vLLM's: the text ends after the stop string, not before
    skip_special_tokens: bool = True  # vLLM's: False keeps special tokens (<|im_end|>, ...) in the text
    return_token_ids: bool = False  # vLLM's: the prompt's and each choice's token ids come back too
    use_beam_search: bool = False  # vLLM's: the n most likely replies by beam search (sampling fields unused)
    length_penalty: float = 1.0  # vLLM's, for beam search: > 1 favors longer replies
    stop_token_ids: list[int] | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's: each prompt token's, + alternatives
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None  # vLLM's: only these tokens may be generated
    bad_words: list[str] | None = None  # vLLM's: words never generated
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    structured_outputs: StructuredOutputsField | None = None
    prediction: PredictedOutputField | None = None
    truncate_prompt_tokens: int | None = None  # vLLM's: keep only the prompt's last k tokens (-1: the model's length)
    priority: int = 0  # vLLM's: under --scheduling-policy priority, lower values are served first
    cache_salt: str | None = Field(None, min_length=1)  # vLLM's: a prefix cache apart (see `Engine.add_request`)

    def admission(self) -> Admission:
        """How the engine admits the request and caches its prefix, beside what it samples."""
        return {"priority": self.priority, "cache_salt": self.cache_salt}

    def sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        structured: StructuredOutputs | None = None,
        defaults: dict[str, Any] | None = None,
    ) -> SamplingParams:
        """The engine's parameters; `structured` (from a chat request's response format or tools) or else the
        `structured_outputs` field constrains the output; `defaults` (the model's, see `sampling_defaults`) stand
        for the sampling fields the request leaves out."""
        self.check_extra_fields()
        knobs = {name: getattr(self, name) for name in MODEL_SAMPLING_DEFAULTS}
        knobs |= {name: value for name, value in (defaults or {}).items() if name not in self.model_fields_set}
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        bias = None
        if self.logit_bias:
            try:
                bias = {int(token): float(value) for token, value in self.logit_bias.items()}
            except ValueError as e:
                raise InvalidParameter("logit_bias", "logit_bias keys must be token ids (integers as strings)") from e
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            **knobs,
            seed=self.seed,
            stop=stop,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos,
            n=self.n,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
            logit_bias=bias,
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words or [],
            structured_outputs=structured or (self.structured_outputs.spec() if self.structured_outputs else None),
            prediction=(self.prediction.text() or None) if self.prediction else None,
        )

    def beam_search_params(self, max_tokens: int) -> BeamSearchParams | None:
        """vLLM's beam search of `n` beams, when asked for; a field it cannot honor is refused by name."""
        if not self.use_beam_search:
            return None
        fields = type(self).model_fields
        for name in NOT_WITH_BEAM_SEARCH:
            value = getattr(self, name, None)
            if name in fields and value not in (None, "", []) and value != fields[name].default:
                raise InvalidParameter(name, f"'{name}' is not served with beam search (use_beam_search)")
        return BeamSearchParams(
            beam_width=self.n,
            max_tokens=max_tokens,
            ignore_eos=self.ignore_eos,
            length_penalty=self.length_penalty,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
        )

    def check_extra_fields(self) -> None:
        """Refuse vLLM's fields that Ember does not implement when they ask for something; log the other
        unknown fields, once each."""
        check_unknown_fields(self.model_extra or {}, VLLM_FIELDS_NOT_SUPPORTED)


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls, sent back with the conversation
    reasoning_content: str | None = None  # an assistant's earlier thinking (DeepSeek's and llama.cpp's name)
    reasoning: str | None = None  # the same, by vLLM's name

    def text(self) -> str:
        """The message's text; content parts other than text are not supported yet."""
        return content_text(self.content)


class FunctionDefinition(OpenAIModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: the function takes no arguments
    strict: bool | None = None


class Tool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(OpenAIModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def spec(self) -> StructuredOutputs | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputs(json_object=True)
        if self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object")
        return StructuredOutputs(json=self.json_schema.schema_ or {"type": "object"})


class ChatTemplateFields(OpenAIModel):
    """vLLM's switches for how the chat template ends the messages: by default with the assistant's turn
    opened; with `continue_final_message`, the last message (an assistant's) left open, so that the reply
    goes on from its text (a prefill, e.g. the start of a JSON object or of a sentence)."""

    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool | None = None  # None: true unless continue_final_message
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None  # more template variables, e.g. {"enable_thinking": false}
    chat_template: str | None = None  # vLLM's: this request's template (the server must trust request templates)


class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    model_config = ConfigDict(extra="allow")  # as SamplingFields': its check reads the unknown fields
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # None: the server's default (see OpenAIServer.parallel_tool_calls)
    response_format: ResponseFormat | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None


class TokenizeRequest(ChatTemplateFields):
    """vLLM's /tokenize: a prompt, or chat messages (and tools) put through the chat template as a chat request
    would be. llama.cpp's form, `content` (with `add_special`, default false), is taken too."""

    model: str | None = None
    prompt: str | None = None
    tools: list[Tool] | None = None
    add_special_tokens: bool = True  # of a prompt (a chat template writes its own)
    return_token_strs: bool = False
    content: str | None = None  # llama.cpp's prompt field
    add_special: bool = False  # llama.cpp's add_special_tokens, for `content`

    def text_and_specials(self) -> tuple[str | None, bool]:
        """The prompt to tokenize, in either API's field, and whether special tokens (BOS) are added."""
        if self.content is not None and self.prompt is None:
            return self.content, self.add_special
        return self.prompt, self.add_special_tokens


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


class EmbeddingRequest(OpenAIModel):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    truncate_prompt_tokens: int | None = None  # as SamplingFields'
    priority: int = 0  # as SamplingFields'


class LoadLoRAAdapterRequest(OpenAIModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(OpenAIModel):
    lora_name: str = Field(min_length=1)


def new_id(prefix: str, separator: str = "-") -> str:
    """A unique id in OpenAI's style: `chatcmpl-...` on the chat API, `resp_...` on the Responses API."""
    return f"{prefix}{separator}{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
