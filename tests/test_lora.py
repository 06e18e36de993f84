"""LoRA adapters against PEFT, the reference implementation: PEFT writes the adapters and runs them on HF."""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from ember.engine.engine import LLM
from ember.engine.sampling_params import InvalidParameter, SamplingParams
from ember.models.lora import LoRABatch, LoRALinear, LoRAWeights, native_kernel
from tests.conftest import make_tiny_hf_model
from tests.test_tiny_parity import hf_reference, random_prompts

MAX_TOKENS = 12
# two adapters that differ in what they adapt, rank and scaling
ADAPTERS = {
    "attn": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    "all": LoraConfig(
        r=8,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
    ),
}


def save_adapter(base_dir: Path, config: LoraConfig, directory: Path, seed: int = 0) -> Path:
    """PEFT's own adapter directory for the model in `base_dir`, with random A and B."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(base, copy.deepcopy(config))  # PEFT writes the base model's path into its config
    model.save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_native_kernel_adds_each_rows_adapter_delta(dtype: torch.dtype, tolerance: float) -> None:
    """The CPU kernel against PyTorch: rows of two adapters (ranks 3 and 8), rows without one, and an adapter
    slot that leaves the linear alone. Each rank row of B^T counts only within its column span (its part of a
    fused linear), spans that straddle the kernel's column chunks included: what lies outside is never read."""
    kernel = native_kernel(dtype, torch.device("cpu"))
    if kernel is None:
        pytest.skip("no C compiler here")
    torch.manual_seed(0)
    rows, k, n = 7, 40, 300  # n spans several of the kernel's column chunks

    def weights(spans: list[tuple[int, int]]) -> LoRAWeights:
        rank = len(spans)
        return LoRAWeights(torch.randn(rank, k).to(dtype), torch.randn(rank, n).to(dtype), torch.tensor(spans))

    slots = [weights([(0, 200), (0, 200), (200, 300)]), None, weights([(0, 130)] * 4 + [(130, 300)] * 4)]
    row_slots = torch.tensor([0, -1, 2, 2, 1, 0, -1])
    linear = LoRALinear(torch.nn.Identity(), LoRABatch(), kernel)
    linear.set_slots(slots)
    x, y = torch.randn(rows, k).to(dtype), torch.randn(rows, n).to(dtype)
    expected = y.double().clone()
    for r, slot in enumerate(row_slots.tolist()):
        if slot >= 0 and (w := slots[slot]) is not None:
            in_span = torch.zeros(w.b_t.shape, dtype=torch.bool)
            for j, (start, end) in enumerate(w.columns.tolist()):
                in_span[j, start:end] = True
            expected[r] += (x[r].double() @ w.a.double().t()) @ (w.b_t.double() * in_span)
    kernel(x.data_ptr(), y.data_ptr(), *linear.table, row_slots.data_ptr(), rows, n, k)
    torch.testing.assert_close(y.double(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


@pytest.fixture(scope="module", params=["llama3", "qwen3"])  # QKV rotated in place; Qwen3's per-head q/k norms
def tiny_lora(request: pytest.FixtureRequest, tiny_models: dict, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(family, base model directory, adapter directories by name, PEFT's model holding them all)."""
    path, _ = tiny_models[request.param]
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    dirs = {name: save_adapter(path, config, root / name, seed=i) for i, (name, config) in enumerate(ADAPTERS.items())}
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32), str(dirs["attn"]), adapter_name="attn"
    )
    reference.load_adapter(str(dirs["all"]), adapter_name="all")
    return request.param, path, dirs, reference.eval()


def peft_reference(reference: PeftModel, adapter: str | None, prompt: list[int]) -> tuple[list[int], list[float]]:
    if adapter is None:
        with reference.disable_adapter():
            return hf_reference(reference, prompt, MAX_TOKENS)
    reference.set_adapter(adapter)
    return hf_reference(reference, prompt, MAX_TOKENS)


def greedy(**extra: Any) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=1, ignore_eos=True, **extra)


def assert_matches_peft(out: Any, reference: PeftModel, adapter: str | None, prompt: list[int], label: str) -> None:
    tokens, logprobs = peft_reference(reference, adapter, prompt)
    completion = out.outputs[0]
    assert completion.token_ids == tokens, f"{label}: adapter {adapter}, prompt of {len(prompt)} tokens diverged"
    assert [lp.logprob for lp in completion.logprobs] == pytest.approx(logprobs, abs=1e-4)


@pytest.mark.parametrize("batched_tokens", [2048, 16])  # 16: prompts prefilled in chunks beside others' decodes
def test_adapters_and_the_base_model_in_one_batch_match_peft(tiny_lora: Any, batched_tokens: int) -> None:
    family, path, dirs, reference = tiny_lora
    llm = LLM(
        str(path),
        num_blocks=256,
        block_size=8,
        max_num_batched_tokens=batched_tokens,
        dtype="float32",
        device="cpu",
        lora_modules={name: str(d) for name, d in dirs.items()},
    )
    prompts = random_prompts()
    adapters = [None, "attn", "all"]
    jobs = [(prompt, adapter) for prompt in prompts for adapter in adapters]
    outputs = llm.generate([p for p, _ in jobs], greedy(), lora=[a for _, a in jobs])
    for (prompt, adapter), out in zip(jobs, outputs, strict=True):
        assert_matches_peft(out, reference, adapter, prompt, family)
    by_adapter = {a: out.outputs[0].token_ids for (p, a), out in zip(jobs, outputs, strict=True) if p == prompts[-1]}
    assert len({tuple(tokens) for tokens in by_adapter.values()}) == 3, "the adapters should change the output"
    assert llm.engine.kv_cache.pool.num_free_blocks == 256


def test_an_adapter_of_phis_fused_projections_matches_peft(tiny_models: dict, tmp_path: Path) -> None:
    """Phi-3's checkpoints fuse q/k/v and gate/up themselves, and its adapters adapt those modules whole."""
    path, _ = tiny_models["phi3"]
    fused = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    adapter = save_adapter(path, LoraConfig(r=4, lora_alpha=8, target_modules=fused, init_lora_weights=False),
                           tmp_path / "phi")  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(adapter), adapter_name="phi").eval()
    llm = LLM(str(path), num_blocks=64, block_size=8, dtype="float32", lora_modules={"phi": str(adapter)})
    prompts = random_prompts()[1:3]
    for out, prompt in zip(llm.generate(prompts, greedy(), lora="phi"), prompts, strict=True):
        assert_matches_peft(out, reference, "phi", prompt, "phi3")
    assert (
        llm.generate(prompts[0], greedy())[0].outputs[0].token_ids
        != llm.generate(prompts[0], greedy(), lora="phi")[0].outputs[0].token_ids
    )


