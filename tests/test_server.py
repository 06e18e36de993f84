"""The real server in a subprocess, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest
import torch
from openai import AsyncOpenAI, OpenAI
from openai.types.responses import ResponseFunctionToolCall

from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams
from ember.server.launch import ServerProcess, running_server

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def metric(server: ServerProcess, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not exposed")


def test_models_health_version(server: ServerProcess, client: OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("org/other-model")
    assert missing.value.body["code"] == "model_not_found"
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_a_clients_request_id_names_the_completion(server: ServerProcess) -> None:
    """X-Request-Id (as vLLM takes it): the completion's id, and echoed on the response."""
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=chat, headers={"X-Request-Id": "trace-42"})
    assert reply.headers["x-request-id"] == "trace-42" and reply.json()["id"] == "chatcmpl-trace-42"
    text = {"prompt": ["a", "b"], "max_tokens": 1, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=text, headers={"X-Request-Id": "t-7"}) as streamed:
        ids = {json.loads(line[6:])["id"] for line in streamed.iter_lines() if line.startswith("data: {")}
    assert streamed.headers["x-request-id"] == "t-7" and ids == {"cmpl-t-7"}
    plain = httpx.post(f"{server.url}/v1/chat/completions", json=chat)
    assert "x-request-id" not in plain.headers and plain.json()["id"].startswith("chatcmpl-")


def test_chat_completion(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        max_tokens=12,
        temperature=0,
    )
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage is not None and resp.usage.prompt_tokens > 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.usage.prompt_tokens_details is not None and resp.usage.prompt_tokens_details.cached_tokens == 0


def test_streaming_with_usage(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from one to five."}], max_tokens=20, temperature=0
    )
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_continuous_usage_stats_count_every_chunk(client: OpenAI) -> None:
    """vLLM's continuous_usage_stats: with include_usage, every chunk carries the usage so far (chat and
    completions, n=2); the counts grow to the final usage chunk's. Without it, only the last chunk has usage."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    stream: dict[str, Any] = {"model": MODEL, "max_tokens": 12, "n": 2, "temperature": 0, "stream": True}
    messages = [{"role": "user", "content": "Count from one to five."}]
    chat = list(client.chat.completions.create(messages=messages, stream_options=options, **stream))
    text = list(client.completions.create(prompt="One, two,", stream_options=options, **stream))
    for chunks in (chat, text):
        *content, last = chunks
        assert not last.choices and last.usage is not None
        counts = [c.usage.completion_tokens for c in content]
        assert counts == sorted(counts) and counts[0] < counts[-1] == last.usage.completion_tokens
        assert all(c.usage.prompt_tokens == last.usage.prompt_tokens for c in content)
    plain = client.completions.create(prompt="One, two,", stream_options={"include_usage": True}, **stream)
    assert [c.usage is not None for c in plain][-2:] == [False, True]


def test_n_seed_and_logprobs(client: OpenAI) -> None:
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Name an animal."}],
        max_tokens=8,
        temperature=1.0,
        seed=42,
        n=2,
        logprobs=True,
        top_logprobs=3,
    )
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert len(first.choices) == 2
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    for choice in first.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in choice.logprobs.content)
    assert first.usage.completion_tokens == sum(len(c.logprobs.content) for c in first.choices)


def test_stop_string(client: OpenAI) -> None:
    messages = [{"role": "user", "content": "List the days of the week, comma separated."}]
    free = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    text = free.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_completions_with_token_ids_equal_offline_greedy(client: OpenAI, smollm: LLM) -> None:
    prompts = [smollm.tokenizer(p)["input_ids"] for p in ("The capital of France is", "def add(a, b):")]
    resp = client.completions.create(model=MODEL, prompt=prompts, max_tokens=16, temperature=0, logprobs=2)
    offline = smollm.generate(prompts, SamplingParams(max_tokens=16, temperature=0))
    assert [c.text for c in sorted(resp.choices, key=lambda c: c.index)] == [o.outputs[0].text for o in offline]
    assert (
        resp.choices[0].logprobs is not None
        and len(resp.choices[0].logprobs.tokens) == resp.usage.completion_tokens // 2
    )
    text = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0)
    assert text.choices[0].text == offline[0].outputs[0].text


def test_echo_with_logprobs_scores_the_prompt_as_hf_does(client: OpenAI, smollm: LLM, hf_smollm: Any) -> None:
    """lm-evaluation-harness's loglikelihood request (echo, logprobs=1, max_tokens=1, greedy) on context +
    continuation: every prompt token after the first gets its logprob under the model, as HF computes it."""
    ids = smollm.tokenizer("Question: What is the capital of France?\nAnswer: Paris")["input_ids"]
    resp = client.completions.create(model=MODEL, prompt=[ids], echo=True, logprobs=1, max_tokens=1, temperature=0)
    choice = resp.choices[0]
    assert choice.text.startswith(smollm.tokenizer.decode(ids)) and len(choice.text) > len(smollm.tokenizer.decode(ids))
    lp = choice.logprobs
    assert lp is not None and len(lp.tokens) == len(ids) + 1 and lp.tokens[0] == smollm.tokenizer.decode(ids[:1])
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        hf = torch.log_softmax(hf_smollm(torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = [hf[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=2e-3)
    for i in range(1, len(ids)):  # lm-eval's "is greedy": the token's logprob is the best of its top entry
        assert (max(lp.top_logprobs[i].values()) == lp.token_logprobs[i]) == (hf[i - 1].argmax().item() == ids[i])
    assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 1


def test_echo_streamed_and_without_logprobs(client: OpenAI) -> None:
    prompts = ["The capital of France is", "def add(a, b):"]
    whole = client.completions.create(model=MODEL, prompt=prompts, echo=True, max_tokens=6, temperature=0, n=2)
    texts = {c.index: c.text for c in whole.choices}
    assert texts[0] == texts[1] and texts[0].startswith(prompts[0]) and texts[2].startswith(prompts[1])
    assert all(c.logprobs is None for c in whole.choices)
    streamed: dict[int, str] = {}
    offsets: dict[int, list[int]] = {}
    kwargs: dict[str, Any] = {"echo": True, "max_tokens": 6, "temperature": 0, "n": 2, "logprobs": 0, "stream": True}
    for chunk in client.completions.create(model=MODEL, prompt=prompts, **kwargs):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
            assert c.logprobs is not None
            offsets.setdefault(c.index, []).extend(c.logprobs.text_offset)
    assert streamed == texts
    assert all(o[0] == 0 and o == sorted(o) for o in offsets.values())  # one text: the prompt's, then the reply's


def test_tokenize_detokenize_and_tokenizer_info_agree_with_completions(server: ServerProcess, client: OpenAI) -> None:
    """vLLM's tokenizer endpoints, as lm-evaluation-harness's remote tokenizer calls them."""
    text = "Ember tokenizes this."
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) and "".join(tokens["token_strs"]) == text
    assert tokens["max_model_len"] == 8192
    completion = client.completions.create(model=MODEL, prompt=text, max_tokens=1)
    assert completion.usage.prompt_tokens == tokens["count"]
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json() == {
        "prompt": text,
        "content": text,
    }
    messages = [{"role": "user", "content": "Hello there"}]
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)  # type: ignore[arg-type]
    assert chat["count"] == reply.usage.prompt_tokens
    open_turn = httpx.post(f"{server.url}/tokenize", json={"messages": messages, "add_generation_prompt": False})
    assert chat["tokens"][: open_turn.json()["count"]] == open_turn.json()["tokens"] < chat["tokens"]
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and "{% for message in messages %}" in info["chat_template"]
    for path, body, param in [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": messages}, "prompt"),
        ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ]:
        bad = httpx.post(f"{server.url}{path}", json=body)
        assert bad.status_code in (400, 404) and bad.json()["error"]["param"] == param, (path, body, bad.text)


WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def tokens_of(server: ServerProcess, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> int:
    body: dict[str, Any] = {"messages": messages}
    if tools:
        body["tools"] = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in tools]
    return int(httpx.post(f"{server.url}/tokenize", json=body).json()["count"])


def test_responses_answer_as_chat_does_and_continue_by_previous_response_id(
    server: ServerProcess, client: OpenAI
) -> None:
    question = "What is the capital of France?"
    first = client.responses.create(
        model=MODEL, input=question, instructions="Answer in one sentence.", temperature=0, max_output_tokens=30
    )
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": question}],
        temperature=0,
        max_tokens=30,
    )
    assert first.id.startswith("resp_") and first.status == "completed" and first.output[0].type == "message"
    assert first.output_text == chat.choices[0].message.content
    assert first.usage is not None and first.usage.input_tokens == chat.usage.prompt_tokens
    assert first.usage.output_tokens == chat.usage.completion_tokens
    second = client.responses.create(
        model=MODEL, input="And of Italy?", previous_response_id=first.id, temperature=0, max_output_tokens=30
    )
    conversation = [  # the earlier input and output, then the new input; instructions are not carried over
        {"role": "user", "content": question},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And of Italy?"},
    ]
    assert second.previous_response_id == first.id and second.usage is not None
    assert second.usage.input_tokens == tokens_of(server, conversation)
    assert client.responses.retrieve(second.id).output_text == second.output_text
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
    unstored = client.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=2)
    assert unstored.status == "incomplete" and unstored.incomplete_details.reason == "max_output_tokens"
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model=MODEL, input="Hi", previous_response_id=unstored.id)
    assert missing.value.body["param"] == "previous_response_id"


def test_responses_fields_ember_lacks_are_refused_when_they_ask_for_something(client: OpenAI) -> None:
    """background, include, reasoning and the like would change what comes back: a 400 naming the field, not a
    silent default. Their do-nothing values (as the SDKs send them) and other unknown fields pass."""
    for field, value in (
        ("background", True),
        ("include", ["reasoning.encrypted_content"]),
        ("reasoning", {"effort": "high"}),
        ("conversation", "conv_1"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, **{field: value})  # type: ignore[call-overload]
        assert info.value.body["param"] == field and "not supported" in info.value.body["message"], info.value.body
    harmless = {"background": False, "include": [], "reasoning": {"effort": None}, "truncation": "disabled"}
    extra = {"service_tier": "auto", "top_logprobs": 0}
    reply = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, **harmless, extra_body=extra)  # type: ignore[call-overload]
    assert reply.status == "incomplete"


def test_responses_logprobs_are_the_chat_apis(client: OpenAI) -> None:
    """include message.output_text.logprobs with top_logprobs: each output token's logprob and alternatives on the
    output_text part, as the chat API gives them; streamed, each delta carries its tokens'."""
    question = {"role": "user", "content": "Name a colour."}
    asked = {"include": ["message.output_text.logprobs"], "top_logprobs": 2, "temperature": 0, "max_output_tokens": 8}
    reply = client.responses.create(model=MODEL, input=[question], **asked)  # type: ignore[call-overload]
    part = reply.output[0].content[0]
    chat = client.chat.completions.create(
        model=MODEL, messages=[question], logprobs=True, top_logprobs=2, temperature=0, max_tokens=8
    )
    expected = [(t.token, [a.token for a in t.top_logprobs]) for t in chat.choices[0].logprobs.content]
    got = [(t.token, [a.token for a in t.top_logprobs]) for t in part.logprobs]
    assert got == expected and len(got) == reply.usage.output_tokens
    values = [t.logprob for t in part.logprobs]  # one computed with the prompt, one from its cached blocks
    assert values == pytest.approx([t.logprob for t in chat.choices[0].logprobs.content], abs=1e-4)
    assert "".join(token for token, _ in got) == part.text
    events = list(client.responses.create(model=MODEL, input=[question], stream=True, **asked))  # type: ignore[call-overload]
    streamed = [t.token for e in events if e.type == "response.output_text.delta" for t in e.logprobs]
    assert streamed == [token for token, _ in got]
    tool = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input="Hi", tools=[tool], **asked)  # type: ignore[call-overload,list-item]
    assert info.value.body["param"] == "include"


