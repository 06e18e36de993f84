"""The GGUF loader: llama.cpp's q/k permutation undone, and every common tensor type dequantized."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, RopeScalingType
from gguf.quants import dequantize, quantize

from ember.config import cache_dir
from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams
from ember.models import loader, quantized
from ember.models.loader import (
    BLOCKS_FILE,
    GGUF_CACHE_VERSION,
    ModelNotFoundError,
    _file_digest,
    gguf_as_hf_dir,
    gguf_hf_config,
    load_model,
    wanted_tensors,
    with_dense_weights,
)
from ember.models.packed_linear import PackedLinear
from ember.models.quantized import QuantizedEmbedding, QuantizedLinear
from tests.test_tiny_parity import hf_reference

CONFIG = {
    "vocab_size": 256,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",  # Qwen3's
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}
# types gguf-py cannot quantize to: (weights, bytes) per block, offsets of its fp16 scales, and a scale that gives
# weights of about HF's initializer range (as large ones would make every logprob's top token certain)
RANDOM_BLOCKS = {
    GGMLQuantizationType.Q4_K: (256, 144, (0, 2), 5e-4),  # d, dmin
    GGMLQuantizationType.Q5_K: (256, 176, (0, 2), 2.5e-4),
    GGMLQuantizationType.Q6_K: (256, 210, (208,), 1e-4),  # d
    GGMLQuantizationType.Q3_K: (256, 110, (108,), 3e-3),
    GGMLQuantizationType.IQ4_XS: (256, 136, (0,), 1e-4),
    GGMLQuantizationType.IQ4_NL: (32, 18, (0,), 1.5e-3),
    GGMLQuantizationType.Q2_K: (256, 84, (80, 82), 1e-2),  # d, dmin
}
# llama.cpp's Q4_K_M as `write_gguf` takes it: Q4_K, with v, the MLP's down projection and the LM head in Q6_K
Q4_K_M = (
    GGMLQuantizationType.Q4_K,
    dict.fromkeys(("attn_v.weight", "ffn_down.weight", "output.weight"), GGMLQuantizationType.Q6_K),
)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def hf_llama() -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_qwen3() -> Any:
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(**{**CONFIG, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # q's and k's norms set apart (HF starts both at ones, which would hide a swap)
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.normal_(1.0, 0.3)
    return model


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """The permutation llama.cpp's converter applies to Llama q/k weights."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_blocks(shape: tuple[int, int], qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of a type in RANDOM_BLOCKS, under its scale."""
    per_block, nbytes, offsets, scale = RANDOM_BLOCKS[qtype]
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // per_block, nbytes), dtype=np.uint8)
    for offset in offsets:
        raw[..., offset : offset + 2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    return raw.reshape(shape[0], -1)


def write_gguf(
    path: Path,
    model: Any,
    qtype: GGMLQuantizationType,
    seed: int = 0,
    overrides: dict[str, GGMLQuantizationType] | None = None,
    rope_freqs: np.ndarray | None = None,
    arch: str = "llama",
    describe: Callable[[GGUFWriter], None] | None = None,
) -> dict[str, np.ndarray]:
    """Write `model` as llama.cpp would; return each HF weight as the file stores it, dequantized. `overrides`
    gives some tensors another type, by GGUF name less its `blk.N.` (as llama.cpp's mixed types, e.g. Q4_K_M,
    do); `rope_freqs`, llama.cpp's divisor of each rotary frequency (its form of Llama 3's rope scaling); `arch`:
    "llama" or "granite" (q/k permuted, as llama.cpp does) or "qwen3" (not); `describe` adds metadata."""
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(CONFIG["num_hidden_layers"])
    writer.add_context_length(CONFIG["max_position_embeddings"])
    writer.add_embedding_length(CONFIG["hidden_size"])
    writer.add_feed_forward_length(CONFIG["intermediate_size"])
    writer.add_head_count(CONFIG["num_attention_heads"])
    writer.add_head_count_kv(CONFIG["num_key_value_heads"])
    writer.add_rope_freq_base(CONFIG["rope_theta"])
    writer.add_layer_norm_rms_eps(CONFIG["rms_norm_eps"])
    writer.add_vocab_size(CONFIG["vocab_size"])
    stored: dict[str, np.ndarray] = {}
    if describe is not None:
        describe(writer)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for hf_name, tensor in model.state_dict().items():
        w = tensor.numpy().astype(np.float32)
        if hf_name == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            name = "output_norm.weight"
        elif hf_name == "lm_head.weight":
            name = "output.weight"
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            name = f"blk.{layer}.{HF_TO_GGUF[rest]}"
        if arch in ("llama", "granite") and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = CONFIG["num_attention_heads" if "attn_q" in name else "num_key_value_heads"]
            w = llama_cpp_permute(w, heads)
        tensor_type = next(
            (t for key, t in (overrides or {}).items() if name == key or name.endswith(f".{key}")), qtype
        )
        if w.ndim == 1 or tensor_type == GGMLQuantizationType.F32:
            data = w
            writer.add_tensor(name, data)
            stored[hf_name] = w
            continue
        data = random_blocks(w.shape, tensor_type, rng) if tensor_type in RANDOM_BLOCKS else quantize(w, tensor_type)
        writer.add_tensor(name, data, raw_dtype=tensor_type)
        stored[hf_name] = dequantize(data, tensor_type).reshape(w.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def test_f32_gguf_matches_hf(tmp_path: Path, hf_llama: Any) -> None:
    """Written with llama.cpp's q/k permutation, loaded back: greedy tokens equal HF's."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf_llama, GGMLQuantizationType.F32)
    llm = LLM(str(path), num_blocks=64, dtype="float32")
    assert llm.tokenizer is None  # this file carries no tokenizer
    prompt = [5, 17, 33, 200, 91, 7, 64]
    out = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    seq = list(prompt)
    with torch.inference_mode():
        for _ in range(12):
            seq.append(int(hf_llama(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out.outputs[0].token_ids == seq[len(prompt) :]


def test_llama3_rope_scaling_stored_as_llama_cpp_frequency_divisors_matches_hf(tmp_path: Path) -> None:
    """A Llama 3.1-3.3 GGUF carries its rope scaling as `rope_freqs`, a divisor per frequency, computed from the
    config as llama.cpp's converter does; Ember applies it and matches HF's model with that rope scaling."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    torch.manual_seed(1)
    hf_model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG, rope_scaling=scaling), dtype=torch.float32)
    dim = CONFIG["head_dim"]
    wavelengths = 2 * math.pi * CONFIG["rope_theta"] ** (np.arange(0, dim, 2) / dim)
    old, low, high = (
        scaling["original_max_position_embeddings"],
        scaling["low_freq_factor"],
        scaling["high_freq_factor"],
    )
    smooth = (old / wavelengths - low) / (high - low)
    divisors = np.where(
        wavelengths < old / high,
        1.0,
        np.where(wavelengths > old / low, scaling["factor"], 1 / ((1 - smooth) / scaling["factor"] + smooth)),
    )
    assert 1.0 in divisors and scaling["factor"] in divisors and len(set(divisors.tolist())) > 2  # all three kinds
    path = tmp_path / "llama3.gguf"
    write_gguf(path, hf_model.eval(), GGMLQuantizationType.F32, rope_freqs=divisors)
    llm = LLM(str(path), num_blocks=64, dtype="float32")
    prompt = [5, 17, 33, 200, 91, 7, 64] * 6
    out = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, logprobs=1, ignore_eos=True))[0]
    tokens, logprobs = hf_reference(hf_model, prompt, 8)
    assert out.outputs[0].token_ids == tokens
    assert [lp.logprob for lp in out.outputs[0].logprobs or []] == pytest.approx(logprobs, abs=1e-4)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
        ("linear", {"rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": 64}),
        ("none", None),
        ("longrope", "not supported"),
    ],
)
def test_rope_scaling_named_in_the_metadata(tmp_path: Path, kind: str, expected: Any) -> None:
    def scaling(writer: GGUFWriter) -> None:
        writer.add_rope_scaling_type(RopeScalingType(kind))
        writer.add_rope_scaling_factor(4.0)
        writer.add_rope_scaling_orig_ctx_len(64)

    if expected == "not supported":
        with pytest.raises(ModelNotFoundError, match="rope scaling 'longrope' is not supported"):
            metadata_config(tmp_path, scaling)
    else:
        assert metadata_config(tmp_path, scaling).get("rope_scaling") == expected


