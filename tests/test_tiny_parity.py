"""Every supported family (Qwen3 q/k norm, Qwen2 QKV bias, Llama-3 rope scaling, Mistral with a sliding window,
Phi-3 with partial rotary and LongRoPE, Granite's multipliers, Gemma 2's soft-capping, Gemma 3's local and global
layers) against HF."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch

from ember.engine.engine import LLM
from ember.engine.sampling_params import SamplingParams
from tests.conftest import TINY_FAMILIES

PROMPT_LENGTHS = [3, 17, 40, 95]


def random_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(n)] for n in PROMPT_LENGTHS]


def hf_reference(model: Any, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens from HF's full-sequence forward pass (no KV cache, EOS not special), with logprobs."""
    seq, chosen = list(prompt), []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logprobs = torch.log_softmax(model(torch.tensor([seq])).logits[0, -1].float(), dim=-1)
            token = int(logprobs.argmax())
            seq.append(token)
            chosen.append(logprobs[token].item())
    return seq[len(prompt) :], chosen


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
@pytest.mark.parametrize("batched_tokens", [2048, 16])  # 16: every prompt is prefilled in several chunks
def test_greedy_tokens_and_logprobs_match_hf(tiny_models: dict, family: str, batched_tokens: int) -> None:
    path, hf_model = tiny_models[family]
    llm = LLM(
        str(path), num_blocks=128, block_size=8, max_num_batched_tokens=batched_tokens, dtype="float32", device="cpu"
    )
    prompts = random_prompts()
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=3, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs, strict=True):
        tokens, logprobs = hf_reference(hf_model, prompt, 24)
        completion = out.outputs[0]
        assert completion.token_ids == tokens, f"{family}: prompt of {len(prompt)} tokens diverged"
        assert completion.logprobs is not None
        ember_logprobs = [lp.logprob for lp in completion.logprobs]
        assert ember_logprobs == pytest.approx(logprobs, abs=1e-4)
    assert llm.engine.kv_cache.pool.num_free_blocks == 128


def test_prompt_logprobs_match_hf(tiny_models: dict) -> None:
    path, hf_model = tiny_models["qwen3"]
    llm = LLM(str(path), num_blocks=64, block_size=8, max_num_batched_tokens=16, dtype="float32", device="cpu")
    prompt = random_prompts()[3]
    out = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))[0]
    with torch.inference_mode():
        expected = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry is not None and entry.token_id == prompt[pos]
        assert entry.logprob == pytest.approx(expected[pos - 1, prompt[pos]].item(), abs=1e-4)
        assert [t for t, _ in entry.top] == expected[pos - 1].topk(2).indices.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["qwen3", "llama3", "gemma2", "gemma3"])
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_cuda_bf16_logprobs_close_to_hf_fp32(tiny_models: dict, family: str, enforce_eager: bool) -> None:
    """The CUDA path (Triton kernels, decode steps from CUDA graphs or eager) in bf16 against HF in fp32:
    vLLM's rule (equal tokens up to the first difference, then each side's token in the other's top-5)."""
    from tests.parity import assert_logprobs_close, hf_greedy

    path, hf_model = tiny_models[family]
    llm = LLM(str(path), num_blocks=128, dtype="bfloat16", device="cuda", enforce_eager=enforce_eager)
    assert llm.engine.runner.use_triton and (llm.engine.runner.decode_graphs is None) == enforce_eager
    prompts = random_prompts()
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=5, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    for prompt, out, (tokens, tops) in zip(prompts, outputs, hf_greedy(hf_model, prompts, 24), strict=True):
        assert_logprobs_close(out, tokens, tops, f"{family} prompt of {len(prompt)} tokens")


