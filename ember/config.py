"""Configuration objects, built once and passed down the stack.

`ModelConfig` is Ember's own normalized view of a Llama-family architecture, whatever the source
(HF config.json, GGUF metadata, or a dummy preset). `EngineConfig` gathers everything the engine needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",  # Phi-3, Phi-3.5 and Phi-4-mini: fused projections, LongRoPE, partial rotary
    "GraniteForCausalLM": "granite",  # IBM Granite 3.x (dense): Llama with four scalar multipliers
    "Gemma2ForCausalLM": "gemma2",  # Gemma 2: Gemma 3's layers without q/k norms, scores and logits soft-capped
    "Gemma3ForCausalLM": "gemma3",  # Gemma 3 (text: 270M, 1B): four norms a layer, GELU, local and global layers
}
GEMMA_FAMILIES = ("gemma2", "gemma3")
# families whose configs' `sliding_window` always applies (Qwen2's only with use_sliding_window)
SLIDING_WINDOW_FAMILIES = ("mistral", "phi3", *GEMMA_FAMILIES)
# every how many layers a global one comes, where a config does not list its layers' types
GLOBAL_LAYER_PERIOD = {"Gemma2ForCausalLM": 2, "Gemma3ForCausalLM": 6}
GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")  # both mean GELU's tanh approximation in Gemma's configs


def cache_dir() -> Path:
    """Where Ember keeps converted models and compiled kernels ($EMBER_CACHE_DIR, default ~/.cache/ember)."""
    return Path(os.environ.get("EMBER_CACHE_DIR", Path.home() / ".cache" / "ember"))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# config fields of variants the Llama-family model does not compute, with the values it does compute: a config
# with another value is refused rather than served wrong
SERVED_VALUES: dict[str, tuple[Any, ...]] = {
    "hidden_act": (None, "silu", "swish"),
    "mlp_bias": (None, False),
    "use_bidirectional_attention": (None, False),  # EmbeddingGemma's encoder
}


def check_served_features(d: dict[str, Any], family: str) -> None:
    """Refuse a config whose model computes what Ember's does not (another MLP activation, MLP biases,
    bidirectional attention)."""
    served_values = dict(SERVED_VALUES)
    if family in GEMMA_FAMILIES:
        served_values["hidden_act"] = served_values["hidden_activation"] = (None, *GEMMA_ACTIVATIONS)
    for name, served in served_values.items():
        if d.get(name) not in served:
            raise ValueError(f"this model's {name} is {d[name]!r}, which Ember does not serve")


@dataclass
class ModelConfig:
    """The shape of a Llama-family decoder; every supported family maps onto these fields."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    local_rope_theta: float | None = None  # the rotary base of sliding-window layers where it differs (Gemma 3)
    rope_freq_factors: list[float] | None = None  # a GGUF's divisor of each rotary frequency (llama.cpp's rope_freqs)
    rotary_dim: int | None = None  # the leading dimensions of each head that rotate (partial rotary); None: all
    # the longest sequence served (the engine's max_model_len): LongRoPE's long factors apply when it is past
    # the original context; None: the model's positions
    served_context: int | None = None
    max_position_embeddings: int = 4096
    # tokens each query attends back over (itself included) where the model limits attention to a window
    # (Mistral-7B-v0.1's 4,096; Phi-3's; Qwen2's with use_sliding_window); None: whole contexts
    sliding_window: int | None = None
    # each layer's "sliding_attention" or "full_attention" (HF's `layer_types`); None: every layer the same
    layer_types: list[str] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"  # the MLP's gate activation: "silu", or "gelu_tanh" (Gemma)
    # Granite's multipliers: of the embeddings, of each sublayer's output before the residual add, the
    # attention's scale (None: 1 / sqrt(head_dim)), and the divisor of the logits
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    # Gemma 2's soft-capping of attention scores and of the logits: x -> cap * tanh(x / cap); 0: none
    attn_logit_softcapping: float = 0.0
    final_logit_softcapping: float = 0.0
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def layer_window(self, layer: int) -> int:
        """Tokens layer `layer` attends back over; 0: the whole context."""
        if self.sliding_window is None or (self.layer_types and self.layer_types[layer] != "sliding_attention"):
            return 0
        return self.sliding_window

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        archs = d.get("architectures") or []
        family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if family is None:
            supported = ", ".join(SUPPORTED_ARCHITECTURES)
            raise ValueError(f"unsupported architecture {archs or d.get('model_type')!r}; Ember supports {supported}")
        check_served_features(d, family)
        gemma = family in GEMMA_FAMILIES
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        rope_scaling = d.get("rope_scaling") or None
        rope_theta = d.get("rope_theta")
        rope_params = d.get("rope_parameters")  # transformers >= 5 nests rope settings here
        local_rope_theta = d.get("rope_local_base_freq") or (10000.0 if family == "gemma3" else None)
        if isinstance(rope_params, dict) and "full_attention" in rope_params:  # by layer type (Gemma 3)
            local_rope_theta = (rope_params.get("sliding_attention") or {}).get("rope_theta", local_rope_theta)
            rope_params = rope_params["full_attention"]
        if isinstance(rope_params, dict):
            rope_theta = rope_theta or rope_params.get("rope_theta")
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        if rope_scaling is not None and "original_max_position_embeddings" in d:  # Phi-3 keeps it at the top
            rope_scaling = {"original_max_position_embeddings": d["original_max_position_embeddings"], **rope_scaling}
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        nested = rope_params if isinstance(rope_params, dict) else {}
        partial = d.get("partial_rotary_factor") or nested.get("partial_rotary_factor") or 1.0
        windowed = family in SLIDING_WINDOW_FAMILIES or d.get("use_sliding_window")
        return cls(
            architecture=family,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            local_rope_theta=float(local_rope_theta) if local_rope_theta else None,
            rope_freq_factors=d.get("rope_freq_factors"),
            rotary_dim=int(head_dim * partial) if partial != 1 else None,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            sliding_window=d.get("sliding_window") if windowed else None,
            layer_types=layer_types(d) if windowed and d.get("sliding_window") else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            attention_bias=bool(d.get("attention_bias", family == "qwen2")),
            qk_norm=family in ("qwen3", "gemma3"),
            hidden_act="gelu_tanh" if gemma else "silu",
            # Gemma scales its embeddings by sqrt(hidden) and its scores by query_pre_attn_scalar^-0.5
            embedding_multiplier=float(d.get("embedding_multiplier") or (d["hidden_size"] ** 0.5 if gemma else 1.0)),
            residual_multiplier=float(d.get("residual_multiplier") or 1.0),
            attention_multiplier=d.get("query_pre_attn_scalar", 256) ** -0.5
            if gemma
            else d.get("attention_multiplier"),
            logits_scaling=float(d.get("logits_scaling") or 1.0),
            attn_logit_softcapping=float(d.get("attn_logit_softcapping") or 0.0),
            final_logit_softcapping=float(d.get("final_logit_softcapping") or 0.0),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def layer_types(d: dict[str, Any]) -> list[str] | None:
    """Which layers of a windowed config attend within the window: as listed, Gemma's pattern (each
    `sliding_window_pattern`-th layer global, the others local), or Qwen2's from `max_window_layers` (the layers
    from that one on); None: all."""
    if d.get("layer_types"):
        return list(d["layer_types"])
    default = next((GLOBAL_LAYER_PERIOD[a] for a in d.get("architectures") or [] if a in GLOBAL_LAYER_PERIOD), None)
    if period := d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or default:
        return ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
                for i in range(d["num_hidden_layers"])]  # fmt: skip
    first = d.get("max_window_layers")
    if not d.get("use_sliding_window") or first is None:
        return None
    return ["full_attention" if i < first else "sliding_attention" for i in range(d["num_hidden_layers"])]


