"""One PyTorch implementation of the Llama family: Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2, Phi-3/Phi-4-mini,
Granite 3.

The differences between the families are flags on `ModelConfig`: QKV bias (Qwen2), per-head q/k RMSNorm (Qwen3),
tied embeddings (SmolLM2, small Qwen), RoPE scaling (Llama 3's, YaRN, Phi's LongRoPE), partial rotary
(Phi-4-mini), scalar multipliers of the embeddings, sublayer outputs, attention and logits (Granite). The
forward pass takes a step's tokens flattened into one sequence; attention reads and writes the paged KV cache.
Q/K/V and gate/up projections are fused so each layer runs few, large matmuls.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ember.attention.torch_paged import AttentionMetadata, paged_attention
from ember.config import ModelConfig
from ember.kernels.elementwise import GATED_ACTIVATIONS, add_rms_norm, rms_norm, rotary_


class RMSNorm(nn.Module):
    """HF's formulation (normalize in fp32, cast, then scale); with a residual, adds it first (one pass)."""

    unit_weight = 1.0  # the weight that leaves the normalized input as it is
    unit_offset = False  # Gemma's: the weight is an offset from 1 (see `elementwise.rms_norm_reference`)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.unit_offset)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); `residual` may be updated in place."""
        return add_rms_norm(x, residual, self.weight, self.eps, self.unit_offset)


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary embedding, and the factor its cos and sin are scaled by: with the
    rope scaling a config names (linear, Llama 3's, YaRN's, LongRoPE) or a GGUF's frequency divisors applied."""
    dim = config.rotary_dim or config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if config.rope_freq_factors is not None:  # llama.cpp's form of Llama 3's scaling: a divisor per frequency
        inv_freq = inv_freq / torch.tensor(config.rope_freq_factors, dtype=torch.float64)
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq, 1.0
    kind = rope_kind(config)
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        return llama3_frequencies(inv_freq, scaling), 1.0
    if kind == "yarn":
        return yarn_frequencies(inv_freq, config)
    if kind in LONGROPE:
        return longrope_frequencies(inv_freq, config)
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3, yarn, longrope)")


LONGROPE = ("longrope", "su")  # "su": its name in Phi-3's first configs


def rope_kind(config: ModelConfig) -> str | None:
    """The rope scaling a config names (None: none)."""
    scaling = config.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type"))