def test_responses_stream_the_same_output_as_events(client: OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "input": "Name three colors.", "temperature": 0, "max_output_tokens": 24}
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if whole.status == "completed" else "response.incomplete"]  # fmt: skip
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert deltas == final.output_text == whole.output_text and final.usage is not None and whole.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        whole.usage.input_tokens,
        whole.usage.output_tokens,
    )
    assert final.usage.input_tokens_details.cached_tokens > 0  # the same prompt again: from the prefix cache


def test_responses_function_calls_and_their_outputs(server: ServerProcess, client: OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "tools": [WEATHER_TOOL], "temperature": 0, "max_output_tokens": 60}
    question = "What is the weather in Paris?"
    called = client.responses.create(input=question, tool_choice="required", **kwargs)
    assert called.status == "completed" and len(called.output) == 1 and called.parallel_tool_calls is False
    call = called.output[0]
    assert isinstance(call, ResponseFunctionToolCall) and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    with client.responses.stream(input=question, tool_choice="required", parallel_tool_calls=False, **kwargs) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    assert [(i.type, getattr(i, "arguments", None)) for i in streamed.output] == [("function_call", call.arguments)]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 22 C"}
    answered = client.responses.create(previous_response_id=called.id, input=[result], **kwargs)  # type: ignore[list-item]
    function = {"name": call.name, "arguments": call.arguments}
    conversation = [
        {"role": "user", "content": question},
        {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function", "function": function}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 22 C"},
    ]
    assert answered.usage is not None and answered.usage.input_tokens == tokens_of(server, conversation, [WEATHER_TOOL])
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": question}]},
        {"type": "function_call", "call_id": call.call_id, **function},
        result,
    ]
    replayed = client.responses.create(input=items, **kwargs)  # type: ignore[arg-type]
    assert replayed.output_text == answered.output_text
    listed = client.responses.input_items.list(replayed.id, order="asc")
    assert [item.type for item in listed.data] == ["message", "function_call", "function_call_output"]
    assert listed.data[0].content[0].text == question and listed.data[2].call_id == call.call_id  # type: ignore[union-attr]
    newest = client.responses.input_items.list(replayed.id, limit=2)  # newest first, a page of two
    assert [i.id for i in newest.data] == [i.id for i in listed.data[::-1][:2]] and newest.has_more
    rest = client.responses.input_items.list(replayed.id, limit=2, after=newest.data[-1].id)
    assert [i.id for i in rest.data] == [listed.data[0].id] and not rest.has_more
    (only,) = client.responses.input_items.list(called.id).data  # a string input is one user message
    assert only.type == "message" and only.content[0].text == question  # type: ignore[union-attr]
    assert httpx.get(f"{server.url}/v1/responses/resp_nope/input_items").status_code == 404
    for body, param in [
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
        ({"input": [{"type": "function_call", "name": "get_weather"}]}, "input"),
        ({"input": [{"role": "wizard", "content": "hi"}]}, "input"),
        ({"input": []}, "input"),
        ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
        ({"input": "hi", "max_output_tokens": 9000}, "max_output_tokens"),
    ]:
        bad = httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, **body})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, (body, bad.text)