def test_prefix_cache_keeps_each_adapters_kv_apart(tiny_lora: Any) -> None:
    family, path, dirs, reference = tiny_lora
    llm = LLM(str(path), num_blocks=128, block_size=8, dtype="float32", device="cpu", enable_lora=True)
    llm.engine.load_lora("attn", str(dirs["attn"]))
    prompt = random_prompts()[2]  # 40 tokens: 4 full blocks may be reused
    base = llm.generate(prompt, greedy())[0]
    first = llm.generate(prompt, greedy(), lora="attn")[0]
    again = llm.generate(prompt, greedy(), lora="attn")[0]
    assert base.num_cached_tokens == 0 and first.num_cached_tokens == 0, "the base model's KV is not the adapter's"
    assert again.num_cached_tokens == 32
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert_matches_peft(first, reference, "attn", prompt, family)
    # a name loaded again may hold other weights: nothing cached under the old adapter is reused
    llm.engine.unload_lora("attn")
    llm.engine.load_lora("attn", str(dirs["all"]))
    reloaded = llm.generate(prompt, greedy(), lora="attn")[0]
    assert reloaded.num_cached_tokens == 0
    assert_matches_peft(reloaded, reference, "all", prompt, family)


def test_drafts_verified_with_an_adapter_keep_its_greedy_tokens(tiny_lora: Any) -> None:
    """A predicted output drafts (right for 6 tokens, then wrong): the adapter's model verifies, its tokens stay."""
    family, path, dirs, reference = tiny_lora
    llm = LLM(str(path), num_blocks=128, block_size=8, dtype="float32", device="cpu", enable_lora=True)
    llm.engine.load_lora("all", str(dirs["all"]))
    prompt = random_prompts()[1]
    tokens, _ = peft_reference(reference, "all", prompt)
    prediction = tokens[:6] + [(t + 1) % 256 for t in tokens[6:]]
    out = llm.generate(prompt, greedy(prediction=prediction), lora="all")[0]
    assert out.num_accepted_tokens >= 5 and out.num_draft_tokens > out.num_accepted_tokens  # the first is sampled
    assert_matches_peft(out, reference, "all", prompt, family)