def longrope_frequencies(inv_freq: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3's 128K models, Phi-3.5, Phi-4-mini): each frequency divided by its own factor, the long
    ones when the served context goes past the original one (HF switches per sequence length, llama.cpp per
    context size; one set for the whole context keeps cached keys and later queries in step), the short ones
    else; attention sharpens by sqrt(1 + ln(factor) / ln(original))."""
    scaling = config.rope_scaling or {}
    missing = [
        key for key in ("long_factor", "short_factor", "original_max_position_embeddings") if not scaling.get(key)
    ]
    if missing:
        raise ValueError(f"the config's LongRoPE scaling lacks {', '.join(missing)}")
    original = scaling["original_max_position_embeddings"]
    served = config.served_context or config.max_position_embeddings
    factors = scaling["long_factor"] if served > original else scaling["short_factor"]
    if len(factors) != len(inv_freq):
        raise ValueError(
            f"the config's LongRoPE factors number {len(factors)}, not one per frequency ({len(inv_freq)})"
        )
    factor = scaling.get("factor") or config.max_position_embeddings / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
    return inv_freq / torch.tensor(factors, dtype=torch.float64), float(attention)


def llama3_frequencies(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def yarn_frequencies(inv_freq: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023; Qwen's long-context setting): dimensions that turn fewer than `beta_slow` times
    over the original context are interpolated (slowed by `factor`), those turning more than `beta_fast` times
    are kept, with a linear ramp between; attention sharpens by 0.1 ln(factor) + 1, applied to cos and sin."""
    scaling, dim, base = config.rope_scaling or {}, config.head_dim, config.rope_theta
    original = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    factor = scaling.get("factor") or config.max_position_embeddings / original

    def dimension_turning(rotations: float) -> float:  # the dimension whose wave turns `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension_turning(scaling.get("beta_fast") or 32), dimension_turning(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / ((high - low) or 0.001)).clamp(0, 1)
    blended = inv_freq / factor * ramp + inv_freq * (1 - ramp)

    def sharpening(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = (
            sharpening(factor, mscale) / sharpening(factor, mscale_all_dim)
            if mscale and mscale_all_dim
            else sharpening(factor)
        )
    return blended, float(attention)


class RotaryEmbedding(nn.Module):
    """Rotates q and k by position (the "rotate half" layout of HF checkpoints)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute the fp32 cos/sin tables on the current device, e.g. after a dtype cast."""
        device = self.cos.device
        if device.type == "meta":  # built on the meta device: computed once the model is materialized
            return
        inv_freq, attention_factor = rope_frequencies(self.config)
        positions = torch.arange(self.config.max_position_embeddings, dtype=torch.float64)
        freqs = torch.outer(positions, inv_freq)
        self.cos = (freqs.cos() * attention_factor).float().to(device)
        self.sin = (freqs.sin() * attention_factor).float().to(device)

    def serve_context(self, length: int) -> None:
        """The longest sequence served: LongRoPE's frequencies depend on it (its tables are made again)."""
        if self.config.served_context != length:
            self.config.served_context = length
            if rope_kind(self.config) in LONGROPE:
                self.reset_parameters()

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at each position, [T, rotary dims / 2]: looked up once per step, used by every layer."""
        return self.cos[positions], self.sin[positions]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, norm: type[RMSNorm] = RMSNorm) -> None:
        super().__init__()
        self.window = config.layer_window(layer)
        self.softcap = config.attn_logit_softcapping
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = config.attention_multiplier or self.head_dim**-0.5
        self.rotary_dim = config.rotary_dim or self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = norm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = norm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        if meta.use_triton and self.rotary_dim == self.head_dim:  # the CUDA path: q/k norms, rotary, K/V store
            from ember.attention.triton_paged import triton_paged_attention  # in one kernel, then attention's
            from ember.kernels.triton_qkv import qkv_to_cache

            q = qkv_to_cache(qkv, self.num_heads, *rope, *kv_cache, meta.slot_mapping, *self.qk_norms())
            out = triton_paged_attention(q, None, None, *kv_cache, meta, self.scale, self.window, self.softcap)
            return self.o_proj(out.reshape(num_tokens, self.q_size))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
            rotary_(q, *rope)
            rotary_(k, *rope)
        else:  # q and k heads sit side by side in each QKV row: rotate them in one pass, in place
            heads = qkv[:, : self.q_size + self.kv_size].view(num_tokens, -1, self.head_dim)
            rotary_(heads if self.rotary_dim == self.head_dim else heads[..., : self.rotary_dim], *rope)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window, self.softcap)
        return self.o_proj(out.reshape(num_tokens, self.q_size))

    def qk_norms(self) -> tuple[torch.Tensor, torch.Tensor, float, bool] | tuple[()]:
        """`qkv_to_cache`'s norm arguments: q's and k's weights, epsilon, Gemma's unit offset (none: no norms)."""
        if self.q_norm is None or self.k_norm is None:
            return ()
        return self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, self.q_norm.unit_offset


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_and_mul = GATED_ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, norm: type[RMSNorm] = RMSNorm) -> None:
        super().__init__()
        self.input_layernorm = norm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, norm)
        self.post_attention_layernorm = norm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.residual_multiplier = config.residual_multiplier

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): adding the two is left to the next norm,
        which fuses the add into its pass. The first layer gets residual None."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = self.attention_output(self.self_attn(h, rope, kv_cache, meta))
        h, residual = self.pre_mlp_norm.add_and_norm(h, residual)
        return self.mlp_output(self.mlp(h)), residual

    @property
    def pre_mlp_norm(self) -> RMSNorm:
        return self.post_attention_layernorm

    @property
    def attention_output_norm(self) -> RMSNorm | None:
        """The norm of the attention's output before it joins the residual stream (Gemma's), or None."""
        return None

    @property
    def mlp_output_norm(self) -> RMSNorm | None:
        return None

    def attention_output(self, h: torch.Tensor) -> torch.Tensor:
        """The attention's output as it joins the residual stream: Granite scales it (Gemma normalizes it)."""
        return h if self.residual_multiplier == 1.0 else h * self.residual_multiplier

    def mlp_output(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP's output as it joins the residual stream (Granite's scaled as the attention's)."""
        return self.attention_output(h)


class LlamaForCausalLM(nn.Module):
    norm_class: type[RMSNorm] = RMSNorm
    decoder_layer_class: type[nn.Module] = DecoderLayer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(self.decoder_layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = self.norm_class(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        # sliding-window layers with a rotary base of their own (Gemma 3's local layers: 10,000, no scaling)
        self.local_rotary = (
            RotaryEmbedding(replace(config, rope_theta=config.local_rope_theta, rope_scaling=None))
            if config.local_rope_theta is not None
            else None
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logits_buffer = torch.empty(0)  # `_as_float32`'s
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of a flattened step."""
        x, residual = self.embed(input_ids), None
        rope = self.rotary(positions)
        local_rope = rope if self.local_rotary is None else self.local_rotary(positions)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, local_rope if layer.self_attn.window else rope, kv_cache, meta)
        return self.norm(x) if residual is None else self.norm.add_and_norm(x, residual)[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        scale = self.embedding_scale()
        return x if scale == 1.0 else x * scale

    def embedding_scale(self) -> float:
        """What embeddings are multiplied by (Granite's multiplier; 1: nothing)."""
        return self.config.embedding_multiplier

    def rotaries(self) -> list[RotaryEmbedding]:
        return [self.rotary] if self.local_rotary is None else [self.rotary, self.local_rotary]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [rows, vocab], valid until the next call (on the CPU they share one buffer)."""
        logits = self._as_float32(self.lm_head(hidden))
        if cap := self.config.final_logit_softcapping:
            logits = torch.tanh(logits / cap) * cap
        return logits if self.config.logits_scaling == 1.0 else logits / self.config.logits_scaling

    def _as_float32(self, logits: torch.Tensor) -> torch.Tensor:
        """On the CPU, copied into a buffer kept across steps: a fresh one past glibc's 32 MB mmap threshold is
        mapped anew each step, and its page faults cost 7 ms for 32 rows of Gemma's 262K vocabulary against 1 ms
        for the copy itself."""
        if logits.dtype == torch.float32 or logits.device.type != "cpu":
            return logits.float()
        if self.logits_buffer.numel() < logits.numel():
            self.logits_buffer = torch.empty(logits.numel())
        return self.logits_buffer[: logits.numel()].view(logits.shape).copy_(logits)