def test_stored_input_items_keep_their_ids_and_name_the_others() -> None:
    from ember.server.responses import stored_input_items

    items = [
        {"role": "user", "content": "hi", "id": None},  # a null id gets one, as an absent id does
        {"type": "function_call_output", "call_id": "c1", "output": "x", "id": "fco_mine"},
    ]
    first, second = stored_input_items(items)
    assert first["id"].startswith("msg_") and first["content"] == [{"type": "input_text", "text": "hi"}]
    assert second["id"] == "fco_mine" and second["type"] == "function_call_output"


async def _stream_clients(server: ServerProcess, count: int) -> list[str]:
    client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    async def one(i: int) -> str:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Tell me a story about the number {i}."}],
            max_tokens=48,
            temperature=0.8,
            seed=i,
            stream=True,
        )
        received = 0
        async for chunk in stream:
            received += 1
            if i % 3 == 0 and received == 3:
                await stream.close()  # disconnect mid-stream
                return "disconnected"
            if chunk.choices and chunk.choices[0].finish_reason:
                return chunk.choices[0].finish_reason
        return "incomplete"

    try:
        return await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        await client.close()


def assert_idle(server: ServerProcess) -> None:
    """No request runs and no KV block is held, once the aborts of hung-up streams reached the engine."""
    for _ in range(50):  # bounded: aborts reach the engine within a step or two
        if metric(server, "ember:num_requests_running") == 0 and metric(server, "ember:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.1)
    assert metric(server, "ember:num_requests_running") == 0
    assert metric(server, "ember:kv_cache_usage_perc") == 0


def test_metrics_describe_the_kv_cache(server: ServerProcess) -> None:
    """vLLM's `cache_config_info`: the cache's configuration in labels, its value 1."""
    lines = [line for line in httpx.get(f"{server.url}/metrics").text.splitlines()
             if line.startswith("ember:cache_config_info{")]  # fmt: skip
    assert len(lines) == 1 and lines[0].endswith(" 1.0")
    assert 'block_size="16"' in lines[0] and 'cache_dtype="auto"' in lines[0]
    assert 'enable_prefix_caching="True"' in lines[0] and int(lines[0].split('num_gpu_blocks="')[1].split('"')[0]) > 0


def test_concurrent_streams_with_disconnects_free_everything(server: ServerProcess) -> None:
    results = asyncio.run(_stream_clients(server, 32))
    assert results.count("disconnected") == 11
    assert all(r in ("stop", "length") for i, r in enumerate(results) if i % 3)
    assert_idle(server)
    assert metric(server, "ember:num_requests_waiting") == 0
    assert metric(server, "ember:generation_tokens_total") > 0
    assert metric(server, "ember:time_to_first_token_seconds_count") >= 21


def test_metrics_split_a_requests_time_into_queue_prefill_and_decode(server: ServerProcess, client: OpenAI) -> None:
    """vLLM's request histograms: the queue and prefill times add up to the time to first token, prefill and
    decode to the inference time, queue and inference to the end-to-end latency; token counts per request."""
    names = ["queue", "prefill", "decode", "inference"]
    sums = [f"ember:request_{n}_time_seconds_sum" for n in names]
    sums += ["ember:time_to_first_token_seconds_sum", "ember:e2e_request_latency_seconds_sum"]
    sums += ["ember:request_prompt_tokens_sum", "ember:request_generation_tokens_sum"]
    before = [metric(server, name) for name in sums]
    count = metric(server, "ember:request_queue_time_seconds_count")
    reply = client.completions.create(
        model=MODEL, prompt="Count: one, two,", max_tokens=6, extra_body={"ignore_eos": True}
    )
    queue, prefill, decode, inference, ttft, e2e, prompt, generated = (
        metric(server, name) - value for name, value in zip(sums, before, strict=True)
    )
    assert metric(server, "ember:request_queue_time_seconds_count") == count + 1
    assert queue + prefill == pytest.approx(ttft, abs=1e-6) and prefill + decode == pytest.approx(inference, abs=1e-6)
    assert queue + inference == pytest.approx(e2e, abs=1e-6) and min(queue, prefill, decode) >= 0
    assert (prompt, generated) == (reply.usage.prompt_tokens, 6)


def test_bench_serve_drives_the_server_closed_and_open_loop(server: ServerProcess, tmp_path: Path) -> None:
    """`ember bench serve`: client counts (closed loop) or Poisson request rates (open loop, `inf` all at once),
    each level's requests all answered with every token counted; both kinds of level at once are refused."""
    from tests.test_cli import ember

    requests = [{"prompt_ids": [100 + i, 200, 300, 400], "max_new_tokens": 3} for i in range(5)]
    workload = tmp_path / "tiny.json"
    workload.write_text(json.dumps({"requests": requests}))
    common = ("bench", "serve", "--url", server.url, "--workload", str(workload), "--num-requests", "5")
    for load, levels in (
        (("--concurrency", "1,4"), [(1, None), (4, None)]),
        (("--request-rate", "20,inf"), [(None, 20.0), (None, "inf")]),
    ):
        report = tmp_path / "report.json"
        run = ember(*common, *load, "--json", str(report), "--plot", str(tmp_path / "chart.png"))
        assert run.returncode == 0, run.stderr
        results = json.loads(report.read_text())["levels"]
        assert [(r["concurrency"], r["request_rate"]) for r in results] == levels
        assert all(r["requests"] == 5 and r["output_tps"] > 0 and r["ttft_s"]["p50"] > 0 for r in results)
        assert all(round(r["output_tps"] * r["wall_s"]) == 15 for r in results)  # 5 requests x 3 tokens
    gaps = random.Random(0)  # the seeded arrivals at 20 req/s: the last request is sent after four gaps
    assert results[0]["wall_s"] >= sum(gaps.expovariate(20.0) for _ in range(4))
    both = ember(*common, "--concurrency", "2", "--request-rate", "4")
    assert both.returncode != 0 and "not both" in both.stderr and "Traceback" not in both.stderr


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b'{"model": "SmolLM2-135M-Instruct", "messages": [', 400, None),  # malformed JSON
        (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),  # invalid UTF-8
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400, "temperature"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}', 400, "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 1000}', 400, "n"),
        (b'{"messages": []}', 400, "messages"),
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, None),
        (b'{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}', 404, "model"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}', 400, "tools"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', 400, "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}', 400, "tool_choice"),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name":'
            b' "a"}}], "tool_choice": {"type": "function", "function": {"name": "b"}}}',
            400,
            "tool_choice",
        ),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name":'
            b' "a"}}], "response_format": {"type": "json_object"}}',
            400,
            "response_format",
        ),
        (b'{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}}', 400, "re"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "yaml"}}', 400, "re"),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema",'
            b' "json_schema": {"name": "x", "schema": {"type": "objekt"}}}}',
            400,
            None,
        ),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "structured_outputs": {"regex": "(", "choice": ["a"]}}',
            400,
            None,
        ),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "structured_outputs": {"grammar": "root ::= x"}}',
            400,
            None,
        ),
        (
            b'{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function",'
            b' "function": {"name": "a", "arguments": "{oops"}}]}, {"role": "user", "content": "hi"}]}',
            400,
            "messages",
        ),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name":'
            b' "a"}}, {"type": "function", "function": {"name": "a"}}]}',
            400,
            "tools.1.function.name",
        ),
        (b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}', 400, "messages"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "chat_template": "{% for m in %}"}', 400, "chat_template"),
    ],
)
def test_bad_chat_requests(server: ServerProcess, body: bytes, status: int, param: str | None) -> None:
    resp = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param)
    ok = httpx.post(
        f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    )
    assert ok.status_code == 200


