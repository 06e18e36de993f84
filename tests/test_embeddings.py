"""Embeddings (`LLM.embed`, `/v1/embeddings`) against HF transformers' final hidden states."""

from __future__ import annotations

import base64
import struct
from typing import Any

import httpx
import pytest
import torch

from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams
from tests.test_tiny_parity import random_prompts


def hf_embedding(model: Any, prompt: list[int], pooling: str) -> torch.Tensor:
    """The reference: HF's final hidden states (after the last norm), pooled and L2-normalized."""
    with torch.inference_mode():
        hidden = model.model(torch.tensor([prompt])).last_hidden_state[0].float()
    return torch.nn.functional.normalize(hidden[-1] if pooling == "last" else hidden.mean(0), dim=-1)


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
@pytest.mark.parametrize("batched_tokens", [2048, 16])  # 16: a mean summed over many chunks
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embeddings_match_hf(tiny_models: dict, family: str, batched_tokens: int, pooling: str) -> None:
    path, hf_model = tiny_models[family]
    llm = LLM(
        str(path), num_blocks=128, block_size=8, max_num_batched_tokens=batched_tokens, dtype="float32", device="cpu"
    )
    prompts = random_prompts()
    for prompt, embedding in zip(prompts, llm.embed(prompts, pooling=pooling), strict=True):
        torch.testing.assert_close(torch.tensor(embedding), hf_embedding(hf_model, prompt, pooling), rtol=0, atol=1e-5)
    assert llm.engine.kv_cache.pool.num_free_blocks == 128


def test_embedding_requests_share_steps_with_generation(tiny_models: dict) -> None:
    """Embedding requests sample nothing and end after their prompt; the generations beside them are unchanged."""
    path, hf_model = tiny_models["llama3"]
    llm = LLM(str(path), num_blocks=128, block_size=8, max_num_batched_tokens=32, dtype="float32", device="cpu")
    prompts = random_prompts()
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    alone = [out.outputs[0].token_ids for out in llm.generate(prompts, params)]
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, request_id=f"gen-{i}", final_only=True)
        engine.add_request(prompt[::-1], request_id=f"emb-{i}", final_only=True, pooling="mean")
    outputs: dict[str, Any] = {}
    for _ in range(200):  # bounded: 4 generations of 10 tokens need far fewer steps
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
    for i, prompt in enumerate(prompts):
        assert outputs[f"gen-{i}"].outputs[0].token_ids == alone[i]
        embedded = outputs[f"emb-{i}"]
        assert embedded.outputs[0].token_ids == [] and embedded.outputs[0].finish_reason == "stop"
        reference = hf_embedding(hf_model, prompt[::-1], "mean")
        torch.testing.assert_close(torch.tensor(embedded.embedding), reference, rtol=0, atol=1e-5)
    assert engine.kv_cache.pool.num_free_blocks == 128


def test_last_token_pooling_reuses_the_prefix_cache_and_a_mean_does_not(tiny_models: dict) -> None:
    path, hf_model = tiny_models["qwen3"]
    llm = LLM(str(path), num_blocks=64, block_size=8, dtype="float32", device="cpu")
    prompt = random_prompts()[2]  # 40 tokens
    engine = llm.engine
    for pooling, cached in (("last", 32), ("mean", 0)):
        llm.generate(prompt, SamplingParams(max_tokens=1))  # caches the prompt's blocks
        request_id = engine.add_request(prompt, pooling=pooling)
        request = engine.groups[request_id].children[0]
        (embedding,) = llm._run_to_end([request_id], False)
        assert request.num_cached_tokens == cached, pooling
        reference = hf_embedding(hf_model, prompt, pooling)
        torch.testing.assert_close(torch.tensor(embedding.embedding), reference, rtol=0, atol=1e-5)