def test_unloading_waits_for_the_requests_that_use_the_adapter(tiny_lora: Any) -> None:
    _, path, dirs, _ = tiny_lora
    llm = LLM(
        str(path), num_blocks=64, block_size=8, dtype="float32", device="cpu", lora_modules={"a": str(dirs["attn"])}
    )
    engine = llm.engine
    engine.add_request([5, 6, 7], greedy(), request_id="r", lora="a")
    with pytest.raises(ValueError, match="in use by 1 unfinished requests"):
        engine.unload_lora("a")
    while engine.has_unfinished_requests():
        engine.step()
    engine.unload_lora("a")
    assert engine.lora_names == []
    with pytest.raises(InvalidParameter, match="no LoRA adapter named 'a' is loaded"):
        engine.add_request([5, 6, 7], greedy(), lora="a")


def test_max_loras_bounds_the_adapters_running_at_once(tiny_lora: Any) -> None:
    """Requests of two adapters and of none, with max_loras 1: never both adapters in one step; the base
    model's request is not held back; every output is the one it gets without the limit."""
    _, path, dirs, _ = tiny_lora
    modules = {name: str(d) for name, d in dirs.items()}
    prompts = random_prompts()
    jobs = [(prompts[0], "attn"), (prompts[1], "all"), (prompts[2], "attn"), (prompts[3], None), (prompts[0], "all")]
    free = LLM(str(path), num_blocks=256, block_size=8, dtype="float32", device="cpu", lora_modules=modules)
    expected = free.generate([p for p, _ in jobs], greedy(), lora=[a for _, a in jobs])
    llm = LLM(str(path), num_blocks=256, block_size=8, dtype="float32", device="cpu", lora_modules=modules, max_loras=1)
    engine = llm.engine
    ids = [engine.add_request(p, greedy(), final_only=True, lora=a) for p, a in jobs]
    outputs, running = {}, []
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        outputs |= {out.request_id: out for out in engine.step()}
        running.append([r.lora_id for r in engine.scheduler.running])
    assert max(len(set(ids_) - {0}) for ids_ in running) == 1
    assert 0 in running[0] and len(running[0]) == 3  # the base request ran at once, beside the first adapter's two
    assert [outputs[i].outputs[0].token_ids for i in ids] == [e.outputs[0].token_ids for e in expected]


@pytest.fixture(scope="module")
def tiny_llama(tiny_models: dict) -> Path:
    return tiny_models["llama3"][0]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "does not serve adapters with use_dora"),
        (LoraConfig(r=4, target_modules=["lm_head"]), "cannot serve weight .*lm_head"),
        (LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "with modules_to_save"),
        (LoraConfig(r=32, target_modules=["q_proj"]), "rank 32, above --max-lora-rank 16"),
    ],
)
def test_adapters_ember_cannot_serve_are_refused_by_what_they_need(
    tiny_llama: Path, tmp_path: Path, config: LoraConfig, message: str
) -> None:
    adapter = save_adapter(tiny_llama, config, tmp_path / "adapter")
    llm = LLM(
        str(tiny_llama), num_blocks=16, block_size=8, dtype="float32", device="cpu", enable_lora=True, max_lora_rank=16
    )
    with pytest.raises(ValueError, match=message):
        llm.engine.load_lora("x", str(adapter))
    assert llm.engine.lora_names == []


