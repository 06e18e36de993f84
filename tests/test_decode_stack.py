"""The whole decode step of few rows in one C call: bit-identical to the PyTorch model, used where it can run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from gguf import GGMLQuantizationType

from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams
from ember.models import quantized
from ember.models.decode_stack import NativeDecodeStack
from tests.test_gguf_loader import KERNEL_DTYPES as DTYPES
from tests.test_gguf_loader import Q4_K_M, hf_llama, hf_qwen3, write_gguf  # noqa: F401 (fixtures)


class CountingStack:
    """Stands in for the runner's stack: records each step's row count, then runs it."""

    def __init__(self, stack: NativeDecodeStack) -> None:
        self.stack, self.max_rows, self.rows = stack, stack.max_rows, []

    def __call__(self, token_ids: torch.Tensor, *args: Any) -> torch.Tensor:
        self.rows.append(len(token_ids))
        return self.stack(token_ids, *args)


def generate_both_ways(
    llm: LLM, prompts: list, max_tokens: list[int], temperature: float = 0.0, lora: list[str | None] | None = None
) -> tuple[list, list, list[int]]:
    """(outputs with the stack, outputs of the PyTorch model, row counts of the stack's steps)."""
    runner = llm.engine.runner
    assert runner.decode_stack is not None
    counting = CountingStack(runner.decode_stack)
    params = [
        SamplingParams(max_tokens=m, temperature=temperature, seed=i, logprobs=5, ignore_eos=True)
        for i, m in enumerate(max_tokens)
    ]
    runner.decode_stack = counting
    try:
        with_stack = llm.generate(prompts, params, lora=lora)
        runner.decode_stack = None
        llm.engine.reset_prefix_cache()
        plain = llm.generate(prompts, params, lora=lora)
    finally:
        runner.decode_stack = counting.stack
    return with_stack, plain, counting.rows


def widest_stack_step(llm: LLM, prompts: list[list[int]]) -> int:
    """The most rows a step of these prompts hands the stack: all their prompt tokens where prefill runs as rows
    (bf16's attention) and they fit its rows (64 with AMX), else one decode row per request."""
    runner, tokens = llm.engine.runner, sum(len(p) for p in prompts)
    assert runner.decode_stack is not None
    return tokens if runner.native_prefill and tokens <= runner.decode_stack.max_rows else len(prompts)


def assert_identical(with_stack: list, plain: list) -> None:
    for a, b in zip(with_stack, plain, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for mine, theirs in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert (mine.logprob, mine.top) == (theirs.logprob, theirs.top)  # exactly: the same kernels, in order


@pytest.mark.parametrize("dtype", DTYPES)
def test_smollm_steps_of_one_to_max_rows_are_bit_identical(dtype: str) -> None:
    """Requests ending one after another, three more than the stack's rows (8; with AMX's kernel, which takes each
    linear's steps past its few-row kernels', 64; AVX512-BF16's does so only without the dequantized copy, which
    SmolLM2 keeps): larger steps run the PyTorch model, every smaller one the stack."""
    llm = LLM(dtype=dtype, num_blocks=1024)
    max_rows = llm.engine.runner.decode_stack.max_rows
    assert max_rows == (64 if dtype == "bfloat16" and quantized.many_row_kernel() == "amx" else 8)
    prompts = [f"Story number {i}: once upon a time" for i in range(max_rows + 3)]
    with_stack, plain, rows = generate_both_ways(llm, prompts, [3 + i for i in range(len(prompts))])
    assert_identical(with_stack, plain)
    assert set(rows) == set(range(1, max_rows + 1))
    assert llm.engine.kv_cache.usage() == 0


@pytest.mark.usefixtures("many_row_kernel")
def test_without_the_copy_each_many_row_kernel_takes_steps_of_64_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolLM2 in its blocks only: AMX's or AVX512-BF16's kernel runs each linear's steps past the few-row kernels,
    so the stack takes up to 64 rows, bit-identical to the PyTorch model on the same kernels; its embedding rows
    dequantized from the tied table's blocks, in C and in the model alike."""
    monkeypatch.setenv("EMBER_KEEP_DEQUANTIZED_WEIGHTS", "0")
    llm = LLM(dtype="bfloat16", num_blocks=1024)
    assert isinstance(llm.engine.loaded.model.embed_tokens, quantized.QuantizedEmbedding)
    assert llm.engine.runner.decode_stack.max_rows == 64
    prompts = [f"Story number {i}: once upon a time" for i in range(67)]
    with_stack, plain, rows = generate_both_ways(llm, prompts, [3 + i for i in range(len(prompts))])
    assert_identical(with_stack, plain)
    assert set(rows) == set(range(1, 65))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("arch", "qtype"),
    [
        ("llama", "Q4_0"),
        ("llama", "Q8_0"),
        ("llama", "Q4_K"),
        ("llama", "Q4_K_M"),
        ("qwen3", "Q8_0"),
        ("qwen3", "Q6_K"),
    ],
)
def test_tiny_gguf_models_are_bit_identical(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    arch: str,
    qtype: str,
    dtype: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Llama's layers, and Qwen3's, whose q and k heads are RMS-normalized before they rotate."""
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))  # the conversion of a throwaway file
    path = tmp_path / f"tiny-{qtype}.gguf"
    types = Q4_K_M if qtype == "Q4_K_M" else (GGMLQuantizationType[qtype], None)
    write_gguf(path, request.getfixturevalue(f"hf_{arch}"), types[0], overrides=types[1], arch=arch)
    llm = LLM(str(path), num_blocks=64, dtype=dtype)
    assert llm.engine.model_config.qk_norm == (arch == "qwen3")
    prompts = [[5, 17, 33, 200, 91, 7, 64], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [100, 101]]
    with_stack, plain, rows = generate_both_ways(llm, prompts, [20, 12, 16])
    assert_identical(with_stack, plain)
    assert rows and max(rows) == widest_stack_step(llm, prompts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_layers_are_bit_identical(
    tmp_path: Path, family: str, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma's layers in the one-call step: embeddings scaled by a rounded sqrt(hidden), four norms a layer
    scaling by 1 + weight, GELU, local layers within their window (Gemma 3's at a rotary base of their own, q/k
    normalized), Gemma 2's soft-capped scores; over prompts longer than the window."""
    from tests.test_gguf_loader import write_gemma2_gguf, write_gemma3_gguf

    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    write = write_gemma3_gguf if family == "gemma3" else write_gemma2_gguf
    path, _ = write(tmp_path, GGMLQuantizationType.Q8_0)
    llm = LLM(str(path), num_blocks=64, dtype=dtype)
    prompts = [[5, 17, 33, 200, 91, 7, 64] * 3, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [100, 101]]
    with_stack, plain, rows = generate_both_ways(llm, prompts, [20, 12, 16])
    assert_identical(with_stack, plain)
    assert rows and max(rows) == widest_stack_step(llm, prompts)


@pytest.fixture
def llama_q8_gguf(tmp_path: Path, hf_llama: Any, monkeypatch: pytest.MonkeyPatch) -> Path:  # noqa: F811
    """The tiny Llama as a Q8_0 GGUF, converted into a throwaway cache."""
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny-Q8_0.gguf"
    write_gguf(path, hf_llama, GGMLQuantizationType.Q8_0)
    return path


@pytest.mark.parametrize("dtype", DTYPES)
def test_sliding_window_layers_are_bit_identical(llama_q8_gguf: Path, dtype: str) -> None:
    """Layers with their own sliding windows (one of 5 tokens, one whole): each layer's window reaches its
    attention in the stack as in the PyTorch model, and changes the tokens."""
    llm = LLM(str(llama_q8_gguf), num_blocks=64, dtype=dtype)
    prompts = [[5, 17, 33, 200, 91, 7, 64], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]
    whole = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    runner = llm.engine.runner
    runner.model.layers[0].self_attn.window = 5
    runner.decode_stack = NativeDecodeStack.build(runner.model, runner.kv_caches, 64, runner.block_size)
    llm.engine.reset_prefix_cache()
    with_stack, plain, rows = generate_both_ways(llm, prompts, [20, 20])
    assert_identical(with_stack, plain)
    assert rows and [o.outputs[0].token_ids for o in with_stack] != [o.outputs[0].token_ids for o in whole]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_of_lora_adapters_are_bit_identical(
    tmp_path: Path,
    hf_llama: Any,  # noqa: F811
    dtype: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two adapters and the base model in the same steps: each linear adds its rows' deltas in the stack too."""
    from tests.test_lora import ADAPTERS, save_adapter

    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    hf_llama.save_pretrained(str(tmp_path / "hf"))
    adapters = {name: str(save_adapter(tmp_path / "hf", config, tmp_path / name)) for name, config in ADAPTERS.items()}
    path = tmp_path / "tiny-Q8_0.gguf"
    write_gguf(path, hf_llama, GGMLQuantizationType.Q8_0)
    llm = LLM(str(path), num_blocks=64, dtype=dtype, lora_modules=adapters)
    prompts = [[5, 17, 33, 200, 91, 7, 64], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [100, 101], [5, 17, 33, 200, 91, 7, 64]]
    lora = ["attn", "all", None, None]
    with_stack, plain, rows = generate_both_ways(llm, prompts, [20, 12, 16, 20], lora=lora)
    assert_identical(with_stack, plain)
    assert rows and max(rows) == widest_stack_step(llm, prompts)
    assert with_stack[0].outputs[0].token_ids != with_stack[3].outputs[0].token_ids  # the adapter changed it


@pytest.mark.parametrize("dtype", DTYPES)
def test_speculative_verification_rows_are_bit_identical(dtype: str) -> None:
    """Drafts being verified: several rows of one request, which read each other's new K/V."""
    llm = LLM(dtype=dtype, num_blocks=256, speculative="ngram")
    prompts = ["a b c d e a b c d e a b c d e a b c", "1 2 3 1 2 3 1 2 3 1 2 3"]
    with_stack, plain, rows = generate_both_ways(llm, prompts, [40, 30], temperature=0.8)
    assert_identical(with_stack, plain)
    assert max(rows) > len(prompts)  # some step verified drafts
    assert llm.engine.speculator is not None and llm.engine.speculator.stats.num_accepted_tokens > 0


@pytest.mark.skipif(not quantized.kernels_available(torch.bfloat16), reason="needs AVX512-BF16")
def test_small_prefill_chunks_run_as_rows_in_bf16() -> None:
    """On the bf16 kernel a prefill chunk attends as rows: a short prompt's whole prefill is one stack call."""
    llm = LLM(dtype="bfloat16", num_blocks=64)
    assert llm.engine.runner.native_prefill
    prompt = llm.tokenizer("Hi there!")["input_ids"]
    with_stack, plain, rows = generate_both_ways(llm, [prompt], [8])
    assert_identical(with_stack, plain)
    assert rows[0] == len(prompt) > 1


def test_no_stack_without_blocks(tiny_models: dict) -> None:
    """An HF-directory model has no GGUF blocks for the C layer's linears."""
    assert LLM(str(tiny_models["llama3"][0]), num_blocks=16).engine.runner.decode_stack is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_granite_layers_are_bit_identical(tmp_path: Path, dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Granite's multipliers: embeddings scaled, each sublayer's output scaled as it joins the residual stream,
    its own attention scale (the logits' scale is applied outside the stack)."""
    from tests.test_gguf_loader import GRANITE_SCALES, write_granite_gguf

    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "granite-q8.gguf"
    write_granite_gguf(path, GGMLQuantizationType.Q8_0)
    llm = LLM(str(path), num_blocks=64, dtype=dtype)
    assert llm.engine.model_config.residual_multiplier == pytest.approx(GRANITE_SCALES["residual_multiplier"])
    prompts = [[5, 17, 33, 200, 91, 7, 64] * 3, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [100, 101]]
    with_stack, plain, rows = generate_both_ways(llm, prompts, [20, 12, 16])
    assert_identical(with_stack, plain)
    assert rows and max(rows) == widest_stack_step(llm, prompts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_partial_rotary_layers_are_bit_identical(tmp_path: Path, dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Phi-3's layers (Phi-4-mini's shape): fused projections, half of each head rotating by LongRoPE's tables."""
    from tests.test_gguf_loader import longrope_phi3, write_phi3_gguf

    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "phi3-q8.gguf"
    write_phi3_gguf(path, longrope_phi3(tmp_path / "hf"), GGMLQuantizationType.Q8_0)
    llm = LLM(str(path), num_blocks=64, dtype=dtype)
    assert llm.engine.model_config.rotary_dim == llm.engine.model_config.head_dim // 2
    prompts = [[5, 17, 33, 200, 91, 7, 64] * 3, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [100, 101]]
    with_stack, plain, rows = generate_both_ways(llm, prompts, [20, 12, 16])
    assert_identical(with_stack, plain)
    assert rows and max(rows) == widest_stack_step(llm, prompts)