def test_end_of_turn_tokens_end_replies_too(tmp_path: Path) -> None:
    """As llama.cpp: a GGUF's end-of-turn and end-of-message tokens stop generation, besides its EOS."""

    def ends(writer: GGUFWriter) -> None:
        writer.add_eos_token_id(2)
        writer.add_eot_token_id(7)
        writer.add_eom_token_id(2)

    assert metadata_config(tmp_path, ends)["eos_token_id"] == [2, 7]


def test_a_mixture_of_experts_gguf_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="mixture-of-experts GGUF files \\(8 experts"):
        metadata_config(tmp_path, lambda writer: writer.add_expert_count(8))


def metadata_config(tmp_path: Path, describe: Callable[[GGUFWriter], None]) -> dict[str, Any]:
    """The config Ember reads from a one-layer GGUF header that `describe` adds metadata to."""
    path = tmp_path / "header.gguf"
    writer = GGUFWriter(str(path), "llama")
    for add, value in (("block_count", 1), ("embedding_length", 64), ("head_count", 4), ("vocab_size", 256)):
        getattr(writer, f"add_{add}")(value)
    describe(writer)
    writer.add_tensor("token_embd.weight", np.zeros((256, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf_hf_config(GGUFReader(str(path)))


@pytest.mark.parametrize(
    "qtype",
    ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS"],
)
def test_quantized_weights_dequantize_exactly(tmp_path: Path, hf_llama: Any, qtype: str) -> None:
    path = tmp_path / f"tiny-{qtype}.gguf"
    stored = write_gguf(path, hf_llama, GGMLQuantizationType[qtype])
    model = load_model(str(path), "auto", torch.float32, "cpu").model  # the engine packs (drops) plain weights
    q_rows = CONFIG["num_attention_heads"] * CONFIG["head_dim"]
    for layer in range(CONFIG["num_hidden_layers"]):
        q = stored[f"model.layers.{layer}.self_attn.q_proj.weight"]
        unpermuted = torch.from_numpy(llama_cpp_permute_inverse(q, CONFIG["num_attention_heads"]))
        assert torch.equal(model.layers[layer].self_attn.qkv_proj.weight[:q_rows], unpermuted)
        down = torch.from_numpy(stored[f"model.layers.{layer}.mlp.down_proj.weight"])
        assert torch.equal(model.layers[layer].mlp.down_proj.weight, down)
    assert torch.equal(model.embed_tokens.weight, torch.from_numpy(stored["model.embed_tokens.weight"]))
    llm = LLM(str(path), num_blocks=64, dtype="float32")
    out = llm.generate([1, 2, 3], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4


def llama_cpp_permute_inverse(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_corrupt_gguf_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelNotFoundError, match="cannot read GGUF file"):
        LLM(str(path))


KERNEL_DTYPES = [  # activation dtypes, each where its quantized kernel runs
    pytest.param(
        "float32",
        marks=pytest.mark.skipif(not quantized.kernels_available(torch.float32), reason="needs AVX2 or AVX-512"),
    ),
    pytest.param(
        "bfloat16",
        marks=pytest.mark.skipif(not quantized.kernels_available(torch.bfloat16), reason="needs AVX512-BF16"),
    ),
]


def block_kernels(llm: LLM) -> dict[str, str]:
    """The served model's linears that multiply from GGUF blocks, with their kernels: `QuantizedLinear`s (blocks
    only, where AMX runs) and packed linears that keep blocks for steps of few rows."""
    found = {}
    for name, module in llm.engine.runner.model.named_modules():
        if isinstance(module, QuantizedLinear):
            found[name] = module.blocks.kernels
        elif isinstance(module, PackedLinear) and module.small_steps is not None:
            found[name] = module.small_steps.weight.kernels
    return found


# bf16 logits of 8-16 are 0.0625 apart: q6 blocks at few rows (Q6_K, Q3_K) multiply by the exact weights, the plain
# model by their bf16 roundings (`quantized_linear.c`), which moves a logit by an ulp or two
LOGPROB_TOLERANCE = {"float32": 0.05, "bfloat16": 0.15}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize(
    "qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M", "Q3_K", "Q2_K", "IQ4_XS"]
)
def test_decode_steps_multiply_from_the_gguf_blocks(
    tmp_path: Path, hf_llama: Any, qtype: str, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every linear keeps the file's blocks for steps of few rows; the outputs are those of the plain weights
    (equal tokens up to a near-tie, where each run's token is in the other's top-5, and close logprobs)."""
    path = tmp_path / f"tiny-{qtype}.gguf"
    types = Q4_K_M if qtype == "Q4_K_M" else (GGMLQuantizationType[qtype], None)
    write_gguf(path, hf_llama, types[0], overrides=types[1])
    prompts = [[5, 17, 33, 200, 91, 7, 64], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [100, 101]]
    params = SamplingParams(max_tokens=16, temperature=0, logprobs=5, ignore_eos=True)
    llm = LLM(str(path), num_blocks=64, dtype=dtype)
    projections = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    layers = range(CONFIG["num_hidden_layers"])
    assert set(block_kernels(llm)) == {f"layers.{i}.{p}" for i in layers for p in projections} | {"lm_head"}
    from_blocks = llm.generate(prompts, params)  # prefill of 19 rows: on AMX, its kernel for many rows
    monkeypatch.setenv("EMBER_DISABLE_QUANTIZED_KERNELS", "1")
    plain = LLM(str(path), num_blocks=64, dtype=dtype)
    assert not block_kernels(plain)
    for a, b in zip(from_blocks, plain.generate(prompts, params), strict=True):
        for mine, theirs in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            if mine.token_id != theirs.token_id:
                assert mine.token_id in {t for t, _ in theirs.top} and theirs.token_id in {t for t, _ in mine.top}
                break
            assert abs(mine.logprob - theirs.logprob) < LOGPROB_TOLERANCE[dtype]


@pytest.mark.skipif(not quantized.kernels_available(torch.float32), reason="needs AVX2 or AVX-512")
def test_a_q4_k_m_file_keeps_every_linear_in_its_blocks(tmp_path: Path, hf_llama: Any) -> None:
    """Q4_K_M mixes formats: QKV is q and k in Q4_K and v in Q6_K (two kernels, each writing its columns); the
    down projection and the LM head are Q6_K."""
    path = tmp_path / "tiny-Q4_K_M.gguf"
    write_gguf(path, hf_llama, Q4_K_M[0], overrides=Q4_K_M[1])
    llm = LLM(str(path), num_blocks=64, dtype="float32")
    kernels = block_kernels(llm)
    expected = {
        "self_attn.qkv_proj": "q4+q6",
        "self_attn.o_proj": "q4",
        "mlp.gate_up_proj": "q4",
        "mlp.down_proj": "q6",
    }
    layers = range(CONFIG["num_hidden_layers"])
    assert kernels == {f"layers.{i}.{p}": k for i in layers for p, k in expected.items()} | {"lm_head": "q6"}
    assert set(llm.engine.loaded.gguf_blocks) == {*kernels, "embed_tokens"}
    assert llm.engine.runner.decode_stack is not None


@pytest.mark.skipif(not quantized.many_row_kernel(), reason="needs a CPU with AVX512-BF16")
def test_a_bf16_gguf_model_keeps_its_linears_in_blocks_only(
    tmp_path: Path, hf_llama: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a kernel multiplies steps of many rows from the blocks, the linears and the embedding table can hold
    no dequantized weight (EMBER_KEEP_DEQUANTIZED_WEIGHTS=0; on AMX the default), and the loader dequantizes none;
    EMBER_KEEP_DEQUANTIZED_WEIGHTS=1 keeps both copies."""
    monkeypatch.setenv("EMBER_KEEP_DEQUANTIZED_WEIGHTS", "0")
    path = tmp_path / "tiny-Q4_K_M.gguf"
    write_gguf(path, hf_llama, Q4_K_M[0], overrides=Q4_K_M[1])
    model = load_model(str(path), "auto", torch.bfloat16, "cpu").model
    assert isinstance(model.lm_head, QuantizedLinear) and isinstance(model.layers[0].mlp.down_proj, QuantizedLinear)
    weights = {name for name, _ in model.named_parameters()}
    assert isinstance(model.embed_tokens, QuantizedEmbedding)
    assert weights and not any(name.endswith(("proj.weight", "embed_tokens.weight")) for name in weights)
    wanted = wanted_tensors(model)
    assert not wanted("model.embed_tokens.weight") and not wanted("model.layers.0.self_attn.q_proj.weight")
    assert wanted("model.layers.0.input_layernorm.weight")
    monkeypatch.setenv("EMBER_KEEP_DEQUANTIZED_WEIGHTS", "1")
    both = load_model(str(path), "auto", torch.bfloat16, "cpu").model
    assert isinstance(both.layers[0].mlp.down_proj, torch.nn.Linear) and isinstance(both.lm_head, torch.nn.Linear)
    assert isinstance(both.embed_tokens, torch.nn.Embedding)


def test_conversion_keeps_block_matrices_as_blocks_only_and_dequantizes_them_for_transformers(
    tmp_path: Path, hf_llama: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conversion stores the matrices the kernels read as blocks alone (the cache takes about the file's size);
    `with_dense_weights` adds their fp32 dequantization in shards, as they are made (it never holds them all), to
    HF's index: transformers loads the directory, the HF baseline of `ember bench`, with the weights Ember loads."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(loader, "SHARD_BYTES", 300_000)  # the tiny model's 1.5 MB of fp32 in several shards
    path = tmp_path / "tiny.gguf"
    stored = write_gguf(path, hf_llama, GGMLQuantizationType.Q8_0)
    converted = gguf_as_hf_dir(path)
    index = json.loads((converted / loader.SHARD_INDEX).read_text())
    assert set(index["weight_map"]) == {name for name, weight in stored.items() if weight.ndim == 1}  # the norms
    assert with_dense_weights(converted) == converted
    index = json.loads((converted / loader.SHARD_INDEX).read_text())
    shards = sorted(converted.glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    hf = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).state_dict()
    assert set(index["weight_map"]) == set(stored) == set(hf)
    for name, weight in stored.items():
        if "q_proj" not in name and "k_proj" not in name:  # (the file keeps those permuted)
            assert torch.equal(hf[name], torch.from_numpy(weight)), name
    ember = load_model(str(path), "auto", torch.float32, "cpu").model  # the same weights, from the blocks
    assert torch.equal(ember.embed_tokens.weight, hf["model.embed_tokens.weight"])
    q_rows = CONFIG["num_attention_heads"] * CONFIG["head_dim"]
    assert torch.equal(ember.layers[1].self_attn.qkv_proj.weight[:q_rows], hf["model.layers.1.self_attn.q_proj.weight"])
    assert with_dense_weights(converted) == converted and sorted(converted.glob("*.safetensors")) == shards  # once


def test_a_files_digest_is_remembered_until_its_size_or_time_changes(tmp_path: Path) -> None:
    """A start does not hash the GGUF again (seconds for a 7B): its digest, which keys the conversion, is
    remembered by path, size and modification time; a file rewritten at another time is hashed anew."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"a" * 1000)
    first = _file_digest(path)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()[:24]
    stamp = path.stat()
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # same size and time: not read again
    assert _file_digest(path) == first
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    assert _file_digest(path) == hashlib.sha256(b"b" * 1000).hexdigest()[:24]


def test_conversion_replaces_older_conversions_of_the_file(tmp_path: Path, hf_llama: Any) -> None:
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf_llama, GGMLQuantizationType.Q4_1)
    older = cache_dir() / "models" / f"tiny-{_file_digest(path)}-v{GGUF_CACHE_VERSION - 1}"
    older.mkdir(parents=True)
    (older / "model.safetensors").write_bytes(b"stale")
    converted = gguf_as_hf_dir(path)
    assert converted.is_dir() and (converted / BLOCKS_FILE).is_file()
    assert not older.exists()


PHI3_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",  # gate and up, fused
    "mlp.down_proj.weight": "ffn_down.weight",
}
LONGROPE = {"short_factor": [1.0, 1.3, 1.7, 2.1], "long_factor": [1.5, 2.9, 4.4, 8.0]}


def write_converted_gguf(
    path: Path,
    model: Any,
    arch: str,
    layer_names: dict[str, str],
    qtype: GGMLQuantizationType,
    rope_base: float,
    describe: Callable[[GGUFWriter], None] = lambda writer: None,
    norm_shift: float = 0.0,
) -> None:
    """An HF model as llama.cpp's converter writes one of an architecture it does not permute: shape metadata
    from the model's config, layer tensors renamed by `layer_names`, norms shifted by `norm_shift` (Gemma's 1),
    matrices in `qtype`; `describe` adds the architecture's own metadata."""
    config = model.config
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_base)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    describe(writer)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        w = tensor.numpy().astype(np.float32)
        if hf_name in names:
            name = names[hf_name]
        else:
            _, _, layer, rest = hf_name.split(".", 3)
            name = f"blk.{layer}.{layer_names[rest]}"
        if name.endswith("norm.weight"):
            w = w + norm_shift
        if w.ndim == 1 or qtype == GGMLQuantizationType.F32:
            writer.add_tensor(name, w)
        else:
            writer.add_tensor(name, quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_phi3_gguf(path: Path, model: Any, qtype: GGMLQuantizationType) -> None:
    """A Phi-3 model as llama.cpp's converter writes one: fused projections unpermuted, the rotary dimensions
    and LongRoPE's factors (as tensors) and original context in the metadata."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads

    def longrope(writer: GGUFWriter) -> None:
        writer.add_rope_dimension_count(int(head_dim * config.partial_rotary_factor))
        writer.add_rope_scaling_orig_ctx_len(64)
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(256 / 64) / math.log(64)))
        writer.add_tensor("rope_factors_long.weight", np.array(LONGROPE["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(LONGROPE["short_factor"], dtype=np.float32))

    write_converted_gguf(path, model, "phi3", PHI3_TO_GGUF, qtype, 10000.0, longrope)


def longrope_phi3(directory: Path) -> Any:
    """A tiny random Phi-3 with LongRoPE (an original context of 64 positions, served up to 256)."""
    from tests.conftest import make_tiny_hf_model

    return make_tiny_hf_model(
        "phi3", directory, rope_scaling={"rope_type": "longrope", **LONGROPE}, original_max_position_embeddings=64,
        max_position_embeddings=256,
    )  # fmt: skip


def test_a_phi3_gguf_matches_hf(tmp_path: Path) -> None:
    """Phi-3 as llama.cpp stores it: fused q/k/v and gate/up, half of each head rotating, LongRoPE's factors as
    tensors (long ones here: served past the original 64 positions); greedy tokens and logprobs equal HF's. In
    Q8_0, the fused projections keep their blocks as they are stored."""
    hf_model = longrope_phi3(tmp_path / "hf")
    path = tmp_path / "phi3.gguf"
    write_phi3_gguf(path, hf_model, GGMLQuantizationType.F32)
    config = gguf_hf_config(GGUFReader(str(path)))
    assert (config["partial_rotary_factor"], config["rope_scaling"]["rope_type"]) == (0.5, "longrope")
    llm = LLM(str(path), num_blocks=64, dtype="float32")
    prompt = [5, 17, 33, 200, 91, 7, 64] * 12  # 84 tokens: past the original context
    out = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, logprobs=1, ignore_eos=True))[0]
    tokens, logprobs = hf_reference(hf_model, prompt, 8)
    assert out.outputs[0].token_ids == tokens
    assert [lp.logprob for lp in out.outputs[0].logprobs or []] == pytest.approx(logprobs, abs=1e-4)

    quantized_path = tmp_path / "phi3-q8.gguf"
    write_phi3_gguf(quantized_path, hf_model, GGMLQuantizationType.Q8_0)
    blocks = load_model(str(quantized_path), "auto", torch.float32, "cpu").gguf_blocks
    if quantized.kernels_available(torch.float32):
        assert {"layers.0.self_attn.qkv_proj", "layers.0.mlp.gate_up_proj", "layers.1.mlp.down_proj"} <= set(blocks)
    quantized_out = LLM(str(quantized_path), num_blocks=64, dtype="float32").generate(prompt, SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True))[0]  # fmt: skip
    assert len(quantized_out.outputs[0].token_ids) == 8


GRANITE_SCALES = {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.05,
                  "logits_scaling": 8.0}  # fmt: skip


def write_granite_gguf(path: Path, qtype: GGMLQuantizationType) -> Any:
    """A random Granite as llama.cpp stores it (Llama's layout, q/k permuted; its four multipliers in the
    metadata) at `path`; its HF model."""
    from transformers import AutoModelForCausalLM, GraniteConfig

    torch.manual_seed(2)
    config = GraniteConfig(
        **{**CONFIG, "architectures": ["GraniteForCausalLM"], "model_type": "granite"}, **GRANITE_SCALES
    )
    hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()

    def multipliers(writer: GGUFWriter) -> None:
        writer.add_float32("granite.embedding_scale", GRANITE_SCALES["embedding_multiplier"])
        writer.add_float32("granite.residual_scale", GRANITE_SCALES["residual_multiplier"])
        writer.add_float32("granite.attention.scale", GRANITE_SCALES["attention_multiplier"])
        writer.add_float32("granite.logit_scale", GRANITE_SCALES["logits_scaling"])

    write_gguf(path, hf_model, qtype, arch="granite", describe=multipliers)
    return hf_model


def test_a_granite_gguf_matches_hf(tmp_path: Path) -> None:
    """Granite as llama.cpp stores it: Llama's layout (q/k permuted) and its four multipliers in the metadata."""
    path = tmp_path / "granite.gguf"
    hf_model = write_granite_gguf(path, GGMLQuantizationType.F32)
    assert gguf_hf_config(GGUFReader(str(path)))["logits_scaling"] == 8.0
    llm = LLM(str(path), num_blocks=64, dtype="float32")
    prompt = [5, 17, 33, 200, 91, 7, 64]
    out = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, logprobs=1, ignore_eos=True))[0]
    tokens, logprobs = hf_reference(hf_model, prompt, 8)
    assert out.outputs[0].token_ids == tokens
    assert [lp.logprob for lp in out.outputs[0].logprobs or []] == pytest.approx(logprobs, abs=1e-4)


GEMMA_TO_GGUF = {
    **{hf: gguf for hf, gguf in HF_TO_GGUF.items() if hf != "post_attention_layernorm.weight"},
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}


def write_gemma3_gguf(tmp_path: Path, qtype: GGMLQuantizationType) -> tuple[Path, Any]:
    """(a tiny Gemma 3 as llama.cpp stores it: norms as 1 + weight, every sixth layer global, the others within a
    16-token window at rotary base 10,000, the global layers' linear rope scaling in the metadata; its HF model)."""
    from tests.conftest import make_tiny_hf_model

    pattern = ["sliding_attention"] * 5 + ["full_attention"]
    hf_model = make_tiny_hf_model("gemma3", tmp_path / "hf3", num_hidden_layers=6, layer_types=pattern,
                                  query_pre_attn_scalar=16)  # fmt: skip

    def gemma(writer: GGUFWriter) -> None:
        writer.add_key_length(16)
        writer.add_value_length(16)
        writer.add_sliding_window(16)
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(8.0)

    path = tmp_path / f"gemma3-{qtype.name}.gguf"
    write_converted_gguf(path, hf_model, "gemma3", GEMMA_TO_GGUF, qtype, 1e6, gemma, 1.0)
    return path, hf_model


def write_gemma2_gguf(tmp_path: Path, qtype: GGMLQuantizationType) -> tuple[Path, Any]:
    """(a tiny Gemma 2 as llama.cpp stores it: norms as 1 + weight, every other layer local, the soft-capping of
    scores and logits in the metadata; its HF model)."""
    from tests.conftest import make_tiny_hf_model

    hf_model = make_tiny_hf_model("gemma2", tmp_path / "hf2", num_hidden_layers=4, query_pre_attn_scalar=16)

    def gemma(writer: GGUFWriter) -> None:
        writer.add_key_length(16)
        writer.add_value_length(16)
        writer.add_sliding_window(16)
        writer.add_float32("gemma2.attn_logit_softcapping", 2.0)
        writer.add_float32("gemma2.final_logit_softcapping", 3.0)

    path = tmp_path / f"gemma2-{qtype.name}.gguf"
    write_converted_gguf(path, hf_model, "gemma2", GEMMA_TO_GGUF, qtype, 10000.0, gemma, 1.0)
    return path, hf_model


def test_a_gemma3_gguf_matches_hf(tmp_path: Path) -> None:
    """Gemma 3 from a GGUF (`write_gemma3_gguf`): its windows and rotary bases read right; greedy tokens and
    logprobs equal HF's over a prompt longer than the window."""
    path, hf_model = write_gemma3_gguf(tmp_path, GGMLQuantizationType.F32)
    llm = LLM(str(path), num_blocks=64, dtype="float32")
    config = llm.engine.model_config
    assert [config.layer_window(i) for i in range(6)] == [16] * 5 + [0] and config.local_rope_theta == 10000.0
    prompt = [5, 17, 33, 200, 91, 7, 64] * 4  # 28 tokens: past the window
    out = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, logprobs=1, ignore_eos=True))[0]
    tokens, logprobs = hf_reference(hf_model, prompt, 8)
    assert out.outputs[0].token_ids == tokens
    assert [lp.logprob for lp in out.outputs[0].logprobs or []] == pytest.approx(logprobs, abs=1e-4)


def test_a_gemma2_gguf_matches_hf(tmp_path: Path) -> None:
    """Gemma 2 from a GGUF (`write_gemma2_gguf`): windows and soft caps read right; greedy tokens and logprobs
    equal HF's over a prompt longer than the window."""
    path, hf_model = write_gemma2_gguf(tmp_path, GGMLQuantizationType.F32)
    llm = LLM(str(path), num_blocks=64, dtype="float32")
    config = llm.engine.model_config
    assert [config.layer_window(i) for i in range(4)] == [16, 0, 16, 0]
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (2.0, 3.0)
    prompt = [5, 17, 33, 200, 91, 7, 64] * 4  # 28 tokens: past the window
    out = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, logprobs=1, ignore_eos=True))[0]
    tokens, logprobs = hf_reference(hf_model, prompt, 8)
    assert out.outputs[0].token_ids == tokens
    assert [lp.logprob for lp in out.outputs[0].logprobs or []] == pytest.approx(logprobs, abs=1e-4)