def test_an_adapter_of_another_model_or_no_adapter_is_a_clear_error(tiny_llama: Path, tmp_path: Path) -> None:
    make_tiny_hf_model("llama3", tmp_path / "wider", hidden_size=32)
    adapter = save_adapter(tmp_path / "wider", ADAPTERS["attn"], tmp_path / "adapter")
    with pytest.raises(ValueError, match="an adapter of another base model"):
        LLM(
            str(tiny_llama),
            num_blocks=16,
            block_size=8,
            dtype="float32",
            device="cpu",
            lora_modules={"x": str(adapter)},
        )
    with pytest.raises(ValueError, match=r"must hold adapter_config\.json and adapter_model\.safetensors"):
        LLM(str(tiny_llama), num_blocks=16, block_size=8, dtype="float32", lora_modules={"x": str(tmp_path)})
    plain = LLM(str(tiny_llama), num_blocks=16, block_size=8, dtype="float32", device="cpu")
    with pytest.raises(InvalidParameter, match="LoRA is off"):
        plain.generate([5, 6], greedy(), lora="x")
    with pytest.raises(ValueError, match="started with LoRA enabled"):
        plain.engine.load_lora("x", str(adapter))


# ---------------------------------------------------------------------------------------------------------------
# The server: adapters as models of their own, loaded at start-up or at run time


@pytest.fixture(scope="module")
def smollm_lora(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, PeftModel, Any]]:
    """A PEFT adapter of SmolLM2 (random, strong enough to change its greedy text), PEFT's model running it, and
    the tokenizer."""
    from ember.models.loader import default_model_path, gguf_as_hf_dir, with_dense_weights

    hf_dir = with_dense_weights(gguf_as_hf_dir(default_model_path()))
    directory = tmp_path_factory.mktemp("smollm-lora") / "adapter"
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "up_proj"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32), config)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero (no change); a trained adapter's is not
            torch.nn.init.normal_(parameter, std=0.02)
    model.save_pretrained(str(directory))
    from transformers import AutoTokenizer

    yield directory, model.eval(), AutoTokenizer.from_pretrained(str(hf_dir))


@pytest.fixture(scope="module")
def lora_server(smollm_lora: tuple[Path, PeftModel, Any]) -> Iterator[Any]:
    from ember.server.launch import running_server

    directory = smollm_lora[0]
    flags = ("--dtype", "float32", "--max-num-batched-tokens", "512", "--allow-runtime-lora-updating")
    with running_server(*flags, "--lora-modules", f"smol-lora={directory}") as server:
        yield server


PROMPT = "Write a haiku about the sea."


def hf_text(smollm_lora: tuple[Path, PeftModel, Any], adapter: bool, prompt_ids: list[int]) -> str:
    """PEFT's greedy text (adapter on or off) for `prompt_ids`, MAX_TOKENS tokens."""
    from tests.parity import hf_greedy

    _, model, tokenizer = smollm_lora
    base = model.get_base_model()  # PEFT's LoRA layers sit inside it
    if adapter:
        [(tokens, _)] = hf_greedy(base, [prompt_ids], MAX_TOKENS)
    else:
        with model.disable_adapter():
            [(tokens, _)] = hf_greedy(base, [prompt_ids], MAX_TOKENS)
    return tokenizer.decode(tokens)


