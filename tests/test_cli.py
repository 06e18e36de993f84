"""The `ember` command as a user runs it: output on success, one clear line (no traceback) on error."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest


def ember(*args: str, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ember.cli", *args], capture_output=True, text=True, timeout=120, input=input_text
    )


def test_commands_that_need_no_model_load_neither_torch_nor_openai() -> None:
    """`ember --help`, argument errors, `ember skills` and the MCP servers start in a fraction of a second:
    torch (the engine) and openai (the agent loop) load only in the commands that use them."""
    probe = (
        "import sys\n"
        "from ember.cli import build_parser\n"
        "from ember.agents.cli import check_agent_args, list_skills, serve_sandbox, serve_skills\n"
        "build_parser()\n"
        "print(sorted({'torch', 'openai', 'transformers'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
    assert "agent" in ember("--help").stdout


def test_serve_reports_a_port_in_use_before_loading_the_model() -> None:
    """The address is bound first: with the port taken, the error is about the port, not the (missing)
    model that a load would have reported after seconds."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = ember("serve", "--port", str(port), "--model", "/no/such/model.gguf")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"ember: error: cannot listen on 127.0.0.1:{port}: Address already in use " + (
        "(is another server using the port?)"
    )


def test_a_bad_stats_interval_is_refused_before_the_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_LOG_STATS_INTERVAL", "0")  # a zero interval would spin the stats thread
    result = ember("serve", "--port", "0", "--model", "/no/such/model.gguf")  # the interval's error comes first
    assert result.returncode == 2
    assert (
        result.stderr.strip() == "ember: error: EMBER_LOG_STATS_INTERVAL must be a positive number of seconds, got '0'"
    )


def test_generate_prints_the_completion() -> None:
    result = ember("generate", "The capital of France is", "--max-tokens", "6", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chat_answers_and_exits() -> None:
    result = ember(
        "chat", "--max-tokens", "16", "--dtype", "float32", input_text="What is the capital of France?\n/exit\n"
    )
    assert result.returncode == 0, result.stderr
    assert "model>" in result.stdout and "Paris" in result.stdout


def test_generate_with_a_schema_file_prints_valid_json(tmp_path) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
    }
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    result = ember("generate", "Weather report as JSON:", "--json-schema", str(path), "--max-tokens", "40")
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), schema)
    choice = ember("generate", "Is water wet? Answer:", "--choice", " yes", "--choice", " no", "--temperature", "1")
    assert choice.returncode == 0 and choice.stdout.rstrip("\n") in (" yes", " no"), choice.stdout


CLEAR_ERRORS: list[tuple[list[str], str]] = [
    (["generate", "hi", "--model", "/no/such/model.gguf"], "not found"),
    (["serve", "--model", "/no/such/model.gguf", "--port", "0"], "not found"),
    (["generate", "hi", "--max-tokens", "0"], "max_tokens must be an integer >= 1"),
    (["generate", "", "--max-tokens", "4"], "the prompt is empty"),
    (["generate", "hi", "--speculative", "medusa"], "speculative method must be one of"),
    (["bench", "latency"], "pass --speculative"),
    (["bench", "latency", "--prediction", "--speculative", "ngram"], "pass --speculative"),
    (["bench", "latency", "--prediction", "--workload", "random"], "needs the predicted outputs"),
    (["bench", "throughput", "--num-requests", "0"], "--num-requests: must be at least 1"),  # 0 ran them all
    (["generate", "hi", "--regex", "(", "--max-tokens", "4"], "invalid structured output constraint"),
    (["generate", "hi", "--json-schema", "{oops"], "--json-schema is neither a file nor valid JSON"),
    (["generate", "hi", "--json-object", "--choice", "a"], "at most one of --json-schema"),
    (["serve", "--chat-template", "/no/such.jinja"], "is neither a file nor a Jinja template"),
    (["serve", "--chat-template", "{% for m in messages %}"], "--chat-template: line 1: Unexpected end"),
    (["serve", "--allowed-origins", "app.example"], "'app.example' is not an origin"),
    (["chat", "--chat-template", "{{ oops"], "--chat-template: line 1"),
    (["serve", "--tool-call-parser", "phi4"], "invalid choice: 'phi4' (choose from 'auto', 'hermes'"),
    (["serve", "/no/such/model.gguf", "--port", "0"], "not found"),  # vllm serve's positional model
    (["serve", "a.gguf", "--model", "b.gguf"], "two models given"),
    (["serve", "--speculative-config", '{"method": "eagle"}'], "method must be ngram, suffix or draft_model"),
    (["serve", "--speculative-config", '{"method": "ngram", "k": 1}'], "k: not served"),
    (["generate", "hi", "--speculative-config", '{"method": "ngram"}', "--speculative", "suffix"], "not both"),
    (["serve", "--lora-modules", "sql"], "expected NAME=PATH, got 'sql'"),
    (["serve", "--lora-modules", '{"name": "sql"}'], 'a JSON entry needs "name" and "path" strings'),
    (["serve", "--lora-modules", "a=/x", "a=/y", "--port", "0"], "--lora-modules names a more than once"),
    (["serve", "--max-lora-rank", "0", "--port", "0"], "max_lora_rank must be at least 1"),
    (["generate", "hi", "--lora", "/no/such/adapter"], "must hold adapter_config.json"),
    (["run-batch", "-i", "/no/such.jsonl", "-o", "-"], "cannot read the input file '/no/such.jsonl'"),
    (["run-batch", "-i", "/dev/null", "-o", "-"], "the input file '/dev/null' holds no request"),
    (["generate", "hi", "--device", "cpu", "--kv-cache-dtype", "fp8"], "runs on Ember's Triton kernels only"),
]