@dataclass
class CacheConfig:
    """Paged KV cache: fixed-size blocks; capacity from an explicit block count or a memory budget."""

    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: a fraction of available memory
    memory_fraction: float = 0.25  # CPU: of available memory (capped at 4 GiB unless kv_cache_memory is set)
    gpu_memory_utilization: float = 0.9  # CUDA: the fraction of the GPU's memory Ember may fill, weights included
    num_blocks: int | None = None  # overrides the memory budget (tests use tiny caches)
    # at most this many whole contexts (max_model_len tokens each, a block to spare) within the budget: a
    # one-shot command needs one, and `ember generate` took 7.4-23.2 s with the 4 GiB default (zeroing it) against
    # 6.1 s with one context, on the 2-core VM (None: the whole budget)
    max_sequences: int | None = None
    enable_prefix_caching: bool = True
    # "auto": the model's dtype; "fp8" (or "fp8_e4m3"): keys and values stored as float8 e4m3, unscaled (values
    # past +-448 saturate), as vLLM's fp8 KV cache without calibrated scales: half the bytes of bf16
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.max_sequences is not None and self.max_sequences <= 0:
            raise ValueError(f"max_sequences must be positive, got {self.max_sequences}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def kv_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's element type for a model computing in `model_dtype`."""
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or model_dtype


KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
}

SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass
class SchedulerConfig:
    """Continuous batching limits: at most `max_num_seqs` running, `max_num_batched_tokens` per step. Left
    unset (None), they take the device's defaults (`SCHEDULER_DEFAULTS`) when the engine config is built."""

    max_num_seqs: int | None = None  # None until EngineConfig fills in the device's default
    max_num_batched_tokens: int | None = None  # likewise
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    policy: str = "fcfs"  # or "priority": requests' priorities order admission and preemption (scheduler.py)

    def __post_init__(self) -> None:
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {self.policy!r}")
        if self.max_num_seqs is not None and self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise ValueError(
                f"max_model_len must be at least 2 (a prompt token and one more), got {self.max_model_len}"
            )


# (max_num_seqs, max_num_batched_tokens) by device. On the CPU, 1,024 and 2,048 batched tokens measured the
# same (benchmarks/NOTES.md). A GPU step costs little more at twice the requests and prompt tokens: vLLM's
# defaults for serving on a GPU.
SCHEDULER_DEFAULTS = {"cpu": (128, 1024), "cuda": (256, 2048)}


SPECULATIVE_METHODS = ("ngram", "suffix", "draft:<model>")


@dataclass
class SpeculativeConfig:
    """Speculative decoding: a proposer drafts tokens, the target model verifies them in one step.

    `method`: None (off), "ngram" (prompt lookup in the request's own tokens), "suffix" (a suffix index
    over the prompts and outputs of all recent requests) or "draft:<model>" (a smaller model with the
    same tokenizer). Speculation only pays while decode is memory-bound, so it is skipped in steps with
    more than `max_batch_size` running requests.
    """

    method: str | None = None
    num_speculative_tokens: int = 5
    max_batch_size: int = 8
    prompt_lookup_min: int = 2  # "ngram": the shortest and longest tails looked up
    prompt_lookup_max: int = 4

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in ("ngram", "suffix") and not self.method.startswith("draft:"):
            raise ValueError(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.method!r}")
        if self.method == "draft:":
            raise ValueError("draft:<model> needs a model path after 'draft:'")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {self.num_speculative_tokens}")
        if self.max_batch_size < 1:
            raise ValueError(f"speculative max_batch_size must be at least 1, got {self.max_batch_size}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {self.prompt_lookup_min} and "
                f"{self.prompt_lookup_max}"
            )


@dataclass
class LoRAConfig:
    """LoRA adapters served beside the base model (PEFT directories), chosen per request by name.

    `enable`: the model's linears take adapters, loaded now (`modules`, name -> directory) or later at run
    time; `modules` alone turns it on. `max_rank`: adapters of a higher rank are refused (None: any).
    `max_loras`: distinct adapters running at once (None: any); a request of one more waits its turn.
    """

    enable: bool = False
    modules: dict[str, str] = field(default_factory=dict)
    max_rank: int | None = None
    max_loras: int | None = None

    def __post_init__(self) -> None:
        self.enable = self.enable or bool(self.modules)
        if self.max_rank is not None and self.max_rank < 1:
            raise ValueError(f"max_lora_rank must be at least 1, got {self.max_rank}")
        if self.max_loras is not None and self.max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {self.max_loras}")
        for name in self.modules:
            if not name or name != name.strip():
                raise ValueError(f"a LoRA adapter needs a name without surrounding blanks, got {name!r}")


@dataclass
class EngineConfig:
    model: str | None = None  # None: the embedded default model (SmolLM2-135M-Instruct)
    load_format: str = "auto"  # auto | dummy
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto: cuda when available, else cpu
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    enforce_eager: bool = False  # Triton path: run decode steps eagerly instead of replaying CUDA graphs
    # CUDA graphs: schedule decode step N+1 while step N runs on the device. None: wherever it applies (graph
    # decode steps, no speculative method); True: asked for (a warning where it cannot apply); False: off
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA GPU here")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        seqs, tokens = SCHEDULER_DEFAULTS["cuda" if self.device.startswith("cuda") else "cpu"]
        if self.scheduler.max_num_seqs is None:
            self.scheduler.max_num_seqs = seqs
        if self.scheduler.max_num_batched_tokens is None:
            self.scheduler.max_num_batched_tokens = tokens

    def torch_dtype(self) -> torch.dtype:
        """'auto' is the fast path whose parity holds: bf16 on CUDA and on CPUs with bf16 matmul units."""
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.device.startswith("cuda") or cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run several times faster than fp32 (measured, see benchmarks/)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def available_memory_bytes() -> int:
    """Memory the kernel says can be taken without swapping (MemAvailable); 8 GiB where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30
