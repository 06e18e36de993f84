"""Formats built on a model's special tokens, through a real server on a tiny model whose tokenizer has them:
fill-in-the-middle prompts (OpenAI's `suffix`) and Mistral's `[TOOL_CALLS]` tool calls."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from ember.server.fill_in_middle import fim_token_ids
from ember.server.launch import ServerProcess, running_server
from tests.conftest import make_tiny_hf_model
from tests.test_server import MODEL, streamed_reply
from tests.test_tool_calls import MISTRAL_TEMPLATE, MISTRAL_V11_TEMPLATE

FIM = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
MISTRAL_TOKENS = [
    "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
    "[ARGS]",
]  # fmt: skip


@pytest.fixture(scope="module")
def special(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Any]]:
    """A tiny Qwen2 with SmolLM2's tokenizer plus Qwen2.5-Coder's FIM tokens and Mistral's control tokens (all
    special), and a Mistral-style chat template; the tokenizer as the server loads it."""
    from transformers import AutoTokenizer

    from ember.models.loader import default_model_path, gguf_as_hf_dir

    path = tmp_path_factory.mktemp("special")
    smollm = AutoTokenizer.from_pretrained(str(gguf_as_hf_dir(default_model_path())))
    smollm.add_special_tokens({"additional_special_tokens": FIM + MISTRAL_TOKENS})
    smollm.chat_template = MISTRAL_TEMPLATE
    make_tiny_hf_model("qwen2", path, vocab_size=len(smollm))
    smollm.save_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    # served under the other server tests' model name, so that their helpers apply
    served = ("--model", str(path), "--dtype", "float32", "--served-model-name", MODEL, "--trust-request-chat-template")
    with running_server(*served) as server:
        yield server, tokenizer


def test_suffix_lays_the_prompt_out_with_the_models_fim_tokens(special: tuple[ServerProcess, Any]) -> None:
    """The prompt the model sees is <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|>, each text
    tokenized on its own."""
    server, tokenizer = special
    assert fim_token_ids(tokenizer) == tuple(tokenizer.convert_tokens_to_ids(FIM))
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    expected = [
        tokenizer.convert_tokens_to_ids(FIM[0]),
        *tokenizer(prefix, add_special_tokens=False)["input_ids"],
        tokenizer.convert_tokens_to_ids(FIM[1]),
        *tokenizer(suffix, add_special_tokens=False)["input_ids"],
        tokenizer.convert_tokens_to_ids(FIM[2]),
    ]
    body = {"prompt": prefix, "suffix": suffix, "max_tokens": 4, "temperature": 0, "return_token_ids": True}
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    choice = reply["choices"][0]
    assert choice["prompt_token_ids"] == expected and reply["usage"]["prompt_tokens"] == len(expected)
    assert len(choice["token_ids"]) == 4
    for field, value in (("echo", True), ("truncate_prompt_tokens", 8), ("prompt", [5, 6])):
        error = httpx.post(f"{server.url}/v1/completions", json={**body, field: value}, timeout=60).json()
        assert error["error"]["param"] == field, error


def test_mistral_tool_calls_open_with_the_special_token_and_carry_short_ids(
    special: tuple[ServerProcess, Any],
) -> None:
    """`--tool-call-parser auto` finds Mistral's format in the template; the grammar opens the calls with the
    [TOOL_CALLS] special token (kept in the reply's text, which the parser reads), the call ids are 9 letters and
    digits, and the call sent back renders in the template, which takes no other ids."""
    server, tokenizer = special
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    tools: list[Any] = [{"type": "function", "function": {"name": "get_time", "description": "The time now"}}]
    question = [{"role": "user", "content": "What time is it?"}]
    named = {"type": "function", "function": {"name": "get_time"}}
    kwargs: dict[str, Any] = dict(messages=question, tools=tools, tool_choice=named, max_tokens=60, temperature=0)
    extra = {"return_token_ids": True}
    reply = client.chat.completions.create(model=MODEL, extra_body=extra, **kwargs).choices[0]
    (call,) = reply.message.tool_calls or []
    assert reply.finish_reason == "tool_calls" and reply.message.content is None
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}
    assert len(call.id) == 9 and call.id.isalnum()
    # the grammar matches text: the model may write the special token or spell it; the reply's text keeps it
    assert tokenizer.decode((reply.model_extra or {})["token_ids"]).startswith("[TOOL_CALLS][")
    assert streamed_reply(client, **kwargs)[1:] == ([("get_time", "{}")], "tool_calls")
    conversation = [
        *question,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "12:00"},
    ]
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": conversation, "tools": tools}).json()["tokens"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert f'[TOOL_CALLS][{{"name": "get_time", "arguments": {{}}, "id": "{call.id}"}}]' in text
    assert f'"call_id": "{call.id}"}}[/TOOL_RESULTS]' in text
    answer = client.chat.completions.create(model=MODEL, messages=conversation, tools=tools, max_tokens=4)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_mistral_v11_calls_are_the_name_and_arguments_after_each_special_token(
    special: tuple[ServerProcess, Any],
) -> None:
    """On a template of Mistral's v11 form (the request's own): the grammar writes `[TOOL_CALLS]name[ARGS]{...}`,
    special tokens kept, which comes back as a call, whole and streamed, with an id of 9 letters and digits; the
    call sent back renders in that form."""
    server, tokenizer = special
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    tools: list[Any] = [{"type": "function", "function": {"name": "get_time", "description": "The time now"}}]
    question = [{"role": "user", "content": "What time is it?"}]
    template = {"chat_template": MISTRAL_V11_TEMPLATE}
    kwargs: dict[str, Any] = dict(
        messages=question, tools=tools, tool_choice="required", parallel_tool_calls=False, max_tokens=60,
        temperature=0,
    )  # fmt: skip
    reply = client.chat.completions.create(model=MODEL, extra_body={**template, "return_token_ids": True}, **kwargs)
    choice = reply.choices[0]
    (call,) = choice.message.tool_calls or []
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}
    assert len(call.id) == 9 and call.id.isalnum()
    assert tokenizer.decode((choice.model_extra or {})["token_ids"]).startswith("[TOOL_CALLS]get_time[ARGS]{}")
    assert streamed_reply(client, extra_body=template, **kwargs)[1:] == ([("get_time", "{}")], "tool_calls")
    conversation = [
        *question,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "12:00"},
    ]
    asked = {"messages": conversation, "tools": tools, **template}
    ids = httpx.post(f"{server.url}/tokenize", json=asked).json()["tokens"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert f"[/INST][TOOL_CALLS]get_time[ARGS]{{}}{tokenizer.eos_token}[TOOL_RESULTS]12:00[/TOOL_RESULTS]" in text


def test_a_model_without_fim_tokens_refuses_a_suffix(server: ServerProcess) -> None:
    reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "def f():", "suffix": "\n", "max_tokens": 2})
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == "suffix" and "fill in the middle" in error["message"]


@pytest.mark.parametrize("names", [FIM, ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]])
def test_fim_tokens_of_either_family_are_found(names: list[str]) -> None:
    class Vocab:
        def get_vocab(self) -> dict[str, int]:
            return {"a": 0, **{name: 10 + i for i, name in enumerate(names)}}

    assert fim_token_ids(Vocab()) == (10, 11, 12)


def test_llama_cpp_infill_lays_out_context_files_prefix_suffix_and_the_typed_line(
    special: tuple[ServerProcess, Any],
) -> None:
    """llama.cpp's `POST /infill` (llama.vscode, llama.vim): the context files as text before <|fim_prefix|>
    prefix <|fim_suffix|> suffix <|fim_middle|>, then the line typed so far; a repository-level layout when the
    tokenizer has <|repo_name|> and <|file_sep|>. The reply is llama.cpp's, streamed alike."""
    from ember.server.llamacpp_api import LlamaCppRequest, infill_prompt

    server, tokenizer = special
    body = {
        "input_prefix": "def add(a, b):\n",
        "input_suffix": "\n\nprint(add(1, 2))\n",
        "input_extra": [{"filename": "util.py", "text": "import math\n"}],
        "prompt": "    return",
        "n_predict": 6,
        "temperature": 0,
        "ignore_eos": True,
    }

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    fim = tokenizer.convert_tokens_to_ids(FIM)
    expected = [*ids("import math\n"), fim[0], *ids(body["input_prefix"]), fim[1], *ids(body["input_suffix"]), fim[2]]
    assert infill_prompt(tokenizer, LlamaCppRequest.model_validate(body)) == expected + ids("    return")
    as_ids = LlamaCppRequest.model_validate({**body, "prompt": ids("    return")})  # the typed line as token ids
    assert infill_prompt(tokenizer, as_ids) == expected + ids("    return")
    reply = httpx.post(f"{server.url}/infill", json=body, timeout=60).json()
    assert reply["tokens_evaluated"] == len(expected) + len(ids("    return"))
    assert (reply["tokens_predicted"], reply["stop"], reply["stop_type"]) == (6, True, "limit")
    assert tokenizer.decode(reply["tokens"]) == reply["content"]
    lines = httpx.post(f"{server.url}/infill", json={**body, "stream": True}, timeout=60).text.split("\n\n")
    pieces = [json.loads(line.removeprefix("data: ")) for line in lines if line]
    assert "".join(p["content"] for p in pieces) == reply["content"] and pieces[-1]["stop"] is True

    repo_level = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    repo_level.add_special_tokens({"additional_special_tokens": [*FIM, "<|repo_name|>", "<|file_sep|>"]})
    repo, file_sep = repo_level.convert_tokens_to_ids(["<|repo_name|>", "<|file_sep|>"])
    laid_out = infill_prompt(repo_level, LlamaCppRequest.model_validate(body))
    context = [repo, *ids("myproject\n"), file_sep, *ids("util.py\nimport math\n"), file_sep, *ids("filename\n")]
    assert laid_out[: len(context)] == context and laid_out[len(context)] == repo_level.convert_tokens_to_ids(FIM[0])