def test_sliding_windows_apply_to_the_layers_the_config_names(tmp_path: Any) -> None:
    """Mistral's and Phi-3's windows apply to every layer, Qwen2's only with use_sliding_window and from
    max_window_layers on (or as `layer_types` lists); the context is no longer capped at the window."""
    from ember.config import ModelConfig
    from ember.engine.engine import context_length
    from tests.conftest import TINY_BASE

    def windows(family: str, **fields: Any) -> list[int]:
        config = ModelConfig.from_hf_dict({**TINY_BASE, **TINY_FAMILIES[family], **fields})
        return [config.layer_window(i) for i in range(config.num_hidden_layers)]

    assert windows("mistral", sliding_window=64) == [64, 64]
    assert windows("phi3", sliding_window=64) == [64, 64]
    assert windows("qwen2", sliding_window=64) == [0, 0]
    assert windows("qwen2", sliding_window=64, use_sliding_window=True, max_window_layers=1) == [0, 64]
    listed = {"layer_types": ["sliding_attention", "full_attention"]}
    assert windows("qwen2", sliding_window=64, use_sliding_window=True, **listed) == [64, 0]
    assert windows("llama3") == [0, 0]
    mistral = ModelConfig.from_hf_dict({**TINY_BASE, **TINY_FAMILIES["mistral"], "sliding_window": 64})
    assert context_length(mistral, None) == 512 and context_length(mistral, 100) == 100


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},  # Qwen's long-context setting
        {
            "rope_type": "yarn",
            "factor": 2.0,
            "original_max_position_embeddings": 256,
            "beta_fast": 16,
            "truncate": False,
        },
    ],
)
def test_yarn_rope_scaling_matches_hf(tmp_path: Any, rope_scaling: dict[str, Any]) -> None:
    """YaRN's blended frequencies and its attention sharpening (cos and sin scaled), against HF on a tiny Qwen3."""
    from tests.conftest import make_tiny_hf_model

    hf_model = make_tiny_hf_model("qwen3", tmp_path, rope_scaling=rope_scaling)
    llm = LLM(str(tmp_path), num_blocks=64, block_size=8, dtype="float32", device="cpu")
    prompt = random_prompts()[3]
    out = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0, logprobs=1, ignore_eos=True))[0]
    tokens, logprobs = hf_reference(hf_model, prompt, 12)
    assert out.outputs[0].token_ids == tokens
    assert [lp.logprob for lp in out.outputs[0].logprobs or []] == pytest.approx(logprobs, abs=1e-4)


@pytest.mark.parametrize(
    ("field", "value"), [("hidden_act", "gelu"), ("mlp_bias", True), ("use_bidirectional_attention", True)]
)
def test_a_config_of_a_variant_ember_does_not_compute_is_refused(field: str, value: Any) -> None:
    from ember.config import ModelConfig
    from tests.conftest import TINY_BASE

    config = {**TINY_BASE, **TINY_FAMILIES["llama3"]}
    assert ModelConfig.from_hf_dict({**config, "hidden_act": "silu", "mlp_bias": False}).hidden_size == 64
    with pytest.raises(ValueError, match=f"this model's {field} is {value!r}, which Ember does not serve"):
        ModelConfig.from_hf_dict({**config, field: value})


def test_longrope_takes_its_short_or_long_factors_by_the_served_context(tmp_path) -> None:
    """Phi's LongRoPE: served within the original context, the short factors (as HF's for sequences that
    short); served past it, the long ones over the whole context (as HF's for a sequence that long). The
    original context here is a top-level field, as in Phi-3's configs."""
    from tests.conftest import make_tiny_hf_model

    scaling = {"type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.1], "long_factor": [1.5, 2.9, 4.4, 8.0]}
    path = tmp_path / "phi"
    hf_model = make_tiny_hf_model(
        "phi3", path, rope_scaling=scaling, original_max_position_embeddings=64, max_position_embeddings=256
    )
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters", None)  # as Phi-3's own config.json: rope_scaling, the original context beside it
    (path / "config.json").write_text(json.dumps({**config, "rope_scaling": scaling}))
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=1, ignore_eos=True)
    short, long = random_prompts()[1], random_prompts()[3]  # 17 + 12 tokens within the original 64; 95 past it
    served = {}
    for max_model_len, prompt in ((64, short), (256, long), (256, short)):
        llm = LLM(str(path), max_model_len=max_model_len, num_blocks=64, block_size=8, dtype="float32", device="cpu")
        completion = llm.generate(prompt, params)[0].outputs[0]
        served[max_model_len, len(prompt)] = [lp.logprob for lp in completion.logprobs or []]
        if (max_model_len, prompt) != (256, short):
            tokens, logprobs = hf_reference(hf_model, prompt, 12)
            assert completion.token_ids == tokens
            assert served[max_model_len, len(prompt)] == pytest.approx(logprobs, abs=1e-4)
    assert served[64, len(short)] != pytest.approx(served[256, len(short)], abs=1e-3)  # the factors differ