def test_a_mean_pooled_request_preempted_mid_prompt_sums_each_position_once(tiny_models: dict) -> None:
    """A tiny cache: the older generation's growth preempts the embedding request, which starts over later."""
    path, hf_model = tiny_models["llama3"]
    llm = LLM(str(path), num_blocks=7, block_size=8, max_num_batched_tokens=8, dtype="float32", device="cpu")
    engine = llm.engine
    prompts = random_prompts()
    engine.add_request(prompts[1][:20], SamplingParams(max_tokens=30, ignore_eos=True), request_id="grow")
    engine.add_request(prompts[2], request_id="embed", final_only=True, pooling="mean")
    request = engine.groups["embed"].children[0]
    outputs = {}
    for _ in range(300):
        if not engine.has_unfinished_requests():
            break
        outputs |= {out.request_id: out for out in engine.step() if out.finished}
    assert request.num_preemptions > 0
    reference = hf_embedding(hf_model, prompts[2], "mean")
    torch.testing.assert_close(torch.tensor(outputs["embed"].embedding), reference, rtol=0, atol=1e-5)


def test_bad_pooling_is_refused(tiny_models: dict) -> None:
    llm = LLM(str(tiny_models["llama3"][0]), num_blocks=16, block_size=8, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="pooling must be one of last, mean"):
        llm.embed([[5, 6, 7]], pooling="cls")


def test_the_server_serves_embeddings_to_the_openai_client(server: Any, hf_smollm: Any) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    texts = ["Hello world", "The capital of France is Paris."]
    reply = client.embeddings.create(model=client.models.list().data[0].id, input=texts)  # base64 on the wire
    assert [d.index for d in reply.data] == [0, 1]
    tokenizer = server_tokenizer(server)
    for text, item in zip(texts, reply.data, strict=True):
        reference = hf_embedding(hf_smollm, tokenizer(text)["input_ids"], "last")
        torch.testing.assert_close(torch.tensor(item.embedding), reference, rtol=0, atol=1e-4)
    assert reply.usage.prompt_tokens == sum(len(tokenizer(t)["input_ids"]) for t in texts)
    short = client.embeddings.create(model=reply.model, input="Hello world", dimensions=64)
    vector = torch.tensor(short.data[0].embedding)
    assert vector.shape == (64,) and abs(vector.norm().item() - 1) < 1e-5
    full = torch.tensor(reply.data[0].embedding)
    torch.testing.assert_close(vector, torch.nn.functional.normalize(full[:64], dim=0), rtol=0, atol=1e-6)


def server_tokenizer(server: Any) -> Any:
    from transformers import AutoTokenizer

    from ember.models.loader import default_model_path, gguf_as_hf_dir

    return AutoTokenizer.from_pretrained(str(gguf_as_hf_dir(default_model_path())))


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"input": []}, 400, "'input' is empty"),
        ({"input": ""}, 400, "'input' is empty"),
        ({"input": "hi", "dimensions": 100000}, 400, "'dimensions' must be at most 576"),
        ({"input": "hi", "model": "nope"}, 404, "the model 'nope' does not exist"),
        ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
    ],
)
def test_bad_embedding_requests_get_openai_errors(server: Any, body: dict, status: int, message: str) -> None:
    reply = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=30)
    assert reply.status_code == status and message in reply.json()["error"]["message"]