def test_the_server_serves_an_adapter_as_a_model_of_its_own(lora_server: Any, smollm_lora: Any) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{lora_server.url}/v1", api_key="none", max_retries=0)
    cards = {card.id: card for card in client.models.list().data}
    base_name = next(name for name in cards if name != "smol-lora")
    assert set(cards) == {base_name, "smol-lora"}
    assert cards["smol-lora"].model_extra["parent"] == base_name
    assert cards["smol-lora"].model_extra["root"] == str(smollm_lora[0])
    prompt_ids = smollm_lora[2](PROMPT)["input_ids"]
    texts = {}
    for model in (base_name, "smol-lora"):
        reply = client.completions.create(
            model=model, prompt=prompt_ids, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
        )
        assert reply.model == model
        texts[model] = reply.choices[0].text
        assert texts[model] == hf_text(smollm_lora, model == "smol-lora", prompt_ids), model
    assert texts[base_name] != texts["smol-lora"]
    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model="smol-lora", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="smol-lora", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
    )
    assert {chunk.model for chunk in chunks} == {"smol-lora"} and whole.model == "smol-lora"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    with pytest.raises(openai.NotFoundError, match=r"serves .* and the LoRA adapters 'smol-lora'"):
        client.completions.create(model="smol-lora-typo", prompt="Hi", max_tokens=1)


def lora_info(server: Any) -> dict[str, str]:
    """The labels of the one ember:lora_requests_info series on /metrics."""
    import httpx

    lines = [line for line in httpx.get(f"{server.url}/metrics").text.splitlines() if line.startswith("ember:lora_")]
    [line] = lines
    return dict(re.findall(r'(\w+)="([^"]*)"', line))


def test_metrics_name_the_adapters_in_use(lora_server: Any) -> None:
    """vLLM's lora_requests_info: while a request of the adapter streams, the adapter is among the running."""
    import openai

    client = openai.OpenAI(base_url=f"{lora_server.url}/v1", api_key="none", max_retries=0)
    stream = client.completions.create(
        model="smol-lora", prompt=PROMPT, max_tokens=200, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    busy = lora_info(lora_server)
    stream.close()
    assert busy["running_lora_adapters"] == "smol-lora" and busy["waiting_lora_adapters"] == ""
    assert int(busy["max_lora"]) >= 1
    for _ in range(100):  # the server notices the closed stream and aborts the request
        if lora_info(lora_server)["running_lora_adapters"] == "":
            break
        time.sleep(0.1)
    assert lora_info(lora_server)["running_lora_adapters"] == ""


def test_adapters_load_and_unload_at_run_time(lora_server: Any, smollm_lora: Any) -> None:
    import httpx
    import openai

    client = openai.OpenAI(base_url=f"{lora_server.url}/v1", api_key="none", max_retries=0)
    prompt_ids = smollm_lora[2](PROMPT)["input_ids"]
    expected = hf_text(smollm_lora, True, prompt_ids)

    def complete(model: str) -> str:
        reply = client.completions.create(
            model=model, prompt=prompt_ids, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
        )
        return reply.choices[0].text

    load = httpx.post(
        f"{lora_server.url}/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": str(smollm_lora[0])}
    )
    assert load.status_code == 200, load.text
    assert complete("again") == expected
    bad = httpx.post(f"{lora_server.url}/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/nonexistent"})
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
    taken = httpx.post(
        f"{lora_server.url}/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": str(smollm_lora[0])}
    )
    assert taken.status_code == 400 and "already loaded" in taken.json()["error"]["message"]
    unload = httpx.post(f"{lora_server.url}/v1/unload_lora_adapter", json={"lora_name": "again"})
    assert unload.status_code == 200, unload.text
    with pytest.raises(openai.NotFoundError):
        complete("again")
    assert {card.id for card in client.models.list().data} >= {"smol-lora"}
    assert complete("smol-lora") == expected


def test_run_time_loading_is_off_unless_the_server_allows_it(server: Any, smollm_lora: Any) -> None:
    import httpx

    reply = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(smollm_lora[0])})
    assert reply.status_code == 403 and "--allow-runtime-lora-updating" in reply.json()["error"]["message"]