@pytest.mark.parametrize(
    ("scaling", "message"),
    [
        ({"type": "longrope", "long_factor": [1.0] * 4}, "lacks short_factor, original_max_position_embeddings"),
        ({"type": "longrope", "long_factor": [1.0] * 3, "short_factor": [1.0] * 3,
          "original_max_position_embeddings": 64}, "factors number 3, not one per frequency [(]4[)]"),
    ],
)  # fmt: skip
def test_a_malformed_longrope_config_is_a_clear_error(tmp_path, scaling: dict, message: str) -> None:
    from tests.conftest import TINY_BASE

    (tmp_path / "config.json").write_text(json.dumps({**TINY_BASE, **TINY_FAMILIES["phi3"], "rope_scaling": scaling}))
    with pytest.raises(ValueError, match=message):
        LLM(str(tmp_path), load_format="dummy", num_blocks=8)


def test_the_language_model_of_a_gemma3_image_and_text_checkpoint_matches_hf(tmp_path: Any) -> None:
    """Gemma 3 4B-27B ship as image-and-text checkpoints: Ember serves their language model (its weights under
    `language_model.`, its config nested with only what differs from the defaults), the image encoder unused."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from tests.conftest import TINY_BASE

    text = {key: value for key, value in {**TINY_BASE, **TINY_FAMILIES["gemma3"]}.items()
            if key not in ("architectures", "model_type", "initializer_range")}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}  # fmt: skip
    torch.manual_seed(0)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=255,
                          boi_token_index=253, eoi_token_index=254, initializer_range=0.3)  # fmt: skip
    hf_model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)
    hf_model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["Gemma3ForConditionalGeneration"] and "text_config" in saved
    llm = LLM(str(tmp_path), num_blocks=64, block_size=8, dtype="float32", device="cpu")
    prompt = random_prompts()[2]  # 40 tokens: past the window
    out = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0, logprobs=1, ignore_eos=True))[0]
    tokens, logprobs = hf_reference(hf_model, prompt, 12)
    assert out.outputs[0].token_ids == tokens
    assert [lp.logprob for lp in out.outputs[0].logprobs or []] == pytest.approx(logprobs, abs=1e-4)


def test_a_gemma3_4b_config_reads_with_transformers_defaults() -> None:
    """Gemma 3 4B's config.json names only what differs from Gemma3TextConfig's defaults (heads, vocabulary,
    rotary bases come from them); its global layers scale their rotary linearly, the local ones do not."""
    from ember.config import ModelConfig
    from ember.models.loader import ModelNotFoundError, text_model_config

    saved = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "eos_token_id": [1, 106],
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
        "vision_config": {"model_type": "siglip_vision_model"},
    }
    config = ModelConfig.from_hf_dict(text_model_config(saved))
    assert (config.architecture, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
        "gemma3", 8, 4, 256)  # fmt: skip
    assert config.vocab_size == 262208 and config.eos_token_ids == [1, 106] and config.tie_word_embeddings
    assert (config.rope_theta, config.local_rope_theta, config.rope_scaling["factor"]) == (1e6, 10000.0, 8.0)
    assert [config.layer_window(i) for i in range(6)] == [1024] * 5 + [0]
    assert config.attention_multiplier == 256**-0.5
    broken = {**saved, "text_config": {"model_type": "no_such_model"}}
    with pytest.raises(ModelNotFoundError, match="cannot read the text model's config"):
        text_model_config(broken)


def test_bf16_logits_are_fp32_copies_in_one_buffer_kept_across_steps(tiny_models: dict) -> None:
    """On the CPU a bf16 model's fp32 logits fill one buffer (no fresh tens of MB a step): each call's values are
    the LM head's, whatever the row count, and a later call reuses the storage."""
    llm = LLM(str(tiny_models["llama3"][0]), num_blocks=16, dtype="bfloat16", device="cpu")
    model = llm.engine.runner.model
    hidden = torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()
    first = model.compute_logits(hidden[:3])
    assert first.dtype == torch.float32 and torch.equal(first, model.lm_head(hidden[:3]).float())
    second = model.compute_logits(hidden)
    assert torch.equal(second, model.lm_head(hidden).float())
    third = model.compute_logits(hidden[3:5])
    assert third.data_ptr() == second.data_ptr() and torch.equal(third, model.lm_head(hidden[3:5]).float())
