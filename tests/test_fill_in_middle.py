"""OpenAI's `suffix` on /v1/completions: fill-in-the-middle prompts for code models with FIM tokens."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from ember.server.fill_in_middle import fim_token_ids
from ember.server.launch import ServerProcess, running_server
from tests.conftest import make_tiny_hf_model

FIM = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]


def test_suffix_lays_the_prompt_out_with_the_models_fim_tokens(tmp_path: Path) -> None:
    """A tiny Qwen2 with SmolLM2's tokenizer plus Qwen2.5-Coder's FIM tokens: the prompt the model sees is
    <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|>, each text tokenized on its own."""
    from transformers import AutoTokenizer

    from ember.models.loader import default_model_path, gguf_as_hf_dir

    smollm = AutoTokenizer.from_pretrained(str(gguf_as_hf_dir(default_model_path())))
    smollm.add_special_tokens({"additional_special_tokens": FIM})
    make_tiny_hf_model("qwen2", tmp_path, vocab_size=len(smollm))
    smollm.save_pretrained(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))  # as the server loads it (a Qwen2 tokenizer)
    assert fim_token_ids(tokenizer) == tuple(tokenizer.convert_tokens_to_ids(FIM))
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    expected = [
        tokenizer.convert_tokens_to_ids(FIM[0]),
        *tokenizer(prefix, add_special_tokens=False)["input_ids"],
        tokenizer.convert_tokens_to_ids(FIM[1]),
        *tokenizer(suffix, add_special_tokens=False)["input_ids"],
        tokenizer.convert_tokens_to_ids(FIM[2]),
    ]
    with running_server("--model", str(tmp_path), "--dtype", "float32") as server:
        body = {"prompt": prefix, "suffix": suffix, "max_tokens": 4, "temperature": 0, "return_token_ids": True}
        reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        choice = reply["choices"][0]
        assert choice["prompt_token_ids"] == expected and reply["usage"]["prompt_tokens"] == len(expected)
        assert len(choice["token_ids"]) == 4
        for field, value in (("echo", True), ("truncate_prompt_tokens", 8), ("prompt", [5, 6])):
            error = httpx.post(f"{server.url}/v1/completions", json={**body, field: value}, timeout=60).json()
            assert error["error"]["param"] == field, error


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