def test_bad_completion_requests(server: ServerProcess, client: OpenAI) -> None:
    too_long = [5] * 9000
    for kwargs, param in [
        ({"prompt": too_long}, "prompt"),
        ({"prompt": "hi", "suffix": "x"}, "suffix"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [[1, 2, 10**9]]}, "prompt"),
        ({"prompt": [[1, 2, 10**9]], "echo": True}, "prompt"),
        ({"prompt": "hi", "stop": ["x", ""]}, "stop"),
        ({"prompt": "hi", "logit_bias": {"token": 1}}, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"10000000": 1}}, "logit_bias"),
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, max_tokens=4, **kwargs)
        assert info.value.status_code == 400 and info.value.body["param"] == param, (kwargs, info.value.body)
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices[0].text is not None


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "priority": 1, "max_tokens": 2}),
        ("/v1/completions", {"prompt": "hi", "priority": -2, "max_tokens": 2}),
        ("/v1/completions", {"prompt": "hi", "priority": 3, "use_beam_search": True, "n": 2, "max_tokens": 2}),
        ("/v1/responses", {"input": "hi", "priority": 1, "max_output_tokens": 2}),
        ("/v1/embeddings", {"input": ["hi", "there"], "priority": 5}),
    ],
)
def test_a_priority_needs_the_priority_policy(server: ServerProcess, path: str, body: dict) -> None:
    """vLLM's `priority` field reaches the engine from every API that runs the model; the server's first-come
    policy refuses it by name (the priority policy is tested in test_engine_properties and test_run_batch)."""
    resp = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "priority" and "--scheduling-policy priority" in error["message"]
    assert httpx.post(f"{server.url}{path}", json={**body, "priority": 0}, timeout=60).status_code == 200


def test_llama_cpp_completion_api_answers_as_llama_server(server: ServerProcess, client: OpenAI) -> None:
    """llama.cpp's `POST /completion`: its fields and defaults in, its reply out (the text of the same greedy
    completion, why it stopped, counts, timings), streamed alike; `response_fields` picks (nested) fields."""
    prompt = "The capital of France is"
    expected = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0).choices[0].text
    body = {"prompt": prompt, "n_predict": 8, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(f"{server.url}/completion", json=body, timeout=60).json()
    assert reply["content"] == expected and (reply["tokens_predicted"], reply["stop_type"]) == (8, "limit")
    prompt_ids = httpx.post(f"{server.url}/tokenize", json={"prompt": prompt}).json()["tokens"]
    assert reply["tokens_evaluated"] == len(prompt_ids)
    assert reply["timings"]["predicted_n"] == 8 and reply["timings"]["predicted_per_second"] > 0
    word = expected.split()[1]
    stopped = httpx.post(f"{server.url}/completion", json={**body, "stop": [word]}, timeout=60).json()
    assert (stopped["stop_type"], stopped["stopping_word"]) == ("word", word) and word not in stopped["content"]
    lines = httpx.post(f"{server.url}/completion", json={**body, "stream": True}, timeout=60).text.split("\n\n")
    pieces = [json.loads(line.removeprefix("data: ")) for line in lines if line]
    assert "".join(p["content"] for p in pieces) == expected and [p["stop"] for p in pieces][-2:] == [False, True]
    tokenized = httpx.post(f"{server.url}/tokenize", json={"content": prompt}).json()["tokens"]  # llama.cpp's form
    assert tokenized == prompt_ids  # SmolLM2 adds no BOS either way
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": tokenized}).json()["content"] == prompt
    fields = ["content", "timings/prompt_n", "no/such"]
    picked = httpx.post(f"{server.url}/completion", json={**body, "response_fields": fields}, timeout=60).json()
    assert set(picked) == {"content", "timings/prompt_n"} and picked["content"] == expected
    for path, bad, param in [
        ("/completion", {"n_predict": 0}, "n_predict"),
        ("/infill", {"input_prefix": "def f():"}, "input_prefix"),  # SmolLM2 has no FIM tokens
    ]:
        refused = httpx.post(f"{server.url}{path}", json={**body, **bad})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text


def test_llama_cpp_n_probs_and_props(server: ServerProcess, client: OpenAI) -> None:
    """`n_probs` adds each generated token's logprob and the top tokens' (the OpenAI API's logprobs of the same
    completion), whole and streamed; `GET /props` gives the context size, the defaults and the template."""
    prompt = "The capital of France is"
    openai_logprobs = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    expected = openai_logprobs.choices[0].logprobs
    body = {"prompt": prompt, "n_predict": 4, "temperature": 0, "n_probs": 3}
    reply = httpx.post(f"{server.url}/completion", json=body, timeout=60).json()
    probabilities = reply["completion_probabilities"]
    assert [p["token"] for p in probabilities] == expected.tokens
    assert [p["logprob"] for p in probabilities] == pytest.approx(expected.token_logprobs, abs=1e-4)
    for entry, top in zip(probabilities, expected.top_logprobs, strict=True):
        assert len(entry["top_logprobs"]) == 3 and {t["token"] for t in entry["top_logprobs"]} == set(top)
        assert entry["bytes"] == list(entry["token"].encode()) and entry["id"] == entry["top_logprobs"][0]["id"]
    lines = httpx.post(f"{server.url}/completion", json={**body, "stream": True}, timeout=60).text.split("\n\n")
    pieces = [json.loads(line.removeprefix("data: ")) for line in lines if line]
    streamed = [p for piece in pieces for p in piece.get("completion_probabilities", [])]
    assert streamed == probabilities and "completion_probabilities" not in pieces[-1]
    assert "completion_probabilities" not in httpx.post(f"{server.url}/completion", json={**body, "n_probs": 0}).json()

    props = httpx.get(f"{server.url}/props").json()
    max_model_len = httpx.get(f"{server.url}/v1/models").json()["data"][0]["max_model_len"]
    assert props["default_generation_settings"]["n_ctx"] == max_model_len and props["total_slots"] >= 1
    assert props["default_generation_settings"]["params"]["temperature"] == 0.8  # llama.cpp's default
    assert "<|im_start|>" in props["chat_template"] and props["eos_token"] == "<|im_end|>"


def test_continue_final_message_goes_on_from_the_assistants_text(server: ServerProcess, client: OpenAI) -> None:
    """vLLM's prefill switch: the last (assistant's) message is left open and the reply continues it, exactly
    as a completion of the same tokens would."""
    messages = [{"role": "user", "content": "Write a poem about roses."}, {"role": "assistant", "content": "Roses are"}]
    continue_it = {"continue_final_message": True}
    reply = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        temperature=0,
        extra_body=continue_it,  # type: ignore[arg-type]
    )
    left_open = httpx.post(
        f"{server.url}/tokenize", json={"messages": messages, **continue_it, "return_token_strs": True}
    ).json()
    closed = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()["tokens"]
    ids = left_open["tokens"]
    assert left_open["token_strs"][-1] == " are" and closed[: len(ids)] == ids and len(closed) > len(ids)
    completion = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert reply.usage.prompt_tokens == len(ids) and reply.choices[0].message.content == completion.choices[0].text
    for conversation, extra, param in [
        (messages, {**continue_it, "add_generation_prompt": True}, "continue_final_message"),
        (messages[:1], continue_it, "messages"),  # the last message is the user's
    ]:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=MODEL,
                messages=conversation,
                max_tokens=2,
                extra_body=extra,  # type: ignore[arg-type]
            )
        assert info.value.body["param"] == param, info.value.body


