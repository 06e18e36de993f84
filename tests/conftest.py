"""Shared fixtures: the real SmolLM2 (engine and HF reference) and tiny random models of each family."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter. Set before any test module imports triton, which
# reads it once.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every `ember serve` a test starts (and its `ember` commands) takes 1 GiB of KV cache, not the 4 GiB default:
# zero-filling 4 GiB took seconds per start here, and several such servers at once crowd the machine.
os.environ.setdefault("EMBER_KV_CACHE_MEMORY", "1")

from ember.engine.engine import LLM
from ember.models import quantized
from ember.models.loader import default_model_path
from ember.server.launch import ServerProcess, running_server

TINY_BASE: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "initializer_range": 0.3,  # peaked logits: greedy choices are far from ties
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

TINY_FAMILIES: dict[str, dict[str, Any]] = {
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "tie_word_embeddings": True},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
    "llama3": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    # a sliding window shorter than the longer prompts (every layer attends within it)
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 16},
    # Granite 3's multipliers (of its 8B model, less the attention's, which fits head_dim 16)
    "granite": {
        "architectures": ["GraniteForCausalLM"],
        "model_type": "granite",
        "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 0.2,
        "logits_scaling": 8.0,
    },
    # Gemma 2's: local and global layers, scores and logits soft-capped (caps low enough to bend them)
    "gemma2": {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "sliding_window": 16,
        "query_pre_attn_scalar": 24,
        "hidden_activation": "gelu_pytorch_tanh",
        "attn_logit_softcapping": 2.0,
        "final_logit_softcapping": 3.0,
        "tie_word_embeddings": True,
    },
    # Gemma 3's layers (a local one with its own rotary base and a short window, a global one with linear
    # scaling as the 4B+ models have); a score scale other than head_dim's
    "gemma3": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"],
        "query_pre_attn_scalar": 24,
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
        "tie_word_embeddings": True,
    },
    # Phi-4-mini's shape: fused projections in the checkpoint, half of each head rotating
    "phi3": {
        "architectures": ["Phi3ForCausalLM"],
        "model_type": "phi3",
        "partial_rotary_factor": 0.5,
        "sliding_window": None,
        "pad_token_id": 0,
    },
}


def make_tiny_hf_model(family: str, directory: Path, seed: int = 0, **overrides: Any) -> Any:
    """A random HF model of `family`, saved as an HF directory (config.json + model.safetensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = {**TINY_BASE, **TINY_FAMILIES[family], **overrides}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    config = AutoConfig.from_pretrained(str(directory))
    # eager: the reference on every transformers version (5.17's sdpa path skipped Gemma 2's score softcapping)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    if family in ("gemma2", "gemma3"):  # Gemma's norms scale by 1 + weight, their weights start at 0: make them count
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                torch.nn.init.normal_(param, std=0.3)
    if family == "qwen2":  # non-zero q/k/v biases, so that loading them is checked
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.3)
    model.save_pretrained(str(directory))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: (root / family, make_tiny_hf_model(family, root / family)) for family in TINY_FAMILIES}


@pytest.fixture(scope="session")
def smollm() -> LLM:
    return LLM(num_blocks=2048, max_num_batched_tokens=512, dtype="float32")


@pytest.fixture(scope="session")
def hf_smollm() -> Any:
    """HF transformers' own model from the same GGUF: the correctness oracle."""
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm_server() -> Iterator[ServerProcess]:
    """One `ember serve` of SmolLM2 (fp32) for the whole session: the server, agent and memory tests share it.
    Requests may bring their own chat templates (a thinking model's, a Llama 3 one); vLLM's launch flag for tool
    calling is accepted."""
    flags = ("--trust-request-chat-template", "--enable-auto-tool-choice")
    with running_server("--dtype", "float32", "--max-num-batched-tokens", "512", *flags) as s:
        yield s


@pytest.fixture(scope="module")
def server(smollm_server: ServerProcess) -> ServerProcess:
    """The shared server, its prefix cache emptied for each module: no module sees another's cached prompts."""
    httpx.post(f"{smollm_server.url}/reset_prefix_cache", timeout=30).raise_for_status()
    return smollm_server


@pytest.fixture(params=["amx", "dpbf16"])
def many_row_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each kernel for many rows that runs here: AMX's, and AVX512-BF16's (chosen on an AMX CPU by
    EMBER_DISABLE_AMX=1)."""
    if request.param == "dpbf16":
        monkeypatch.setenv("EMBER_DISABLE_AMX", "1")
    quantized.many_row_kernel.cache_clear()
    if quantized.many_row_kernel() != request.param:
        pytest.skip(f"this CPU does not run the {request.param} kernel")
    yield request.param
    quantized.many_row_kernel.cache_clear()
