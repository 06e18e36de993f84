"""The OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics, and
vLLM's /tokenize, /detokenize and /tokenizer_info.

Every error is an OpenAI-style body `{"error": {"message", "type", "param", "code"}}` with a 4xx status
for the caller's mistakes; one bad request never affects the others.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import json
import logging
import math
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import ember
from ember.engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from ember.engine.beam_search import BeamSearch, BeamSearchParams
from ember.engine.engine import merge_output
from ember.engine.request import RequestOutput, TokenLogprob
from ember.engine.sampling_params import SamplingParams
from ember.engine.schema_check import check_enforceable
from ember.engine.structured_output import StructuredOutputs
from ember.server.chat import ChatFormatter, check_template_syntax
from ember.server.fill_in_middle import fim_prompt, fim_token_ids
from ember.server.llamacpp_api import LlamaCppReply, LlamaCppRequest, infill_prompt, props
from ember.server.messages import MessageBuilder, MessagesRequest, anthropic_error
from ember.server.metrics import EngineMetrics
from ember.server.protocol import (
    Admission,
    ChatCompletionRequest,
    ChatMessage,
    ChatTemplateFields,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoadLoRAAdapterRequest,
    NamedToolChoice,
    StreamOptions,
    TokenizeRequest,
    Tool,
    UnloadLoRAAdapterRequest,
    model_max_new_tokens,
    new_id,
    now,
    sampling_defaults,
)
from ember.server.reasoning import after_thinking, prompt_closes_thinking, prompt_opens_thinking, split_reasoning
from ember.server.reply_parser import ReplyParser
from ember.server.responses import (
    LOGPROBS,
    RESPONSES_PARAMS,
    ResponseBuilder,
    ResponsesRequest,
    ResponseStore,
    StoredResponse,
    input_messages,
    item_page,
    responses_usage,
    stored_input_items,
    turn_starts,
)
from ember.server.scores import RerankRequest, ScoreRequest, cosine, ranked, score_pairs
from ember.server.tool_stream import merged_openai_deltas, split_tool_calls
from ember.server.tools import ToolCallFormat, tool_call_constraint

logger = logging.getLogger("ember.server")
MESSAGES_PATH = "/v1/messages"  # Anthropic's API: its errors take Anthropic's shape


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
    path: str = "",
) -> JSONResponse:
    """OpenAI's error object; Anthropic's on the Messages API's paths (`path`), where its clients look for it."""
    if path.startswith(MESSAGES_PATH):
        return JSONResponse(anthropic_error(status, message), status_code=status)
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