def test_min_tokens_lengthens_a_short_reply(client: OpenAI) -> None:
    """vLLM's min_tokens: the end-of-turn token is held back until that many tokens are out."""
    messages = [{"role": "user", "content": "Say hi."}]
    short = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64, temperature=0)  # type: ignore[arg-type]
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 30
    longer = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=64,
        temperature=0,
        extra_body={"min_tokens": 30},  # type: ignore[arg-type]
    )
    assert longer.usage.completion_tokens >= 30
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64, extra_body={"min_tokens": 65})  # type: ignore[arg-type]
    assert info.value.body["param"] == "min_tokens", info.value.body
    json_reply = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_object"},
        extra_body={"min_tokens": 30},  # type: ignore[arg-type]
    )
    choice = json_reply.choices[0]  # the grammar's end, before 30 tokens, wins
    assert choice.finish_reason == "stop" and isinstance(json.loads(choice.message.content), dict)


def test_allowed_token_ids_and_bad_words_through_the_api(client: OpenAI, server: ServerProcess) -> None:
    """vLLM's token masks; token ids past the vocabulary are a 400 naming the field (a stop token id with
    min_tokens once failed the engine step and took the server down), and the server serves on."""
    prompt = "The capital of France is"

    def complete(**extra: Any) -> str:
        reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, extra_body=extra)
        return reply.choices[0].text

    assert "Paris" in complete() and "Paris" not in complete(bad_words=["Paris"])
    words = {" yes", " no"}
    allowed = [httpx.post(f"{server.url}/tokenize", json={"prompt": w}).json()["tokens"][-1] for w in words]
    text = complete(allowed_token_ids=allowed)
    assert text and text.replace(" yes", "").replace(" no", "") == "", text
    for extra, param in (
        ({"stop_token_ids": [10**6], "min_tokens": 1}, "stop_token_ids"),
        ({"allowed_token_ids": [10**6]}, "allowed_token_ids"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            complete(**extra)
        assert info.value.body["param"] == param, info.value.body
    assert re.fullmatch("[ab]+", complete(bad_words=["a"], structured_outputs={"regex": "[ab]+"}))
    assert complete().startswith(" Paris")


def test_skip_special_tokens_false_keeps_them_in_the_text(server: ServerProcess) -> None:
    """vLLM's skip_special_tokens: False decodes the special tokens too (here the chat turn's <|im_end|>, past
    which ignore_eos goes on); the tokens are the same either way. With include_stop_str_in_output, the stop token
    that ended the output is its last text."""
    prompt = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    body = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    kept = httpx.post(f"{server.url}/v1/completions", json={**body, "skip_special_tokens": False}, timeout=60).json()
    plain = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    kept_text, plain_text = kept["choices"][0]["text"], plain["choices"][0]["text"]
    assert "<|im_end|>" in kept_text and "<|im_end|>" not in plain_text, kept_text
    assert re.sub(r"<\|im_(start|end)\|>", "", kept_text) == plain_text
    assert kept["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"] == 40

    ended = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "skip_special_tokens": False}
    stopped = {**ended, "include_stop_str_in_output": True}
    with_stop = httpx.post(f"{server.url}/v1/completions", json=stopped, timeout=60).json()
    without = httpx.post(f"{server.url}/v1/completions", json=ended, timeout=60).json()
    assert with_stop["choices"][0]["finish_reason"] == "stop"
    assert with_stop["choices"][0]["text"] == without["choices"][0]["text"] + "<|im_end|>"


def test_return_token_ids_gives_the_prompts_and_the_replys_tokens(server: ServerProcess, client: OpenAI) -> None:
    """vLLM's return_token_ids (for RL trainers that must not re-tokenize): the prompt's ids as /tokenize makes
    them, and the reply's, which decode to its text; streamed, the chunks' ids add up to the same."""
    prompt, greedy = "The capital of France is", {"max_tokens": 12, "temperature": 0, "return_token_ids": True}
    prompt_ids = httpx.post(f"{server.url}/tokenize", json={"prompt": prompt}).json()["tokens"]
    (choice,) = client.completions.create(model=MODEL, prompt=prompt, extra_body=greedy).choices
    extra = choice.model_extra or {}
    assert extra["prompt_token_ids"] == prompt_ids and len(extra["token_ids"]) == 12
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": extra["token_ids"]}).json()["prompt"] == choice.text
    streamed_ids: list[int] = []
    firsts = []
    for chunk in client.completions.create(model=MODEL, prompt=prompt, stream=True, extra_body=greedy):
        for c in chunk.choices:
            streamed_ids += (c.model_extra or {}).get("token_ids", [])
            firsts.append((c.model_extra or {}).get("prompt_token_ids"))
    assert streamed_ids == extra["token_ids"] and firsts[0] == prompt_ids and not any(firsts[1:])

    messages = [{"role": "user", "content": "Name a color."}]
    chat_ids = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()["tokens"]
    reply = client.chat.completions.create(model=MODEL, messages=messages, extra_body=greedy)
    reply_ids = (reply.choices[0].model_extra or {})["token_ids"]
    assert (reply.model_extra or {})["prompt_token_ids"] == chat_ids and len(reply_ids) == reply.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True, extra_body=greedy))
    assert (chunks[0].model_extra or {})["prompt_token_ids"] == chat_ids
    assert [t for ch in chunks for c in ch.choices for t in (c.model_extra or {}).get("token_ids", [])] == reply_ids


def test_prompt_logprobs_in_vllms_format_agree_with_echo(server: ServerProcess) -> None:
    """vLLM's prompt_logprobs: per prompt token (none for the first), its logprob and rank and the top
    alternatives, keyed by token id; the same numbers that `echo` with `logprobs` gives."""
    prompt = {"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}
    vllm_style = httpx.post(f"{server.url}/v1/completions", json={**prompt, "prompt_logprobs": 2}).json()
    echoed = httpx.post(f"{server.url}/v1/completions", json={**prompt, "echo": True, "logprobs": 2}).json()
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": prompt["prompt"]}).json()["tokens"]
    entries = vllm_style["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(ids) == vllm_style["usage"]["prompt_tokens"] and entries[0] is None
    echo_logprobs = echoed["choices"][0]["logprobs"]["token_logprobs"][: len(ids)]
    for token_id, entry, expected in zip(ids[1:], entries[1:], echo_logprobs[1:], strict=True):
        own = entry[str(token_id)]
        assert own["logprob"] == pytest.approx(expected, abs=1e-4) and own["rank"] >= 1 and own["decoded_token"]
        alternative_ranks = {v["rank"] for k, v in entry.items() if k != str(token_id)}
        assert len(entry) <= 3 and alternative_ranks <= {1, 2} and 1 in alternative_ranks | {own["rank"]}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "prompt_logprobs": 0}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=chat).json()
    assert len(reply["prompt_logprobs"]) == reply["usage"]["prompt_tokens"]
    assert all(len(entry) == 1 for entry in reply["prompt_logprobs"][1:])
    streamed = httpx.post(
        f"{server.url}/v1/completions", json={**prompt, "prompt_logprobs": 2, "stream": True, "max_tokens": 3}
    )
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["prompt_logprobs"] == entries  # the first chunk carries them, as in vLLM
    assert not any("prompt_logprobs" in choice for chunk in chunks[1:] for choice in chunk["choices"])
    streamed_chat = httpx.post(f"{server.url}/v1/chat/completions", json={**chat, "stream": True, "max_tokens": 3})
    chat_chunks = [json.loads(line[6:]) for line in streamed_chat.text.splitlines() if line.startswith("data: {")]
    carrying = [chunk["prompt_logprobs"] for chunk in chat_chunks if "prompt_logprobs" in chunk]
    assert carrying == [reply["prompt_logprobs"]]  # once, at the top of a chunk, as in the whole response
    both = {**prompt, "echo": True, "logprobs": 2, "prompt_logprobs": 1}
    error = httpx.post(f"{server.url}/v1/completions", json=both).json()["error"]
    assert error["param"] == "prompt_logprobs", error


