"""`ember run-batch`: OpenAI Batch API files through the server's handlers, offline, with the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams
from tests.test_cli import ember


def request(custom_id: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def test_run_batch_answers_each_line_as_the_server_would(tmp_path: Path, smollm: LLM) -> None:
    chat = {"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 12, "temperature": 0}
    lines = [
        request("chat", "/v1/chat/completions", chat),
        request(
            "completion", "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
        ),
        "not json",
        request("speech", "/v1/audio/speech", {"input": "x"}),
        request("bad-param", "/v1/completions", {"prompt": "x", "max_tokens": -1}),
        request("stream", "/v1/chat/completions", {**chat, "stream": True}),
        "",  # blank lines are skipped
        request("response", "/v1/responses", {"input": "Say hi", "max_output_tokens": 8, "temperature": 0}),
        request("embedding", "/v1/embeddings", {"input": ["Hello", "world"]}),
        request("rerank", "/v1/rerank", {"query": "Hello", "documents": ["world", "Hello"]}),
    ]
    source, results = tmp_path / "batch.jsonl", tmp_path / "results.jsonl"
    source.write_text("\n".join(lines) + "\n")
    run = ember("run-batch", "-i", str(source), "-o", str(results), "--dtype", "float32")
    assert run.returncode == 1, run.stderr  # some lines failed
    assert "9 requests: 5 answered, 4 failed" in run.stderr
    records = [json.loads(line) for line in results.read_text().splitlines()]
    ids = [r["custom_id"] for r in records]
    assert ids == ["chat", "completion", None, "speech", "bad-param", "stream", "response", "embedding", "rerank"]
    by_id = {r["custom_id"]: r for r in records}
    completion = by_id["completion"]["response"]
    assert completion["status_code"] == 200 and completion["request_id"] == completion["body"]["id"]
    expected = smollm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0))[0]
    assert completion["body"]["choices"][0]["text"] == expected.outputs[0].text
    assert by_id["chat"]["response"]["body"]["choices"][0]["message"]["content"]
    assert by_id["response"]["response"]["body"]["object"] == "response"
    refused = by_id["bad-param"]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["param"] == "max_tokens"
    assert "not valid JSON" in records[2]["error"]["message"] and records[2]["response"] is None
    assert "'/v1/audio/speech' is not served" in by_id["speech"]["error"]["message"]
    vectors = by_id["embedding"]["response"]["body"]["data"]
    assert len(vectors) == 2 and abs(sum(x * x for x in vectors[0]["embedding"]) - 1) < 1e-4
    assert "cannot stream" in by_id["stream"]["error"]["message"]
    ranked = by_id["rerank"]["response"]["body"]["results"]
    assert ranked[0]["index"] == 1 and abs(ranked[0]["relevance_score"] - 1) < 1e-4  # itself first


def test_a_batch_without_errors_exits_0_and_can_write_to_stdout(tmp_path: Path, tiny_models: dict) -> None:
    """Also the priority policy's flag and field: the lines' priorities are taken."""
    source = tmp_path / "batch.jsonl"
    lines = [
        request("one", "/v1/embeddings", {"input": [5, 6, 7], "encoding_format": "float"}),
        request("two", "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 3, "priority": -1}),
    ]
    source.write_text("\n".join(lines) + "\n")
    model = str(tiny_models["llama3"][0])  # no tokenizer: token ids in, a vector out
    policy = ("--scheduling-policy", "priority")
    run = ember("run-batch", "--model", model, "--dtype", "float32", *policy, "-i", str(source), "-o", "-")
    assert run.returncode == 0, run.stderr
    one, two = [json.loads(line) for line in run.stdout.splitlines()]
    assert one["custom_id"] == "one" and one["response"]["status_code"] == 200
    assert len(one["response"]["body"]["data"][0]["embedding"]) == 64  # the tiny model's hidden size
    assert two["response"]["body"]["usage"]["completion_tokens"] == 3


def test_the_models_generation_config_sets_the_sampling_defaults(tmp_path: Path) -> None:
    """As vLLM's `--generation-config auto`: a request that leaves temperature out takes the model's (here 0:
    greedy), one that sets it keeps its own; one that leaves max_tokens out gets the model's max_new_tokens.
    The config's end tokens end replies too."""
    from transformers import AutoTokenizer

    from ember.models.loader import default_model_path, gguf_as_hf_dir
    from tests.conftest import make_tiny_hf_model

    model = tmp_path / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_as_hf_dir(default_model_path())))  # chat needs one
    make_tiny_hf_model("llama3", model, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(str(model))
    config = {"temperature": 0.0, "top_k": 5, "eos_token_id": [2, 7], "max_new_tokens": 3}
    (model / "generation_config.json").write_text(json.dumps(config))
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 12, "ignore_eos": True, "return_token_ids": True, "seed": 3}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True}
    source = tmp_path / "batch.jsonl"
    lines = [
        request("default", "/v1/completions", body),
        request("greedy", "/v1/completions", {**body, "temperature": 0}),
        request("hot", "/v1/completions", {**body, "temperature": 1.0, "top_k": 0}),
        request("completion-default-length", "/v1/completions", {**body, "max_tokens": None}),
        request("chat-default-length", "/v1/chat/completions", chat),
        request("chat-own-length", "/v1/chat/completions", {**chat, "max_tokens": 5}),
    ]
    source.write_text("\n".join(lines) + "\n")
    run = ember("run-batch", "--model", str(model), "--dtype", "float32", "-i", str(source), "-o", "-")
    assert run.returncode == 0, run.stderr
    assert "the model's generation config sets the default sampling: temperature 0.0, top_k 5" in run.stderr
    assert "the model's generation config sets the default max_tokens: 3" in run.stderr
    bodies = {r["custom_id"]: r["response"]["body"] for r in map(json.loads, run.stdout.splitlines())}
    tokens = {name: body["choices"][0].get("token_ids") for name, body in bodies.items()}
    assert tokens["default"] == tokens["greedy"] != tokens["hot"]
    lengths = {name: body["usage"]["completion_tokens"] for name, body in bodies.items()}
    assert lengths == {
        "default": 12, "greedy": 12, "hot": 12,
        "completion-default-length": 3, "chat-default-length": 3, "chat-own-length": 5,
    }  # fmt: skip
    llm = LLM(str(model), num_blocks=16, block_size=8, dtype="float32")
    assert llm.engine.eos_token_ids == [2, 7]


def test_sampling_defaults_stand_only_for_the_fields_a_request_leaves_out() -> None:
    """`--generation-config vllm` passes no defaults: the API's own hold."""
    from ember.server.protocol import CompletionRequest, sampling_defaults

    defaults = sampling_defaults({"temperature": 0.6, "top_k": 20, "max_new_tokens": 99, "do_sample": True})
    assert defaults == {"temperature": 0.6, "top_k": 20}
    request = CompletionRequest.model_validate({"prompt": "x", "top_k": 3})
    params = request.sampling_params(16, None, None, defaults)
    assert (params.temperature, params.top_k, params.top_p) == (0.6, 3, 1.0)
    api = request.sampling_params(16, None, None, {})
    assert (api.temperature, api.top_k) == (1.0, 3)