def test_errors_are_one_clear_line() -> None:
    """Each bad command line exits 2 with its one-line message, no traceback. Two run at a time: each is a
    Python start, mostly import time."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: ember(*case[0]), CLEAR_ERRORS))
    wrong = [
        (args, result.returncode, result.stderr[-400:])
        for (args, message), result in zip(CLEAR_ERRORS, results, strict=True)
        if result.returncode != 2 or message not in result.stderr or "Traceback" in result.stderr
    ]
    assert not wrong, wrong


def test_bench_latency_with_predicted_outputs_compares_the_same_replies(tmp_path) -> None:
    report = tmp_path / "latency.json"
    args = ["--prediction", "--num-requests", "1", "--batch-sizes", "1", "--dtype", "float32", "--json", str(report)]
    result = ember("bench", "latency", *args)
    assert result.returncode == 0, result.stderr
    off, on = json.loads(report.read_text())["runs"]
    assert off["speculative"] is None and off["draft_tokens"] == 0
    assert on["speculative"] == "prediction" and on["acceptance_rate"] > 0.3
    assert on["output_tokens"] == off["output_tokens"]  # in float32, the same replies


def test_bench_lora_runs_the_same_requests_with_and_without_adapters(tiny_models: dict, tmp_path) -> None:
    workload = tmp_path / "workload.json"
    requests = [{"prompt_ids": [5 + i, 6, 7, 8], "max_new_tokens": 6 + i} for i in range(3)]
    workload.write_text(json.dumps({"requests": requests}))
    report = tmp_path / "lora.json"
    model = str(tiny_models["llama3"][0])
    args = ["--model", model, "--dtype", "float32", "--workload", str(workload), "--batch-sizes", "1,2"]
    result = ember("bench", "lora", *args, "--num-adapters", "2", "--lora-rank", "4", "--json", str(report))
    assert result.returncode == 0, result.stderr
    runs = json.loads(report.read_text())["runs"]
    assert [(r["batch"], r["adapters"]) for r in runs] == [(b, m) for b in (1, 2) for m in ("none", "one", "2 mixed")]
    assert {r["output_tokens"] for r in runs} == {6 + 7 + 8}
    assert "2 mixed" in result.stdout


def test_lora_modules_take_vllms_two_forms() -> None:
    from ember.cli import build_parser, engine_kwargs

    modules = ['{"name": "sql", "path": "/adapters/sql", "base_model_name": "x"}', "chat=/adapters/chat"]
    args = ["serve", "--lora-modules", *modules, "--max-lora-rank", "64", "--max-loras", "2"]
    kwargs = engine_kwargs(build_parser().parse_args(args))
    assert kwargs["lora_modules"] == {"sql": "/adapters/sql", "chat": "/adapters/chat"}
    assert (kwargs["max_lora_rank"], kwargs["max_loras"]) == (64, 2)


def test_vllms_speculative_config_configures_the_engine(tiny_models: dict) -> None:
    from ember.cli import build_parser, engine_kwargs
    from ember.engine.engine import LLM

    config = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'
    kwargs = engine_kwargs(build_parser().parse_args(["generate", "hi", "--speculative-config", config]))
    llm = LLM(str(tiny_models["qwen3"][0]), **{**kwargs, "num_blocks": 64, "dtype": "float32"})
    speculator = llm.engine.speculator
    assert speculator.config.num_speculative_tokens == 3
    assert (speculator.proposer.min_ngram, speculator.proposer.max_ngram) == (1, 3)