def test_vllm_fields_ember_lacks_are_refused_when_they_ask_for_something(server: ServerProcess) -> None:
    """guided_json, best_of and the like would change the output: refused by name, not silently dropped.
    Their do-nothing values (as vLLM clients send them) and other unknown fields pass."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for path, body, param, hint in [
        ("/v1/chat/completions", {**chat, "guided_json": {"type": "object"}}, "guided_json", "structured_outputs"),
        ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of", "'n'"),
    ]:
        error = httpx.post(f"{server.url}{path}", json=body).json()["error"]
        assert error["param"] == param and "not supported" in error["message"] and hint in error["message"], error
    harmless = {"min_tokens": 0, "best_of": 1, "skip_special_tokens": True, "guided_json": None, "x_trace": "a1"}
    assert httpx.post(f"{server.url}/v1/chat/completions", json={**chat, **harmless}).status_code == 200


def test_truncate_prompt_tokens_keeps_the_prompts_end(server: ServerProcess) -> None:
    """vLLM's truncate_prompt_tokens: the model sees only the prompt's last k tokens (-1: as many as fit), and the
    usage and the echo say so; a k outside [1, max_model_len] is a 400 on that field."""
    prompt = "One, two, three, four, five, six, seven, eight"
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": prompt}).json()["tokens"]
    greedy = {"max_tokens": 4, "temperature": 0}

    def complete(**body: Any) -> dict[str, Any]:
        return httpx.post(f"{server.url}/v1/completions", json={**greedy, **body}, timeout=60).json()

    cut = complete(prompt=prompt, truncate_prompt_tokens=4, echo=True)
    tail = complete(prompt=ids[-4:], echo=True)
    assert cut["usage"]["prompt_tokens"] == 4 and cut["choices"][0]["text"] == tail["choices"][0]["text"]
    assert complete(prompt=prompt)["choices"][0]["text"] != cut["choices"][0]["text"][len(prompt) :]
    assert complete(prompt=prompt, truncate_prompt_tokens=-1)["usage"]["prompt_tokens"] == len(ids)
    chat = {"messages": [{"role": "user", "content": prompt}], **greedy, "truncate_prompt_tokens": 6}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=chat).json()["usage"]["prompt_tokens"] == 6
    embedded = httpx.post(f"{server.url}/v1/embeddings", json={"input": prompt, "truncate_prompt_tokens": 3}).json()
    reference = httpx.post(f"{server.url}/v1/embeddings", json={"input": ids[-3:]}).json()
    assert embedded["usage"]["prompt_tokens"] == 3
    assert embedded["data"][0]["embedding"] == pytest.approx(reference["data"][0]["embedding"], abs=1e-5)
    max_model_len = httpx.get(f"{server.url}/v1/models").json()["data"][0]["max_model_len"]
    for keep in (0, -2, max_model_len + 1):
        for path, body in (("/v1/completions", {"prompt": prompt}), ("/v1/embeddings", {"input": prompt})):
            reply = httpx.post(f"{server.url}{path}", json={**body, "truncate_prompt_tokens": keep})
            assert reply.status_code == 400 and reply.json()["error"]["param"] == "truncate_prompt_tokens", keep


def preflight(url: str, origin: str) -> httpx.Response:
    """A browser's CORS preflight for a POST with a key and a JSON body."""
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    return httpx.options(f"{url}/v1/chat/completions", headers=headers)


def test_pages_served_from_this_machine_may_call_the_api(server: ServerProcess) -> None:
    """CORS by default: a page on localhost or 127.0.0.1 (any port) may call the API from the browser; a page
    from elsewhere may not (a site the user visits must not drive a local model)."""
    for origin in ("http://localhost:5173", "http://127.0.0.1:3000", "http://localhost"):
        answer = preflight(server.url, origin)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == origin, origin
    models = httpx.get(f"{server.url}/v1/models", headers={"Origin": "http://localhost:5173"})
    assert models.headers["access-control-allow-origin"] == "http://localhost:5173"
    for origin in ("https://evil.example", "http://localhost.evil.example"):
        assert "access-control-allow-origin" not in preflight(server.url, origin).headers, origin
        assert (
            "access-control-allow-origin"
            not in httpx.get(f"{server.url}/v1/models", headers={"Origin": origin}).headers
        )


def test_chat_template_allowed_origins_and_the_stats_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--chat-template replaces the model's template (chat, /tokenize, /tokenizer_info); --allowed-origins lets
    the named origins in, past the API key for the preflight, and the key's 401 stays readable to the page. While
    requests run, the log has a stats line every $EMBER_LOG_STATS_INTERVAL seconds; --enable-log-requests adds a
    line per finished request, under the API's id."""
    monkeypatch.setenv("EMBER_LOG_STATS_INTERVAL", "0.5")
    log = (tmp_path / "server.log").open("w")
    template = (
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    path = tmp_path / "chat.jinja"
    path.write_text(template)
    app = "https://app.example"
    options = ("--chat-template", str(path), "--allowed-origins", app, "--api-key", "k", "--enable-log-requests")
    with running_server(*options, log=log) as custom:
        key = {"Authorization": "Bearer k"}
        messages = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
        ids = httpx.post(f"{custom.url}/tokenize", json=messages).json()["tokens"]
        text = httpx.post(f"{custom.url}/detokenize", json={"tokens": ids}).json()["prompt"]
        assert text == "[system] Be brief.\n[user] Hi\n[assistant]"
        assert httpx.get(f"{custom.url}/tokenizer_info").json()["chat_template"] == template
        own = httpx.post(f"{custom.url}/tokenize", json={**messages, "chat_template": "{{ messages }}"})
        assert own.status_code == 400 and "--trust-request-chat-template" in own.json()["error"]["message"]
        reply = httpx.post(f"{custom.url}/v1/chat/completions", json={**messages, "max_tokens": 3}, headers=key).json()
        assert reply["usage"]["prompt_tokens"] == len(ids)
        answer = preflight(custom.url, app)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == app
        refused = httpx.get(f"{custom.url}/v1/models", headers={"Origin": app})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == app
        assert "access-control-allow-origin" not in preflight(custom.url, "http://localhost:5173").headers
        body = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}
        completion = httpx.post(f"{custom.url}/v1/completions", json=body, headers=key, timeout=120).json()
        time.sleep(1.0)  # the interval that saw the request ends, and its line is written
    lines = (tmp_path / "server.log").read_text().splitlines()
    finished = [line for line in lines if line.startswith(f"ember: {completion['id']}-0 finished")]
    assert len(finished) == 1 and re.fullmatch(
        r"ember: \S+ finished \(length\): 4 prompt tokens \(\d+ cached\), 200 generated; "
        r"first token after [\d.]+ s, done after [\d.]+ s",
        finished[0],
    ), lines
    stats = [line for line in lines if "generation" in line]
    assert stats and re.fullmatch(
        r"ember: prompt [\d.]+ tok/s, generation [\d.]+ tok/s; running \d+, waiting \d+; KV cache [\d.]+% used"
        r"(; prefix cache hits [\d.]+%)?",
        stats[0],
    ), stats
    assert sum(float(line.split("generation ")[1].split(" ")[0]) > 0 for line in stats) >= 1