class OpenAIServer:
    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str,
        metrics: EngineMetrics,
        api_key: str | None,
        chat_template: str | None = None,
        allowed_origins: list[str] | None = None,
        reasoning: bool | None = None,
        runtime_lora: bool = False,
        tool_call_parser: str = "auto",
        pooling: str = "last",
        generation_config: str = "auto",
        trust_request_chat_template: bool = False,
    ) -> None:
        """`chat_template` replaces the model's; `allowed_origins` are the browser origins that may call the API
        (None: pages served from this machine, `*`: any); `reasoning`: whether replies are split into thinking
        and answer (None: when the chat template writes think blocks); `runtime_lora`: whether clients may load
        and unload LoRA adapters; `tool_call_parser`: the format of tool calls (`--tool-call-parser`);
        `pooling`: how /v1/embeddings pools a prompt's hidden states ("last", "mean"); `generation_config`:
        "auto" takes the model's sampling defaults for the fields a request leaves out, "vllm" the API's;
        `trust_request_chat_template`: whether a request's own `chat_template` is used (else refused)."""
        self.engine = engine
        self.model_name = model_name
        self.metrics = metrics
        self.api_key = api_key
        self.allowed_origins = allowed_origins
        self.formatter = ChatFormatter(engine.engine.tokenizer, chat_template, reasoning, tool_call_parser)
        self.trust_request_chat_template = trust_request_chat_template
        # formatters of the templates requests send, as the server's own is made (a template parses once)
        self.request_formatter = functools.lru_cache(maxsize=16)(
            functools.partial(
                ChatFormatter, engine.engine.tokenizer, thinks=reasoning, tool_call_parser=tool_call_parser
            )
        )
        self.max_model_len = engine.engine.max_model_len
        self.response_store = ResponseStore()
        self.runtime_lora = runtime_lora
        self.pooling = pooling
        model_defaults = engine.engine.loaded.generation_config if generation_config == "auto" else {}
        self.sampling_defaults = sampling_defaults(model_defaults)
        self.max_new_tokens = model_max_new_tokens(model_defaults)
        if self.sampling_defaults:  # as vLLM says it: requests without these fields sample otherwise than OpenAI's
            shown = ", ".join(f"{name} {value}" for name, value in self.sampling_defaults.items())
            logger.warning("the model's generation config sets the default sampling: %s", shown)
        if self.max_new_tokens is not None:
            logger.warning("the model's generation config sets the default max_tokens: %d", self.max_new_tokens)

    # ------------------------------------------------------------------------------------------------
    # Shared pieces

    def check_model(self, model: str | None) -> str:
        """The model a request names (None: the base model): the base model's name or a LoRA adapter's."""
        if model is None or model == self.model_name or model in self.engine.engine.lora_names:
            return model or self.model_name
        adapters = self.engine.engine.lora_names
        served = repr(self.model_name) + (
            f" and the LoRA adapters {', '.join(map(repr, adapters))}" if adapters else ""
        )
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {served}",
            "invalid_request_error",
            "model",
            "model_not_found",
        )

    def truncated(self, prompt_ids: list[int], keep: int | None) -> list[int]:
        """vLLM's `truncate_prompt_tokens`: the prompt's last `keep` tokens (-1: the model's maximum length), the
        start dropped, so that a long history or document still fits."""
        if keep is None:
            return prompt_ids
        if keep == -1:
            keep = self.max_model_len
        if not 1 <= keep <= self.max_model_len:
            raise APIError(
                400,
                f"'truncate_prompt_tokens' must be -1 (the model's maximum length) or in [1, {self.max_model_len}]",
                param="truncate_prompt_tokens",
            )
        return prompt_ids[-keep:]

    def default_max_tokens(self, prompt_ids: list[int], max_tokens: int | None) -> int | None:
        """A request's own max_tokens, else the model's max_new_tokens (as far as the context has room for it);
        None: until the context ends."""
        if max_tokens is not None or self.max_new_tokens is None:
            return max_tokens
        return min(self.max_new_tokens, self.max_model_len - len(prompt_ids))

    def check_prompt_length(self, prompt_ids: list[int], max_tokens: int | None, param: str = "messages") -> None:
        """A prompt that leaves no room to generate is OpenAI's context_length_exceeded, on `param` (the chat's
        messages, a completion's prompt)."""
        if len(prompt_ids) >= self.max_model_len:
            raise APIError(
                400,
                f"the prompt has {len(prompt_ids)} tokens, but this model's maximum context length "
                f"is {self.max_model_len} tokens",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is not None and len(prompt_ids) + max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"max_tokens ({max_tokens}) plus the prompt's {len(prompt_ids)} tokens exceeds the "
                f"maximum context length of {self.max_model_len} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )

    async def stream_outputs(
        self,
        prompt: list[int],
        params: SamplingParams,
        request_id: str,
        model: str,
        pooling: str | None = None,
        window: asyncio.Semaphore | None = None,
        admission: Admission | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one prompt; `request_id` (the API's id) names it in the engine and its logs;
        `model` (from `check_model`) is the base model or a LoRA adapter; `pooling`: an embedding request;
        `window`: held while the prompt is in the engine (see `prompt_window`); `admission`: the request's
        priority and cache salt."""
        lora = None if model == self.model_name else model
        admission = admission or {}
        async with window or contextlib.nullcontext():
            try:
                async for out in self.engine.generate(prompt, params, request_id, lora, pooling, **admission):
                    yield out
            except ValueError as e:
                raise APIError(400, str(e), param=getattr(e, "param", None)) from e

    def prompt_window(self, num_prompts: int) -> asyncio.Semaphore | None:
        """One call of many prompts (a completion's list, an embeddings batch of up to OpenAI's 2,048 inputs)
        enters the engine a batch's worth at a time: all at once, it could pass the server's capacity on its own
        and get a 429 that no retry would ever cure."""
        max_num_seqs = self.engine.engine.config.scheduler.max_num_seqs
        return asyncio.Semaphore(max_num_seqs) if num_prompts > max_num_seqs else None

    @staticmethod
    def usage(
        prompt_tokens: int,
        completion_tokens: int,
        cached: int = 0,
        drafts: tuple[int, int] | None = None,
        reasoning_tokens: int | None = None,
    ) -> dict[str, Any]:
        """OpenAI's usage object. `drafts` (drafted, accepted), for a request with a predicted output: its tokens
        the model accepted, and those it checked and turned down (what the prediction saved, and cost).
        `reasoning_tokens`, for a reply split into thinking and answer: the thinking's."""
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        details: dict[str, int] = {}
        if reasoning_tokens is not None:
            details["reasoning_tokens"] = reasoning_tokens
        if drafts is not None:
            drafted, accepted = drafts
            details |= {"accepted_prediction_tokens": accepted, "rejected_prediction_tokens": drafted - accepted}
        if details:
            usage["completion_tokens_details"] = details
        return usage

    def chunk_usage(
        self,
        options: StreamOptions,
        prompt_tokens: int,
        completion_tokens: int,
        cached: int,
        drafts: tuple[int, int] | None = None,
    ) -> dict[str, Any]:
        """A stream chunk's `usage` so far, when the client asked for it in every chunk (vLLM's
        `continuous_usage_stats`); else nothing."""
        if not options.usage_in_every_chunk:
            return {}
        return {"usage": self.usage(prompt_tokens, completion_tokens, cached, drafts)}

    # ------------------------------------------------------------------------------------------------
    # Chat completions

    def template_of(self, chat_template: str | None) -> ChatFormatter:
        """The chat template a request is rendered with, its tool-call format and thinking: the server's, or
        the request's own `chat_template` (vLLM's; only with --trust-request-chat-template, since a template is
        code the server runs, sandboxed but unbounded in time)."""
        if chat_template is None:
            return self.formatter
        if not self.trust_request_chat_template:
            message = (
                "this server does not take a request's 'chat_template' (start it with --trust-request-chat-template)"
            )
            raise APIError(400, message, param="chat_template")
        try:
            check_template_syntax(chat_template, "chat_template")
        except ValueError as e:
            raise APIError(400, str(e), param="chat_template") from e
        return self.request_formatter(chat_template)  # type: ignore[no-any-return]

    def prepare_chat(self, body: ChatCompletionRequest) -> PreparedChat:
        """A chat request ready for the engine (also behind /v1/responses)."""
        model = self.check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "'top_logprobs' requires 'logprobs': true", param="top_logprobs")
        template = self.template_of(body.chat_template)
        tools = self.active_tools(body)
        structured = self.chat_constraint(body, tools, template)
        text, prompt_ids = self.chat_prompt(body, body.messages, tools)
        prompt_ids = self.truncated(prompt_ids, body.truncate_prompt_tokens)
        max_tokens = body.max_completion_tokens or body.max_tokens
        self.check_prompt_length(prompt_ids, max_tokens)
        max_tokens = self.default_max_tokens(prompt_ids, max_tokens)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling_params(body, max_tokens, logprobs, structured)
        if tools and template.tool_format.special_trigger:  # the calls open with a special token: keep it
            params = dataclasses.replace(params, skip_special_tokens=False)
        thinking = prompt_opens_thinking(text) if template.thinks else None
        free_start = params.structured_outputs is None or (bool(tools) and body.tool_choice in (None, "auto"))
        if not free_start and thinking is not None:
            if prompt_closes_thinking(text):  # thinking switched off: the constraint holds from the first token
                thinking = None
            else:  # a schema or required calls constrain the answer, after the thinking
                params = dataclasses.replace(
                    params, structured_outputs=after_thinking(params.structured_outputs, thinking)
                )
        tool_format = template.tool_format.for_tools(tools) if tools else None
        return PreparedChat(model, prompt_ids, params, tool_format, thinking, body.return_token_ids, body.admission())

    def chat_prompt(
        self, body: ChatTemplateFields, messages: list[ChatMessage], tools: list[Tool] | None
    ) -> tuple[str, list[int]]:
        """The messages through the chat template, ended as the request asks (see `ChatTemplateFields`): the
        text and its token ids."""
        continuing = body.continue_final_message
        if continuing and body.add_generation_prompt:
            raise APIError(
                400,
                "'continue_final_message' leaves the last message open: it cannot be combined with "
                "'add_generation_prompt': true",
                param="continue_final_message",
            )
        if continuing and messages[-1].role != "assistant":
            raise APIError(400, "'continue_final_message' needs an assistant's message last", param="messages")
        add_generation_prompt = not continuing if body.add_generation_prompt is None else body.add_generation_prompt
        template = self.template_of(body.chat_template)
        taken = sorted(set(body.chat_template_kwargs or {}) & template.reserved_template_names)
        if taken:
            message = f"chat_template_kwargs cannot set {', '.join(map(repr, taken))}: the request's own fields do"
            raise APIError(400, message, param="chat_template_kwargs")
        try:
            return template.prompt(messages, tools, add_generation_prompt, continuing, body.chat_template_kwargs)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        chat = self.prepare_chat(body)
        prompt_ids, params = chat.prompt_ids, chat.params
        request_id, created = api_id("chatcmpl", request), now()
        beam = self.beam_search_params(body, params.max_tokens or self.max_model_len)
        if beam is not None:
            final = await self.beam_search(prompt_ids, beam, request_id, chat.model, request, None, chat.admission)
        else:
            outputs = self.stream_outputs(prompt_ids, params, request_id, chat.model, admission=chat.admission)
            if body.stream:
                first = await anext_or_error(outputs)
                options = body.stream_options or StreamOptions()
                chunks = self.chat_chunks(first, outputs, request_id, created, chat, options)
                return StreamingResponse(chunks, media_type="text/event-stream")
            final = await collect(outputs, request)
        choices = []
        reasoning_tokens = None if chat.opens_thinking is None else 0
        for o in final.outputs:
            message: dict[str, Any] = {"role": "assistant", "content": o.text}
            finish_reason = o.finish_reason
            if chat.opens_thinking is not None:
                thinking, message["content"] = split_reasoning(o.text, chat.opens_thinking)
                reasoning_tokens = (reasoning_tokens or 0) + self.count_tokens(thinking or "")
                if thinking is not None:
                    message["reasoning"] = message["reasoning_content"] = thinking
                    message["content"] = message["content"] or None  # all thinking: no answer yet
            if chat.tool_format is not None and message["content"]:
                content, calls = split_tool_calls(message["content"], chat.tool_format)
                message["content"] = content
                if calls:
                    message["tool_calls"] = [call.as_openai() for call in calls]
                    finish_reason = tool_calls_finish_reason(finish_reason)
            choice: dict[str, Any] = {
                "index": o.index,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            if body.logprobs and o.logprobs is not None:
                choice["logprobs"] = self.formatter.chat_logprobs(o.logprobs)
            if body.return_token_ids:
                choice["token_ids"] = list(o.token_ids)
            choices.append(choice)
        completion_tokens = sum(len(o.token_ids) for o in final.outputs)
        response = {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": chat.model,
            "choices": choices,
            "usage": self.usage(
                len(prompt_ids),
                completion_tokens,
                final.num_cached_tokens,
                prediction_drafts(params, [final]),
                reasoning_tokens,
            ),
        }
        if body.prompt_logprobs is not None and final.prompt_logprobs is not None:
            response["prompt_logprobs"] = self.formatter.prompt_logprobs(final.prompt_logprobs)
        if body.return_token_ids:
            response["prompt_token_ids"] = prompt_ids
        return JSONResponse(response)

    @staticmethod
    def active_tools(body: ChatCompletionRequest) -> list[Tool] | None:
        """The tools the model may call: none with tool_choice "none"."""
        choice = body.tool_choice
        if choice not in (None, "none") and not body.tools:
            raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        names: set[str] = set()
        for index, tool in enumerate(body.tools or []):
            if tool.function.name in names:  # a call to it could not say which was meant
                message = f"tools[{index}]: another function is already named {tool.function.name!r}"
                raise APIError(400, message, param=f"tools.{index}.function.name")
            names.add(tool.function.name)
            if tool.function.strict:  # OpenAI's promise: the arguments match the schema exactly
                try:
                    check_enforceable(tool.function.parameters)
                except ValueError as e:
                    message = f"tools[{index}] is strict, but {e}; or send it without 'strict'"
                    raise APIError(400, message, param=f"tools.{index}.function.parameters") from e
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            message = f"tool_choice names {choice.function.name!r}, which is not in 'tools'"
            raise APIError(400, message, param="tool_choice")
        return body.tools if body.tools and choice != "none" else None

    def parallel_tool_calls(self, requested: bool | None, template: ChatFormatter | None = None) -> bool:
        """Whether one reply may hold several calls: as requested, else only when the chat template (the
        server's, or `template`) speaks tool calls (a model never taught the format, like SmolLM2, repeats calls
        until max_tokens) and takes several in one turn."""
        if requested is not None:
            return requested
        template = template or self.formatter
        return template.native_tools and template.tool_format.parallel

    def chat_constraint(
        self, body: ChatCompletionRequest, tools: list[Tool] | None, template: ChatFormatter
    ) -> StructuredOutputs | None:
        """The output constraint of tools or `response_format` (`structured_outputs` is read with the sampling
        fields); at most one of the three."""
        response_format = body.response_format if body.response_format and body.response_format.type != "text" else None
        given = [name for name, value in (("tools", tools), ("response_format", response_format)) if value]
        given += ["structured_outputs"] if body.structured_outputs else []
        if len(given) > 1:
            raise APIError(400, f"use one of {' and '.join(given)}, not both", param=given[1])
        if tools:
            parallel = self.parallel_tool_calls(body.parallel_tool_calls, template)
            return tool_call_constraint(tools, body.tool_choice, parallel, template.tool_format)
        try:
            return response_format.spec() if response_format else None
        except ValueError as e:
            raise APIError(400, str(e), param="response_format") from e

    async def chat_chunks(
        self,
        first: RequestOutput | None,
        rest: AsyncIterator[RequestOutput],
        request_id: str,
        created: int,
        chat: PreparedChat,
        options: StreamOptions,
    ) -> AsyncIterator[str]:
        """SSE chunks of a chat completion. A reasoning model's thinking goes out in `reasoning` deltas. With
        tools, text that may open a tool call is held back, and each call goes out whole (name and arguments)
        in one `tool_calls` delta once it is written. vLLM's `prompt_logprobs` ride on the first chunk after
        the prompt's are known, at the top as in a whole response."""
        base = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": chat.model}
        params, prompt_tokens = chat.params, len(chat.prompt_ids)
        completion_tokens = cached = 0
        drafts = prediction_drafts(params, [])
        want_token_ids = chat.return_token_ids
        for index in range(params.n):
            opening = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
            usage = self.chunk_usage(options, prompt_tokens, completion_tokens, cached, drafts)
            prompt_token_ids = {"prompt_token_ids": chat.prompt_ids} if want_token_ids and index == 0 else {}
            yield sse({**base, "choices": [{**opening, "finish_reason": None}], **prompt_token_ids, **usage})
        parsers = [ReplyParser(chat.tool_format, chat.opens_thinking) for _ in range(params.n)]
        thought = [""] * params.n  # each choice's thinking, counted in the final usage
        prompt_logprobs: dict[str, Any] = {}  # until a chunk carries them
        async for out in prepend(first, rest):
            cached = max(cached, out.num_cached_tokens)
            drafts = prediction_drafts(params, [out])  # running totals
            if out.prompt_logprobs is not None and params.prompt_logprobs is not None:
                prompt_logprobs = {"prompt_logprobs": self.formatter.prompt_logprobs(out.prompt_logprobs)}
            for o in out.outputs:
                completion_tokens += len(o.token_ids)
                logprobs = self.formatter.chat_logprobs(o.logprobs) if o.logprobs else None
                text, finish_reason = o.text, o.finish_reason
                delta: dict[str, Any] = {}
                parser = parsers[o.index]
                thinking, text, calls = parser.feed(text, finish_reason is not None)
                if thinking:
                    delta["reasoning"] = delta["reasoning_content"] = thinking
                    thought[o.index] += thinking
                if finish_reason is not None and parser.num_calls:
                    finish_reason = tool_calls_finish_reason(finish_reason)
                if tool_calls := merged_openai_deltas(calls):
                    delta["tool_calls"] = tool_calls
                if text:
                    delta["content"] = text
                elif not (delta or finish_reason or logprobs or (want_token_ids and o.token_ids)):
                    continue  # nothing to say yet (a held-back tag, half a character)
                choice = {"index": o.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
                if want_token_ids:
                    choice["token_ids"] = list(o.token_ids)
                usage = self.chunk_usage(options, prompt_tokens, completion_tokens, cached, drafts)
                yield sse({**base, "choices": [choice], **prompt_logprobs, **usage})
                prompt_logprobs = {}
        if options.include_usage:
            reasoning_tokens = None if chat.opens_thinking is None else sum(self.count_tokens(t) for t in thought)
            usage = self.usage(prompt_tokens, completion_tokens, cached, drafts, reasoning_tokens)
            yield sse({**base, "choices": [], "usage": usage})
        yield sse("[DONE]")

    # ------------------------------------------------------------------------------------------------
    # Responses API

    async def responses(self, body: ResponsesRequest, request: Request) -> Response:
        self.check_model(body.model)
        history: list[ChatMessage] = []
        if body.previous_response_id is not None:
            previous = self.response_store.get(body.previous_response_id)
            if previous is None:
                message = f"no stored response has the id {body.previous_response_id!r}"
                raise APIError(404, message, param="previous_response_id", code="response_not_found")
            history = previous.conversation
        try:
            body.check_extra_fields()
            conversation, prepared = self.prepare_response(body, history + input_messages(body.input))
        except ValueError as e:
            raise APIError(400, str(e), param=getattr(e, "param", None) or "input") from e
        except APIError as e:
            e.param = RESPONSES_PARAMS.get(e.param or "", e.param)
            raise
        prompt_ids, params = prepared.prompt_ids, prepared.params
        if body.wants_logprobs and prepared.opens_thinking is not None:  # the tokens' text is not the answer's
            message = f"{LOGPROBS!r} is not served for a thinking model's replies: use /v1/chat/completions"
            raise APIError(400, message, param="include")
        # the response shows the values it was made with (the model's defaults for those the request left out)
        used = {"temperature": params.temperature, "top_p": params.top_p}
        body = body.model_copy(
            update={
                "parallel_tool_calls": self.parallel_tool_calls(
                    body.parallel_tool_calls, self.template_of(body.chat_template)
                ),
                **used,
            }
        )
        builder = ResponseBuilder(body, prepared.model, now(), prepared.tool_format, prepared.opens_thinking)
        outputs = self.stream_outputs(prompt_ids, params, builder.id, prepared.model, admission=prepared.admission)
        if body.stream:
            first = await anext_or_error(outputs)
            events = self.response_events(builder, conversation, first, outputs, len(prompt_ids))
            return StreamingResponse(events, media_type="text/event-stream")
        final = await collect(outputs, request)
        output = final.outputs[0]
        builder.feed(
            output.text, True, self.formatter.chat_logprobs(output.logprobs)["content"] if output.logprobs else None
        )
        usage = responses_usage(
            len(prompt_ids), len(output.token_ids), final.num_cached_tokens, self.count_tokens(builder.thinking())
        )
        response = builder.finish(output.finish_reason, usage)[-1]["response"]
        self.store_response(builder, conversation, response)
        return JSONResponse(response)

    def prepare_response(
        self, body: ResponsesRequest, conversation: list[ChatMessage]
    ) -> tuple[list[ChatMessage], PreparedChat]:
        """The conversation as the model will see it, and its chat request ready for the engine. Over the
        context with `truncation: "auto"`, the fewest oldest turns after the task are dropped that make it fit
        (`turn_starts`; found by bisection, a template rendering per try); the latest turn always stays."""
        try:
            return conversation, self.prepare_chat(body.as_chat(conversation))
        except APIError as e:
            if body.truncation != "auto" or e.code != "context_length_exceeded":
                raise
            too_long = e
        head, starts = turn_starts(conversation)
        fits: dict[int, PreparedChat] = {}
        low, high = 1, len(starts) - 1  # turns dropped: the fewest that fit lie in [low, high]
        while low <= high:
            middle = (low + high) // 2
            try:
                fits[middle] = self.prepare_chat(body.as_chat(conversation[:head] + conversation[starts[middle] :]))
                high = middle - 1
            except APIError as e:
                if e.code != "context_length_exceeded":
                    raise
                low = middle + 1
        if low not in fits:
            raise too_long  # not even the task and the latest turn fit
        return conversation[:head] + conversation[starts[low] :], fits[low]

    async def response_events(
        self,
        builder: ResponseBuilder,
        conversation: list[ChatMessage],
        first: RequestOutput | None,
        rest: AsyncIterator[RequestOutput],
        prompt_tokens: int,
    ) -> AsyncIterator[str]:
        """The Responses API's stream: typed events, the last one the whole response (no [DONE])."""
        events = builder.start()
        output_tokens = cached = 0
        finish_reason = None
        async for out in prepend(first, rest):
            cached = max(cached, out.num_cached_tokens)
            for o in out.outputs:
                output_tokens += len(o.token_ids)
                finish_reason = o.finish_reason
                logprobs = self.formatter.chat_logprobs(o.logprobs)["content"] if o.logprobs else None
                events += builder.feed(o.text, o.finish_reason is not None, logprobs)
            for event in events:
                yield f"event: {event['type']}\n{sse(event)}"
            events = []
        usage = responses_usage(prompt_tokens, output_tokens, cached, self.count_tokens(builder.thinking()))
        events = builder.finish(finish_reason, usage)
        self.store_response(builder, conversation, events[-1]["response"])
        for event in events:
            yield f"event: {event['type']}\n{sse(event)}"

    def count_tokens(self, thinking: str) -> int:
        """A reply's thinking in tokens (re-tokenized: the think tags and blanks around it are not counted)."""
        tokenizer = self.engine.engine.tokenizer
        return len(tokenizer(thinking, add_special_tokens=False)["input_ids"]) if thinking and tokenizer else 0

    def store_response(
        self, builder: ResponseBuilder, conversation: list[ChatMessage], response: dict[str, Any]
    ) -> None:
        """Keep the response (unless `store` is false) with its conversation, for `previous_response_id`."""
        if builder.body.store:
            conversation = [*conversation, builder.reply_message()]
            self.response_store.add(StoredResponse(response, conversation, stored_input_items(builder.body.input)))

    def stored_response(self, response_id: str) -> StoredResponse:
        stored = self.response_store.get(response_id)
        if stored is None:
            raise APIError(404, f"no stored response has the id {response_id!r}", code="response_not_found")
        return stored

    # ------------------------------------------------------------------------------------------------
    # Anthropic's Messages API

    async def messages(self, body: MessagesRequest, request: Request) -> Response:
        if body.max_tokens is None:
            raise APIError(400, "max_tokens: Field required", param="max_tokens")
        chat = self.prepare_chat(self.messages_as_chat(body))
        builder = MessageBuilder(chat.model, len(chat.prompt_ids), chat.tool_format, chat.opens_thinking)
        outputs = self.stream_outputs(chat.prompt_ids, chat.params, builder.id, chat.model)
        if body.stream:
            first = await anext_or_error(outputs)
            return StreamingResponse(self.message_events(builder, first, outputs), media_type="text/event-stream")
        final = await collect(outputs, request)
        output = final.outputs[0]
        builder.feed(output.text, True)
        builder.finish(output.finish_reason, output.stop_reason, len(output.token_ids), final.num_cached_tokens)
        return JSONResponse(builder.result)

    async def message_events(
        self, builder: MessageBuilder, first: RequestOutput | None, rest: AsyncIterator[RequestOutput]
    ) -> AsyncIterator[str]:
        """The Messages API's stream: named events, from message_start to message_stop."""
        cached = first.num_cached_tokens if first is not None else 0
        events, output_tokens = builder.start(cached), 0
        finish_reason: str | None = None
        stop: str | int | None = None
        async for out in prepend(first, rest):
            cached = max(cached, out.num_cached_tokens)
            for o in out.outputs:
                output_tokens += len(o.token_ids)
                finish_reason, stop = o.finish_reason, o.stop_reason
                events += builder.feed(o.text, o.finish_reason is not None)
            for event in events:
                yield f"event: {event['type']}\n{sse(event)}"
            events = []
        for event in builder.finish(finish_reason, stop, output_tokens, cached):
            yield f"event: {event['type']}\n{sse(event)}"

    def count_message_tokens(self, body: MessagesRequest) -> dict[str, Any]:
        """/v1/messages/count_tokens: the prompt's tokens, tools included, as /v1/messages would send them."""
        chat = self.messages_as_chat(body)
        self.check_model(chat.model)
        _, prompt_ids = self.chat_prompt(chat, chat.messages, self.active_tools(chat))
        return {"input_tokens": len(prompt_ids)}

    @staticmethod
    def messages_as_chat(body: MessagesRequest) -> ChatCompletionRequest:
        try:
            return body.as_chat()
        except ValueError as e:
            raise APIError(400, str(e), param=getattr(e, "param", None) or "messages") from e

    # ------------------------------------------------------------------------------------------------
    # Text completions

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        model = self.check_model(body.model)
        items = prompt_items(body.prompt)
        if body.suffix:
            items = self.fill_in_middle(body, items)
        prompts = [self.truncated(self.prompt_ids(item), body.truncate_prompt_tokens) for item in items]
        for ids in prompts:
            self.check_prompt_length(ids, body.max_tokens, param="prompt")
        max_tokens = body.max_tokens
        if max_tokens is None:  # OpenAI's default for completions, under the model's own (as vLLM)
            max_tokens = min(16, self.max_new_tokens or 16)
        params = self.sampling_params(body, max_tokens, body.logprobs)
        echoes = None  # each prompt's text as the model saw it, which its choices start with
        if body.echo:
            echoes = [
                item if isinstance(item, str) and body.truncate_prompt_tokens is None else self.decode(ids)
                for item, ids in zip(items, prompts, strict=True)
            ]
        if body.echo and body.logprobs is not None:  # the prompt's tokens get logprobs too (scoring, lm-eval)
            if body.prompt_logprobs not in (None, body.logprobs):
                raise APIError(
                    400, "with 'echo' and 'logprobs', 'prompt_logprobs' must equal 'logprobs'", param="prompt_logprobs"
                )
            params = dataclasses.replace(params, prompt_logprobs=body.logprobs)
        request_id, created = api_id("cmpl", request), now()
        beam = self.beam_search_params(body, max_tokens)
        if beam is not None:
            window = self.prompt_window(len(prompts) * beam.beam_width)
            searches = (
                self.beam_search(ids, beam, f"{request_id}-{i}", model, request, window, body.admission())
                for i, ids in enumerate(prompts)
            )
            finals = list(await asyncio.gather(*searches))
            return self.completion_response(body, finals, prompts, echoes, request_id, created, model, params)
        window = self.prompt_window(len(prompts))
        streams = [
            self.stream_outputs(ids, params, f"{request_id}-{i}", model, window=window, admission=body.admission())
            for i, ids in enumerate(prompts)
        ]
        if body.stream:
            merged = merge_streams(streams)
            first = await anext_or_error(merged)
            chunks = self.completion_chunks(
                first,
                merged,
                request_id,
                created,
                model,
                params,
                sum(len(p) for p in prompts),
                body.stream_options or StreamOptions(),
                body.logprobs is not None,
                body.prompt_logprobs is not None,
                body.return_token_ids,
                echoes,
            )
            return StreamingResponse(chunks, media_type="text/event-stream")
        finals = await asyncio.gather(*(collect(s, request) for s in streams))
        return self.completion_response(body, finals, prompts, echoes, request_id, created, model, params)

    def completion_response(
        self,
        body: CompletionRequest,
        finals: list[RequestOutput],
        prompts: list[list[int]],
        echoes: list[str] | None,
        request_id: str,
        created: int,
        model: str,
        params: SamplingParams,
    ) -> JSONResponse:
        """A whole (unstreamed) completion: each prompt's samples as choices, prompt after prompt."""
        choices = []
        for prompt_index, final in enumerate(finals):
            echo = None if echoes is None else echoes[prompt_index]
            prompt_logprobs = None
            if body.prompt_logprobs is not None and final.prompt_logprobs is not None:
                prompt_logprobs = {"prompt_logprobs": self.formatter.prompt_logprobs(final.prompt_logprobs)}
            token_ids = {"prompt_token_ids": prompts[prompt_index]} if body.return_token_ids else {}
            for o in final.outputs:
                choices.append(
                    {
                        "index": prompt_index * body.n + o.index,
                        "text": o.text if echo is None else echo + o.text,
                        "finish_reason": o.finish_reason,
                        "logprobs": self.completion_logprobs(o.logprobs, 0, final, echo is not None),
                        **(prompt_logprobs or {}),
                        **({**token_ids, "token_ids": list(o.token_ids)} if token_ids else {}),
                    }
                )
        completion_tokens = sum(len(o.token_ids) for f in finals for o in f.outputs)
        return JSONResponse(
            {
                "id": request_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": self.usage(
                    sum(len(p) for p in prompts),
                    completion_tokens,
                    sum(f.num_cached_tokens for f in finals),
                    prediction_drafts(params, finals),
                ),
            }
        )

    async def completion_chunks(
        self,
        first: tuple[int, RequestOutput] | None,
        rest: AsyncIterator[tuple[int, RequestOutput]],
        request_id: str,
        created: int,
        model: str,
        params: SamplingParams,
        prompt_tokens: int,
        options: StreamOptions,
        want_logprobs: bool,
        want_prompt_logprobs: bool,
        want_token_ids: bool,
        echoes: list[str] | None,
    ) -> AsyncIterator[str]:
        """Chunks as tokens arrive; with `echoes`, each choice's first chunk starts with its prompt (and, with
        logprobs, the prompt's tokens); with `prompt_logprobs` (vLLM's), each choice's first chunk holds them; with
        token ids (vLLM's `return_token_ids`), each chunk its new tokens' and each choice's first its prompt's."""
        base = {"id": request_id, "object": "text_completion", "created": created, "model": model}
        completion_tokens = 0
        offsets: dict[int, int] = {}  # per choice: where its next token's text starts (logprobs' text_offset)
        cached: dict[int, int] = {}
        prompt_outputs: dict[int, RequestOutput] = {}  # per prompt: the output that carried its prompt logprobs
        latest: dict[int, RequestOutput] = {}  # per prompt: its last output (draft counts are running totals)
        async for prompt_index, out in prepend(first, rest):
            cached[prompt_index] = max(cached.get(prompt_index, 0), out.num_cached_tokens)
            latest[prompt_index] = out
            if out.prompt_logprobs is not None:
                prompt_outputs[prompt_index] = out
            for o in out.outputs:
                index = prompt_index * params.n + o.index
                completion_tokens += len(o.token_ids)
                first_chunk = index not in offsets
                echo = echoes[prompt_index] if echoes is not None and first_chunk else None
                text = o.text if echo is None else echo + o.text
                logprobs = None
                if want_logprobs:
                    prompt = prompt_outputs.get(prompt_index, out)
                    logprobs = self.completion_logprobs(o.logprobs, offsets.get(index, 0), prompt, echo is not None)
                offsets[index] = offsets.get(index, 0) + len(text)
                choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": o.finish_reason}
                if first_chunk and want_prompt_logprobs and prompt_index in prompt_outputs:
                    prompt_logprobs = prompt_outputs[prompt_index].prompt_logprobs
                    choice["prompt_logprobs"] = self.formatter.prompt_logprobs(prompt_logprobs)
                if want_token_ids:
                    choice["token_ids"] = list(o.token_ids)
                    if first_chunk:
                        choice["prompt_token_ids"] = list(out.prompt_token_ids)
                drafts = prediction_drafts(params, list(latest.values()))
                usage = self.chunk_usage(options, prompt_tokens, completion_tokens, sum(cached.values()), drafts)
                yield sse({**base, "choices": [choice], **usage})
        if options.include_usage:
            drafts = prediction_drafts(params, list(latest.values()))
            usage = self.usage(prompt_tokens, completion_tokens, sum(cached.values()), drafts)
            yield sse({**base, "choices": [], "usage": usage})
        yield sse("[DONE]")

    # ------------------------------------------------------------------------------------------------
    # llama.cpp's server API (see `llamacpp_api.py`)

    async def llamacpp_completion(self, body: LlamaCppRequest, request: Request, infill: bool) -> Response:
        """`POST /completion` (a prompt) or `POST /infill` (a prefix, a suffix and context files)."""
        tokenizer = self.engine.engine.tokenizer
        if infill:
            if tokenizer is None:
                raise APIError(400, "this model has no tokenizer to lay out an infill prompt", param="input_prefix")
            try:
                prompt_ids = infill_prompt(tokenizer, body)
            except ValueError as e:
                raise APIError(400, str(e), param="input_prefix") from e
        else:
            prompt_ids = self.prompt_ids(body.prompt)
        if body.n_predict == 0 or body.n_predict < -1:
            raise APIError(400, "'n_predict' must be -1 (until the context ends) or positive", param="n_predict")
        max_tokens = None if body.n_predict == -1 else body.n_predict
        self.check_prompt_length(prompt_ids, max_tokens, param="prompt")
        try:
            params = body.sampling_params()
        except ValueError as e:
            raise APIError(400, str(e), param=getattr(e, "param", None)) from e
        reply = LlamaCppReply(self.model_name, len(prompt_ids), self.formatter.token_text)
        outputs = self.stream_outputs(prompt_ids, params, api_id("cmpl", request), self.model_name)
        if body.stream:
            first = await anext_or_error(outputs)

            async def chunks() -> AsyncIterator[str]:
                async for out in prepend(first, outputs):
                    if (piece := reply.feed(out)) is not None:
                        yield sse(piece)
                yield sse(reply.final(body.response_fields, content=""))

            return StreamingResponse(chunks(), media_type="text/event-stream")

        async def fed() -> AsyncIterator[RequestOutput]:  # the reply sees each delta: its timings
            async for out in outputs:
                reply.feed(out)
                yield out

        await collect(fed(), request)
        return JSONResponse(reply.final(body.response_fields))

    def fill_in_middle(self, body: CompletionRequest, items: list[str | list[int]]) -> list[str | list[int]]:
        """OpenAI's `suffix`: each text prompt laid out with the model's fill-in-the-middle tokens, so that the
        completion is what goes between it and the suffix (see `fill_in_middle.py`)."""
        tokenizer = self.engine.engine.tokenizer
        tokens = fim_token_ids(tokenizer) if tokenizer is not None else None
        if tokens is None:
            message = "'suffix' needs a model trained to fill in the middle, with FIM tokens such as <|fim_prefix|>"
            raise APIError(400, message, param="suffix")
        for name in ("echo", "truncate_prompt_tokens"):
            if getattr(body, name):
                raise APIError(400, f"'{name}' is not served with 'suffix'", param=name)
        if not all(isinstance(item, str) for item in items):
            raise APIError(400, "with 'suffix', the prompt must be text", param="prompt")
        suffix_ids = tokenizer(body.suffix, add_special_tokens=False)["input_ids"]
        return [
            fim_prompt(tokenizer(item, add_special_tokens=False)["input_ids"], suffix_ids, tokens) for item in items
        ]

    def prompt_ids(self, item: str | list[int], param: str = "prompt") -> list[int]:
        """One prompt, text or token ids, as token ids (`param`: the request field it came from)."""
        if isinstance(item, str):
            tokenizer = self.engine.engine.tokenizer
            if tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send token ids", param=param)
            item = tokenizer(item)["input_ids"]
        if not item:
            raise APIError(400, f"'{param}' is empty", param=param)
        return list(item)

    def decode(self, token_ids: list[int], param: str = "prompt") -> str:
        tokenizer = self.engine.engine.tokenizer
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer to turn token ids into text", param=param)
        vocab = self.engine.engine.model_config.vocab_size
        if not all(0 <= t < vocab for t in token_ids):
            raise APIError(400, f"token ids must be integers in [0, {vocab})", param=param)
        return str(tokenizer.decode(token_ids))

    def completion_logprobs(
        self, logprobs: list[TokenLogprob] | None, text_offset: int, output: RequestOutput, echo: bool
    ) -> dict[str, Any] | None:
        """The legacy logprobs object of a choice's new tokens; with `echo`, its prompt's tokens come first (the
        very first with a null logprob: nothing precedes it)."""
        if logprobs is None:
            return None
        entries = [(lp.token_id, lp) for lp in logprobs]
        if echo and output.prompt_logprobs is not None:
            entries = [*zip(output.prompt_token_ids, output.prompt_logprobs, strict=True), *entries]
        return self.formatter.completion_logprobs(entries, text_offset)

    def beam_search_params(self, body: Any, max_tokens: int) -> BeamSearchParams | None:
        """The request's beam search (vLLM's `use_beam_search`), or None when it samples."""
        try:
            return body.beam_search_params(max_tokens)  # type: ignore[no-any-return]
        except ValueError as e:
            raise APIError(400, str(e), param=getattr(e, "param", None)) from e

    async def beam_search(
        self,
        prompt_ids: list[int],
        params: BeamSearchParams,
        request_id: str,
        model: str,
        request: Request,
        window: asyncio.Semaphore | None = None,
        admission: Admission | None = None,
    ) -> RequestOutput:
        """Beam search over the engine (see `beam_search.py`): each step, one single-token request per live beam;
        the prefix cache holds what the beams share."""
        engine = self.engine.engine
        search = BeamSearch(prompt_ids, params, engine.eos_token_ids, self.max_model_len)
        while not search.done:
            streams = [
                self.stream_outputs(
                    ids,
                    params.step_params(),
                    f"{request_id}-{search.steps}-{i}",
                    model,
                    window=window,
                    admission=admission,
                )
                for i, ids in enumerate(search.sequences())
            ]
            finals = await asyncio.gather(*(collect(stream, request) for stream in streams))
            search.advance([final.outputs[0].logprobs[0].top for final in finals])  # type: ignore[index]
        return search.output(request_id, None, engine.tokenizer)

    def sampling_params(
        self, body: Any, max_tokens: int | None, logprobs: int | None, structured: StructuredOutputs | None = None
    ) -> SamplingParams:
        try:
            return body.sampling_params(max_tokens, logprobs, structured, self.sampling_defaults)  # type: ignore[no-any-return]
        except ValueError as e:
            raise APIError(400, str(e), param=getattr(e, "param", None)) from e

    # ------------------------------------------------------------------------------------------------
    # Embeddings

    async def embeddings(self, body: EmbeddingRequest, request: Request) -> dict[str, Any]:
        """OpenAI's embeddings: each input's final hidden states pooled (`self.pooling`), L2-normalized; with
        `dimensions`, the first that many, normalized again (Matryoshka models)."""
        model = self.check_model(body.model)
        prompts = self.pooled_prompts(prompt_items(body.input, param="input"), body.truncate_prompt_tokens, "input")
        hidden = self.engine.engine.model_config.hidden_size
        if body.dimensions is not None and body.dimensions > hidden:
            raise APIError(400, f"'dimensions' must be at most {hidden} for this model", param="dimensions")
        vectors = await self.pool(prompts, model, api_id("embd", request), request, {"priority": body.priority})
        data = []
        for index, vector in enumerate(vectors):
            if body.dimensions is not None:
                vector = vector[: body.dimensions]
                norm = math.sqrt(sum(x * x for x in vector)) or 1.0
                vector = [x / norm for x in vector]
            embedding: Any = vector
            if body.encoding_format == "base64":  # little-endian float32, as OpenAI's clients decode it
                embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(len(ids) for ids in prompts)
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def score(self, body: ScoreRequest, request: Request) -> dict[str, Any]:
        """vLLM's Score API: the cosine similarity of each pair's embeddings (see `scores.py`)."""
        model = self.check_model(body.model)
        firsts = self.pooled_prompts(prompt_items(body.text_1, "text_1"), body.truncate_prompt_tokens, "text_1")
        seconds = self.pooled_prompts(prompt_items(body.text_2, "text_2"), body.truncate_prompt_tokens, "text_2")
        try:
            pairs = score_pairs(len(firsts), len(seconds))
        except ValueError as e:
            raise APIError(400, str(e), param="text_2") from e
        request_id = api_id("score", request)
        vectors = await self.pool(firsts + seconds, model, request_id, request)
        data = [
            {"index": index, "object": "score", "score": cosine(vectors[i], vectors[len(firsts) + j])}
            for index, (i, j) in enumerate(pairs)
        ]
        tokens = sum(len(ids) for ids in firsts + seconds)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"id": request_id, "object": "list", "created": now(), "model": model, "data": data, "usage": usage}

    async def rerank(self, body: RerankRequest, request: Request) -> dict[str, Any]:
        """The Rerank API (Jina's and Cohere's shape, as vLLM serves it): the documents by the cosine similarity
        of their embeddings to the query's, the most similar first, `top_n` of them."""
        model = self.check_model(body.model)
        query = self.pooled_prompts([body.query], body.truncate_prompt_tokens, "query")
        texts = body.texts()
        documents = self.pooled_prompts(prompt_items(texts, "documents"), body.truncate_prompt_tokens, "documents")
        request_id = api_id("rerank", request)
        vectors = await self.pool(query + documents, model, request_id, request)
        scores = [cosine(vectors[0], vector) for vector in vectors[1:]]
        results = [
            {"index": i, "document": {"text": texts[i]}, "relevance_score": scores[i]}
            for i in ranked(scores, body.top_n)
        ]
        tokens = sum(len(ids) for ids in query + documents)
        return {"id": request_id, "model": model, "usage": {"total_tokens": tokens}, "results": results}

    def pooled_prompts(self, items: list[str | list[int]], keep: int | None, param: str) -> list[list[int]]:
        """Texts (or token ids) to embed as token ids, truncated to their last `keep` tokens when asked, each
        checked to fit the context (`param`: the request field they came from)."""
        prompts = [self.truncated(self.prompt_ids(item, param=param), keep) for item in items]
        for ids in prompts:
            self.check_prompt_length(ids, None, param=param)
        return prompts

    async def pool(
        self,
        prompts: list[list[int]],
        model: str,
        request_id: str,
        request: Request,
        admission: Admission | None = None,
    ) -> list[list[float]]:
        """The prompts' embeddings: final hidden states pooled (`self.pooling`) and L2-normalized, computed a
        batch's worth of prompts at a time (`prompt_window`)."""
        window = self.prompt_window(len(prompts))
        streams = [
            self.stream_outputs(ids, SamplingParams(), f"{request_id}-{i}", model, self.pooling, window, admission)
            for i, ids in enumerate(prompts)
        ]
        finals = await asyncio.gather(*(collect(s, request) for s in streams))
        return [final.embedding or [] for final in finals]

    # ------------------------------------------------------------------------------------------------
    # LoRA adapters loaded and unloaded at run time (vLLM's endpoints)

    def check_runtime_lora(self) -> None:
        if not self.runtime_lora:
            raise APIError(
                403,
                "loading and unloading LoRA adapters at run time is off: start the server with "
                "--allow-runtime-lora-updating",
                "permission_error",
            )

    async def load_lora_adapter(self, body: LoadLoRAAdapterRequest) -> dict[str, Any]:
        self.check_runtime_lora()
        if body.lora_name == self.model_name:
            raise APIError(400, f"{body.lora_name!r} is the base model's name", param="lora_name")
        try:
            await self.engine.call(self.engine.engine.load_lora, body.lora_name, body.lora_path)
        except ValueError as e:
            raise APIError(400, str(e), param="lora_path") from e
        return {"status": "ok", "lora_name": body.lora_name}

    async def unload_lora_adapter(self, body: UnloadLoRAAdapterRequest) -> dict[str, Any]:
        self.check_runtime_lora()
        try:
            await self.engine.call(self.engine.engine.unload_lora, body.lora_name)
        except ValueError as e:
            raise APIError(400, str(e), param="lora_name") from e
        return {"status": "ok", "lora_name": body.lora_name}

    # ------------------------------------------------------------------------------------------------
    # Tokenizer endpoints (vLLM's): for clients that count or split tokens as the server does, e.g.
    # lm-evaluation-harness with tokenizer_backend=remote, which then needs no tokenizer of its own

    def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        self.check_model(body.model)
        prompt, add_special_tokens = body.text_and_specials()
        if (prompt is None) == (body.messages is None):
            raise APIError(400, "give either 'prompt' or 'messages'", param="prompt")
        tokenizer = self.engine.engine.tokenizer
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer (dummy weights)", param="prompt")
        if body.messages is not None:
            _, ids = self.chat_prompt(body, body.messages, body.tools)
        else:
            ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        strs = [self.formatter.token_text(t) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}

    def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        self.check_model(body.model)
        text = self.decode(body.tokens, param="tokens")
        return {"prompt": text, "content": text}  # vLLM's name, and llama.cpp's

    def tokenizer_info(self) -> dict[str, Any]:
        """The tokenizer's special tokens and chat template, so that a client can render prompts itself."""
        tokenizer = self.engine.engine.tokenizer
        if tokenizer is None:
            raise APIError(404, "this model has no tokenizer (dummy weights)")
        names = ("bos_token", "eos_token", "pad_token", "unk_token")
        special = {name: getattr(tokenizer, name, None) for name in names}
        return {
            "tokenizer_class": type(tokenizer).__name__,
            **{name: value if isinstance(value, str) else None for name, value in special.items()},
            "chat_template": self.formatter.chat_template,
            "model_max_length": self.max_model_len,
            "vocab_size": self.engine.engine.model_config.vocab_size,
        }


def prompt_items(prompt: str | list[str] | list[int] | list[list[int]], param: str = "prompt") -> list[str | list[int]]:
    """The prompts of a completion (or embedding) request: a string, strings, token ids or lists of token ids."""
    items: list[Any] = [prompt] if isinstance(prompt, str) else list(prompt)
    if not items:
        raise APIError(400, f"'{param}' is empty", param=param)
    return [items] if all(isinstance(x, int) for x in items) else items


@dataclass
class PreparedChat:
    """A chat request ready for the engine: its prompt, sampling parameters, the format of its tool calls, and
    whether its reply is split into thinking and answer (None: not; else whether the prompt opened the think
    block); `model`, the base model's name or a LoRA adapter's."""

    model: str
    prompt_ids: list[int]
    params: SamplingParams
    tool_format: ToolCallFormat | None  # the format of the reply's tool calls (None: it holds none)
    opens_thinking: bool | None
    return_token_ids: bool = False  # vLLM's: the response carries the prompt's and the reply's token ids
    admission: Admission | None = None  # its priority and cache salt


def prediction_drafts(params: SamplingParams, outputs: list[RequestOutput]) -> tuple[int, int] | None:
    """(drafted, accepted) over `outputs` for a request with a predicted output (all its drafts come from the
    prediction); None for one without."""
    if params.prediction is None:
        return None
    return sum(o.num_draft_tokens for o in outputs), sum(o.num_accepted_tokens for o in outputs)


def tool_calls_finish_reason(finish_reason: str | None) -> str | None:
    """OpenAI's finish reason of a reply that called tools: "tool_calls" when it ended on its own."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


# ----------------------------------------------------------------------------------------------------
# Async helpers


async def anext_or_error(stream: AsyncIterator[Any]) -> Any:
    """The first item, awaited before the response starts, so bad input still gets a 400, not a broken stream."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


async def prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    if first is not None:
        yield first
    async for item in rest:
        yield item


async def merge_streams(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' streams as items arrive, tagged with the stream's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((index, out))
        except BaseException as e:
            await queue.put((index, e))
            return
        await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def collect(stream: AsyncIterator[RequestOutput], request: Request) -> RequestOutput:
    """Run a request to completion; abort it if the client goes away first."""

    async def consume() -> RequestOutput:
        final: RequestOutput | None = None
        async for out in stream:
            final = merge_output(final, out)
        assert final is not None
        return final

    task = asyncio.create_task(consume())
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()  # closes the engine stream, which aborts the request and frees its blocks
            raise APIError(499, "client disconnected")


# ----------------------------------------------------------------------------------------------------
# The app


def api_id(prefix: str, request: Request) -> str:
    """A completion's id: the client's `X-Request-Id` behind the API's prefix (as vLLM takes it, so that a request
    can be followed through proxies and the server's request log), else a fresh one."""
    given = request.headers.get("x-request-id")
    return f"{prefix}-{given}" if given else new_id(prefix)


class RequestIdMiddleware:
    """Echoes a client's `X-Request-Id` header on the response. Plain ASGI, as `APIKeyMiddleware`; requests
    without the header pass straight through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        given = Headers(scope=scope).get("x-request-id") if scope["type"] == "http" else None
        if not given:
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", given.encode("latin-1"))],
                }
            await send(message)

        await self.app(scope, receive, send_with_id)


class APIKeyMiddleware:
    """Answers 401 to /v1/ and admin requests without `Authorization: Bearer <key>`. Plain ASGI: Starlette's
    `BaseHTTPMiddleware` (`@app.middleware`) relays every streamed chunk through an extra memory stream,
    which cost a third of the server's time per token at high concurrency."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key

    def authorized(self, headers: Headers) -> bool:
        """The key as OpenAI's clients send it, or as Anthropic's do (`x-api-key`)."""
        return headers.get("authorization") == f"Bearer {self.api_key}" or headers.get("x-api-key") == self.api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and (scope["path"].startswith("/v1/") or scope["path"] == "/reset_prefix_cache")
            and not self.authorized(Headers(scope=scope))
        ):
            response = error_response(
                401,
                "missing or invalid API key (send 'Authorization: Bearer <key>' or 'x-api-key: <key>')",
                "authentication_error",
                code="invalid_api_key",
                path=scope["path"],
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def build_app(server: OpenAIServer) -> FastAPI:
    app = FastAPI(title="Ember", version=ember.__version__)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        path = request.url.path
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON (UTF-8)", code="invalid_json", path=path)
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        return error_response(400, message, param=".".join(loc) or None, path=path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(e.status_code, str(e.detail), kind, path=request.url.path)

    @app.exception_handler(EngineOverloadedError)
    async def overloaded(request: Request, e: EngineOverloadedError) -> JSONResponse:
        return error_response(429, str(e), "rate_limit_error", code="server_overloaded", path=request.url.path)

    @app.exception_handler(EngineDeadError)
    async def dead(request: Request, e: EngineDeadError) -> JSONResponse:
        return error_response(503, str(e), "server_error", code="engine_dead", path=request.url.path)

    app.add_middleware(RequestIdMiddleware)
    if server.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=server.api_key)
    # added last, so outermost: a browser's preflight carries no key, and a 401 must reach the page readably
    origins = server.allowed_origins
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins or [],
        allow_origin_regex=None if origins else LOCAL_ORIGINS,
        allow_methods=["*"],
        allow_headers=["*"],
    )

    @app.get("/health")
    async def health() -> Response:
        if not server.engine.is_alive:
            return error_response(503, "the engine stopped", "server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": ember.__version__}

    @app.get("/props")
    async def llamacpp_props() -> dict[str, Any]:
        """llama.cpp's description of its server (see `llamacpp_api.py`)."""
        engine = server.engine.engine
        slots = engine.config.scheduler.max_num_seqs
        return props(server.model_name, server.max_model_len, slots, server.formatter.chat_template, engine.tokenizer)

    def model_card(name: str) -> dict[str, Any]:
        """The base model's card, or a LoRA adapter's (its `parent` the base model, its `root` its directory)."""
        card = {
            "id": name,
            "object": "model",
            "created": int(START_TIME),
            "owned_by": "ember",
            "max_model_len": server.max_model_len,
        }
        adapter = server.engine.engine.runner.lora.adapters.get(name) if name != server.model_name else None
        if adapter is not None:
            card |= {"parent": server.model_name, "root": str(adapter.path)}
        return card

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [server.model_name, *server.engine.engine.lora_names]
        return {"object": "list", "data": [model_card(name) for name in names]}

    @app.get("/v1/models/{model:path}")  # a model name may hold slashes ("org/name")
    async def model(model: str) -> dict[str, Any]:
        return model_card(server.check_model(model))

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> dict[str, Any]:
        return await server.load_lora_adapter(body)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> dict[str, Any]:
        return await server.unload_lora_adapter(body)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        if not await server.engine.reset_prefix_cache():
            return error_response(
                409, "requests are running; reset the prefix cache when the server is idle", code="engine_busy"
            )
        return JSONResponse({"status": "ok"})

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return server.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return server.detokenize(body)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return server.tokenizer_info()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await server.chat(body, request)

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        return await server.responses(body, request)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> dict[str, Any]:
        return server.stored_response(response_id).response

    @app.get("/v1/responses/{response_id}/input_items")
    async def response_input_items(
        response_id: str, limit: int = Query(20, ge=1, le=100), order: str = "desc", after: str | None = None
    ) -> dict[str, Any]:
        if order not in ("asc", "desc"):
            raise APIError(400, f"'order' must be 'asc' or 'desc', got {order!r}", param="order")
        return item_page(server.stored_response(response_id).input_items, limit, order, after)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict[str, Any]:
        server.stored_response(response_id)
        server.response_store.delete(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    @app.post(MESSAGES_PATH)
    async def messages(body: MessagesRequest, request: Request) -> Response:
        return await server.messages(body, request)

    @app.post(f"{MESSAGES_PATH}/count_tokens")
    async def count_message_tokens(body: MessagesRequest) -> dict[str, Any]:
        return server.count_message_tokens(body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await server.completions(body, request)

    @app.post("/completion")
    @app.post("/completions")
    async def llamacpp_completion(body: LlamaCppRequest, request: Request) -> Response:
        return await server.llamacpp_completion(body, request, infill=False)

    @app.post("/infill")
    async def llamacpp_infill(body: LlamaCppRequest, request: Request) -> Response:
        return await server.llamacpp_completion(body, request, infill=True)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
        return await server.embeddings(body, request)

    @app.post("/score")
    @app.post("/v1/score")
    async def score(body: ScoreRequest, request: Request) -> dict[str, Any]:
        return await server.score(body, request)

    @app.post("/rerank")
    @app.post("/v1/rerank")
    @app.post("/v2/rerank")
    async def rerank(body: RerankRequest, request: Request) -> dict[str, Any]:
        return await server.rerank(body, request)

    return app


START_TIME = time.time()
LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"  # pages served from this machine