def test_float_and_base64_encodings_carry_the_same_vector(server: Any) -> None:
    as_float = httpx.post(f"{server.url}/v1/embeddings", json={"input": [1, 2, 3]}, timeout=30).json()
    as_base64 = httpx.post(
        f"{server.url}/v1/embeddings", json={"input": [1, 2, 3], "encoding_format": "base64"}, timeout=30
    ).json()
    raw = base64.b64decode(as_base64["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert list(decoded) == pytest.approx(as_float["data"][0]["embedding"], abs=1e-7)


def test_score_and_rerank_are_the_cosine_of_the_embeddings(server: Any) -> None:
    """vLLM's /score (one text against many, two lists item by item) and the Jina/Cohere /rerank: each score is
    the dot product of the two texts' /v1/embeddings vectors; rerank orders the documents by it."""
    query, documents = "Where is Paris?", ["Paris is in France.", "Bananas are yellow.", "Rome is in Italy."]
    vectors = httpx.post(f"{server.url}/v1/embeddings", json={"input": [query, *documents]}, timeout=60).json()
    query_vector, *document_vectors = [torch.tensor(d["embedding"]) for d in vectors["data"]]
    expected = [float(query_vector @ v) for v in document_vectors]

    one_to_many = httpx.post(f"{server.url}/v1/score", json={"text_1": query, "text_2": documents}, timeout=60).json()
    assert [d["index"] for d in one_to_many["data"]] == [0, 1, 2] and one_to_many["object"] == "list"
    assert [d["score"] for d in one_to_many["data"]] == pytest.approx(expected, abs=1e-5)
    assert one_to_many["usage"]["prompt_tokens"] == vectors["usage"]["prompt_tokens"]
    zipped = httpx.post(f"{server.url}/score", json={"text_1": documents[::-1], "text_2": documents}, timeout=60)
    pairs = [float(a @ b) for a, b in zip(document_vectors[::-1], document_vectors, strict=True)]
    assert [d["score"] for d in zipped.json()["data"]] == pytest.approx(pairs, abs=1e-5)

    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        body = {"query": query, "documents": documents, "top_n": 2}
        reranked = httpx.post(f"{server.url}{path}", json=body, timeout=60).json()
        order = sorted(range(3), key=lambda i: -expected[i])[:2]
        assert [r["index"] for r in reranked["results"]] == order, reranked
        assert [r["document"]["text"] for r in reranked["results"]] == [documents[i] for i in order]
        assert [r["relevance_score"] for r in reranked["results"]] == pytest.approx([expected[i] for i in order])
        assert reranked["usage"]["total_tokens"] == vectors["usage"]["prompt_tokens"]
    as_objects = [{"text": d} for d in documents]  # Jina's and Cohere's document objects are taken too
    everything = httpx.post(f"{server.url}/rerank", json={"query": query, "documents": as_objects}, timeout=60).json()
    assert sorted(r["index"] for r in everything["results"]) == [0, 1, 2]  # top_n 0 (the default): all
    assert {r["document"]["text"] for r in everything["results"]} == set(documents)


@pytest.mark.parametrize(
    ("path", "body", "param", "message"),
    [
        ("/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_2", "text_1 has 2 texts and text_2 3"),
        ("/score", {"text_1": [], "text_2": "c"}, "text_1", "'text_1' is empty"),
        ("/score", {"text_1": "a", "text_2": "c", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", ""),
        ("/rerank", {"query": "a", "documents": []}, "documents", "'documents' is empty"),
        ("/rerank", {"query": "", "documents": ["b"]}, "query", "'query' is empty"),
        ("/rerank", {"query": "a", "documents": ["b"], "top_n": -1}, "top_n", ""),
    ],
)
def test_bad_score_and_rerank_requests_name_their_field(
    server: Any, path: str, body: dict, param: str, message: str
) -> None:
    reply = httpx.post(f"{server.url}{path}", json=body, timeout=30)
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == param and message in error["message"], error


def test_auto_pooling_follows_the_sentence_transformers_config(tmp_path: Any) -> None:
    import json

    from ember.server.serve import resolve_pooling

    assert resolve_pooling("auto", None) == "last" and resolve_pooling("mean", None) == "mean"
    assert resolve_pooling("auto", tmp_path) == "last"  # no modules.json
    (tmp_path / "modules.json").write_text(json.dumps([{"idx": 1, "path": "1_Pooling", "type": "x.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    for mode, expected in (("pooling_mode_lasttoken", "last"), ("pooling_mode_mean_tokens", "mean")):
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": False, mode: True}))
        assert resolve_pooling("auto", tmp_path) == expected
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    with pytest.raises(ValueError, match=r"pooling \(pooling_mode_cls_token\) is not served"):
        resolve_pooling("auto", tmp_path)