def test_api_key_queue_limit_short_context_and_graceful_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBER_LOG_STATS_INTERVAL", "0.5")  # but --disable-log-stats: no stats line
    log = (tmp_path / "server.log").open("w")
    args = ("--api-key", "sekret", "--max-num-seqs", "2", "--max-waiting", "1", "--disable-log-stats")
    with running_server(*args, "--max-model-len", "256", log=log) as server:
        url = f"{server.url}/v1/models"
        assert httpx.get(url).status_code == 401
        assert (
            httpx.get(url, headers={"Authorization": "Bearer wrong"}).json()["error"]["type"] == "authentication_error"
        )
        assert httpx.get(url, headers={"Authorization": "Bearer sekret"}).status_code == 200
        message = {"max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}  # Anthropic's clients: x-api-key
        assert httpx.post(
            f"{server.url}/v1/messages", json=message, headers={"x-api-key": "sekret"}, timeout=60
        ).is_success
        denied = httpx.post(f"{server.url}/v1/messages", json=message).json()
        assert denied["type"] == "error" and denied["error"]["type"] == "authentication_error", denied
        body = {"prompt": "Hi", "max_tokens": 4, "ignore_eos": True, "stream": True}
        auth = {"Authorization": "Bearer sekret"}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=auth, timeout=60) as streamed:
            lines = list(streamed.iter_lines())
        assert streamed.status_code == 200 and sum(line.startswith("data: {") for line in lines) >= 4
        assert "data: [DONE]" in lines
        assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no key
        assert httpx.post(f"{server.url}/reset_prefix_cache").status_code == 401
        reset = httpx.post(f"{server.url}/reset_prefix_cache", headers={"Authorization": "Bearer sekret"})
        assert reset.status_code == 200
        # one call of more prompts than the server holds at once is served a batch at a time, not refused
        words = ["red", "green", "blue", "cyan", "gold", "gray", "pink"]
        greedy = {"max_tokens": 3, "temperature": 0, "ignore_eos": True}
        many = httpx.post(
            f"{server.url}/v1/completions", json={"prompt": words, **greedy}, headers=auth, timeout=120
        ).json()
        alone = httpx.post(
            f"{server.url}/v1/completions", json={"prompt": words[4], **greedy}, headers=auth, timeout=60
        ).json()
        assert [c["index"] for c in many["choices"]] == list(range(7))
        assert many["choices"][4]["text"] == alone["choices"][0]["text"]
        vectors = httpx.post(f"{server.url}/v1/embeddings", json={"input": words}, headers=auth, timeout=120).json()
        assert len(vectors["data"]) == 7 and vectors["usage"]["prompt_tokens"] >= 7

        async def flood() -> list[int]:
            async with httpx.AsyncClient(timeout=120) as http:
                body = {"prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": True}
                headers = {"Authorization": "Bearer sekret"}
                responses = await asyncio.gather(
                    *(http.post(f"{server.url}/v1/completions", json=body, headers=headers) for _ in range(8))
                )
                return [r.status_code for r in responses]

        check_responses_truncation(server, auth, max_model_len=256)
        codes = asyncio.run(flood())
        assert codes.count(200) >= 3 and codes.count(429) >= 1 and set(codes) <= {200, 429}
        assert server.stop() == 0  # SIGTERM: graceful exit with status 0
    assert "generation" not in (tmp_path / "server.log").read_text()


def check_responses_truncation(server: ServerProcess, auth: dict[str, str], max_model_len: int) -> None:
    """Responses' truncation "auto": a conversation over the context loses its fewest oldest turns after the task
    (a call with its output), and the model answers; "disabled" (the default) refuses it."""
    story = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    call = {"type": "function_call", "call_id": "c1", "name": "recall", "arguments": "{}"}
    items = [
        {"role": "user", "content": "Remember this story: " + story},
        call,
        {"type": "function_call_output", "call_id": "c1", "output": story},
        {"role": "assistant", "content": story},
        {"role": "user", "content": "And this one: " + story},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "Which animal jumps?"},
    ]
    body = {"input": items, "max_output_tokens": 8, "temperature": 0}
    refused = httpx.post(f"{server.url}/v1/responses", json=body, headers=auth, timeout=60).json()["error"]
    assert refused["code"] == "context_length_exceeded" and refused["param"] == "input", refused
    reply = httpx.post(f"{server.url}/v1/responses", json={**body, "truncation": "auto"}, headers=auth, timeout=60)
    reply = reply.json()
    assert reply["status"] in ("completed", "incomplete") and reply["truncation"] == "auto", reply

    def tokens(kept: list[dict[str, Any]]) -> int:
        messages = [{"role": m["role"], "content": m["content"]} for m in kept if "role" in m]
        return httpx.post(f"{server.url}/tokenize", json={"messages": messages}, headers=auth).json()["count"]

    # turns after the task: the call with its output, the assistant's story, the second story, "Noted.", the question
    turns = [[1, 2], [3], [4], [5], [6]]
    kept = [[items[0], *(items[i] for turn in turns[k:] for i in turn)] for k in range(len(turns))]
    fitting = next(k for k in range(1, len(turns)) if tokens(kept[k]) + 8 <= max_model_len)
    assert fitting >= 2  # the call with its output went, and at least the assistant's story after it
    assert reply["usage"]["input_tokens"] == tokens(kept[fitting])


def test_multi_turn_conversation_reports_growing_cached_tokens(server: ServerProcess, client: OpenAI) -> None:
    messages = [{"role": "system", "content": "You are a terse assistant. " * 20}]
    cached = []
    for question in ("What is 2 + 2?", "And times 3?", "Now subtract 5."):
        messages.append({"role": "user", "content": question})
        resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        cached.append(resp.usage.prompt_tokens_details.cached_tokens)
        assert cached[-1] < resp.usage.prompt_tokens
        messages.append({"role": "assistant", "content": resp.choices[0].message.content})
    assert cached[1] > 100 and cached[2] > cached[1]  # each turn re-uses the conversation so far
    assert metric(server, "ember:prefix_cache_hits_total") >= cached[1] + cached[2]
    assert metric(server, "ember:prefix_cache_queries_total") > metric(server, "ember:prefix_cache_hits_total")
    assert httpx.post(f"{server.url}/reset_prefix_cache").json() == {"status": "ok"}
    again = client.chat.completions.create(model=MODEL, messages=messages[:2], max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens == 0


def test_a_cache_salt_keeps_a_tenants_prefixes_its_own(server: ServerProcess, client: OpenAI) -> None:
    """vLLM's `cache_salt` on chat, completions and the Responses API: the same prompt under another salt (or
    none) finds nothing cached; under its own salt it does. An empty salt is a 400."""
    messages = [{"role": "user", "content": "A prompt long enough to fill two KV blocks. " * 5}]

    def cached(salt: str | None, api: str = "chat") -> int:
        extra = {"cache_salt": salt} if salt is not None else {}
        if api == "completions":
            text = "A prompt long enough to fill two KV blocks. " * 5
            reply = client.completions.create(model=MODEL, prompt=text, max_tokens=1, extra_body=extra)
        elif api == "responses":
            response = client.responses.create(model=MODEL, input=messages, max_output_tokens=1, extra_body=extra)
            return response.usage.input_tokens_details.cached_tokens
        else:
            reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, extra_body=extra)
        return reply.usage.prompt_tokens_details.cached_tokens

    assert cached("a") == 0 and cached("b") == 0 and cached(None) == 0
    assert cached("a") > 16 and cached("b") > 16 and cached(None) > 16
    assert cached("c", "responses") == 0 and cached("c") > 16  # the Responses API's prompt is the chat's
    assert cached("d", "completions") == 0 and cached("d", "completions") > 16
    for path, body in [("/v1/chat/completions", {"messages": messages}), ("/v1/completions", {"prompt": "x"})]:
        refused = httpx.post(f"{server.url}{path}", json={**body, "cache_salt": ""})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "cache_salt", refused.text


PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)
    kind: Literal["cat", "dog", "fish"]
    legs: int = pydantic.Field(ge=0, le=8)


def test_response_format_json_schema_and_the_clients_parse_helper(client: OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}},
        max_tokens=60,
        temperature=1.0,
        seed=3,
        n=3,
    )
    for choice in resp.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON_SCHEMA)
    parsed = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "Describe a pet."}], response_format=Pet, max_tokens=60
    )
    assert isinstance(parsed.choices[0].message.parsed, Pet)


def test_responses_text_format_json_schema_and_the_clients_parse_helper(client: OpenAI) -> None:
    resp = client.responses.create(
        model=MODEL,
        input="Invent a person.",
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON_SCHEMA, "strict": True}},
        max_output_tokens=60,
        extra_body={"seed": 3},
    )
    assert resp.status == "completed"
    jsonschema.validate(json.loads(resp.output_text), PERSON_SCHEMA)
    parsed = client.responses.parse(model=MODEL, input="Describe a pet.", text_format=Pet, max_output_tokens=60)
    assert isinstance(parsed.output_parsed, Pet)


def test_structured_outputs_extension_on_completions(client: OpenAI) -> None:
    resp = client.completions.create(
        model=MODEL,
        prompt="Is the sky blue? Answer:",
        max_tokens=5,
        n=4,
        temperature=1.0,
        seed=2,
        extra_body={"structured_outputs": {"choice": [" yes", " no", " maybe"]}},
    )
    assert all(c.text in (" yes", " no", " maybe") and c.finish_reason == "stop" for c in resp.choices)


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "description": "The time now, in a time zone"}},
]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def streamed_reply(client: OpenAI, **kwargs: Any) -> tuple[str, list[tuple[str, str]], str | None]:
    """(content, [(name, arguments)], finish reason) reassembled from a stream's deltas."""
    content, names, arguments, finish = "", {}, {}, None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kwargs):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            names[call.index] = names.get(call.index, "") + (call.function.name or "")
            arguments[call.index] = arguments.get(call.index, "") + (call.function.arguments or "")
        finish = chunk.choices[0].finish_reason or finish
    return content, [(names[i], arguments[i]) for i in sorted(names)], finish


def test_tool_calls_required_named_streamed_and_continued(client: OpenAI) -> None:
    kwargs: dict[str, Any] = dict(messages=QUESTION, tools=TOOLS, max_tokens=60, temperature=0)
    # parallel_tool_calls not given: off, as SmolLM2's template knows no tools (else it repeats calls)
    required = client.chat.completions.create(model=MODEL, tool_choice="required", **kwargs).choices[0]
    assert required.finish_reason == "tool_calls" and len(required.message.tool_calls) == 1
    for call in required.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        if call.function.name == "get_weather":
            jsonschema.validate(json.loads(call.function.arguments), WEATHER)
        else:
            assert call.function.name == "get_time" and isinstance(json.loads(call.function.arguments), dict)

    named = client.chat.completions.create(
        model=MODEL, tool_choice={"type": "function", "function": {"name": "get_time"}}, **kwargs
    ).choices[0]
    assert [c.function.name for c in named.message.tool_calls] == ["get_time"] and named.message.content is None
    assert named.finish_reason == "tool_calls"

    content, calls, finish = streamed_reply(client, tool_choice="required", parallel_tool_calls=False, **kwargs)
    assert calls == [(c.function.name, c.function.arguments) for c in required.message.tool_calls]
    assert content == (required.message.content or "") and finish == "tool_calls"

    call = required.message.tool_calls[0]
    conversation = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=conversation, tools=TOOLS, max_tokens=16)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_strict_tools_must_be_enforceable_and_others_are_served_as_far_as_the_grammar_goes(client: OpenAI) -> None:
    """pydantic writes `uniqueItems` for a set, which the grammar cannot enforce: served, unless 'strict'."""
    tags = {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3, "uniqueItems": True}
    parameters = {"type": "object", "properties": {"tags": tags}, "required": ["tags"]}
    tool = {"type": "function", "function": {"name": "tag_city", "parameters": parameters}}
    kwargs: dict[str, Any] = dict(model=MODEL, messages=QUESTION, tool_choice="required", max_tokens=60, temperature=0)
    (call,) = client.chat.completions.create(tools=[tool], **kwargs).choices[0].message.tool_calls
    assert call.function.name == "tag_city" and isinstance(json.loads(call.function.arguments)["tags"], list)

    strict = {"type": "function", "function": {**tool["function"], "strict": True}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(tools=[strict], **kwargs)
    assert info.value.body["param"] == "tools.0.function.parameters"
    assert "'uniqueItems' at #/properties/tags" in info.value.body["message"]


def test_a_predicted_output_drafts_and_leaves_the_reply_as_it_was(client: OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, messages=QUESTION, max_tokens=40, temperature=0)
    plain = client.chat.completions.create(**kwargs)
    reply = plain.choices[0].message.content
    assert plain.usage.completion_tokens_details is None  # only a request with a prediction gets the counts
    prediction = {"type": "content", "content": [{"type": "text", "text": reply}]}
    predicted = client.chat.completions.create(prediction=prediction, **kwargs)
    assert predicted.choices[0].message.content == reply
    details = predicted.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0 and details.rejected_prediction_tokens >= 0

    stream = client.chat.completions.create(
        prediction={"type": "content", "content": reply}, stream=True, stream_options={"include_usage": True}, **kwargs
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply
    assert chunks[-1].usage.completion_tokens_details.accepted_prediction_tokens > 0

    prompt = "The capital of France is"
    text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    completion = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        extra_body={"prediction": {"type": "content", "content": text}},
    )
    assert (
        completion.choices[0].text == text and completion.usage.completion_tokens_details.accepted_prediction_tokens > 0
    )

    for bad in ({"type": "content", "content": [{"type": "image_url"}]}, {"type": "file", "content": "x"}):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(prediction=bad, **kwargs)
        assert info.value.body["param"].startswith("prediction")


def test_tool_choice_none_leaves_the_tools_out(client: OpenAI) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    none = client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0
    )
    auto = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, max_tokens=8, temperature=0)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens
    assert (
        none.choices[0].message.content == plain.choices[0].message.content and not none.choices[0].message.tool_calls
    )


async def _structured_clients(server: ServerProcess, count: int) -> list[str]:
    """`count` concurrent streams, alternately a JSON schema and required tool calls; every third hangs up."""
    client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    async def one(i: int) -> str:
        constraint: dict[str, Any] = (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON_SCHEMA}}}
            if i % 2
            else {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
        )
        stream = await client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=60, temperature=1.0, seed=i, stream=True, **constraint
        )
        text, finish, received = "", None, 0
        async for chunk in stream:
            received += 1
            if i % 3 == 0 and received == 3:
                await stream.close()
                return "disconnected"
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        if i % 2:
            jsonschema.validate(json.loads(text), PERSON_SCHEMA)
        return finish or "none"

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def test_concurrent_constrained_streams_with_disconnects_free_everything(server: ServerProcess) -> None:
    results = asyncio.run(_structured_clients(server, 12))
    assert results.count("disconnected") == 4
    assert all(r == ("stop" if i % 2 else "tool_calls") for i, r in enumerate(results) if i % 3), results
    assert_idle(server)
