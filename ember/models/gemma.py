"""Gemma 2 and Gemma 3 (text models) on the Llama family's attention, MLP and paged KV cache.

What differs from Llama: each sublayer's output is normalized before it joins the residual stream (four norms a
layer), norms scale by (1 + weight) in fp32, the MLP's gate is GELU (tanh approximation), embeddings are scaled
by sqrt(hidden) rounded to the model's dtype, and local layers attend within a sliding window (every other layer
in Gemma 2; five in six in Gemma 3, at a rotary base of their own, `ModelConfig.local_rope_theta`). Gemma 3
RMS-normalizes q/k per head as Qwen3; Gemma 2 soft-caps attention scores and logits instead (config flags).
"""

from __future__ import annotations

import torch
from torch import nn

from ember.attention.torch_paged import AttentionMetadata
from ember.config import ModelConfig
from ember.models.llama import MLP, Attention, LlamaForCausalLM, RMSNorm


class GemmaRMSNorm(RMSNorm):
    """Gemma's: the weight is an offset from 1, applied in fp32 before the one rounding to the model's dtype."""

    unit_weight = 0.0
    unit_offset = True


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, GemmaRMSNorm)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's normalized MLP output, the residual stream before it), as Llama's layer returns them."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, rope, kv_cache, meta))
        h, residual = self.pre_feedforward_layernorm.add_and_norm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class GemmaForCausalLM(LlamaForCausalLM):
    norm_class = GemmaRMSNorm
    decoder_layer_class = GemmaDecoderLayer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings times sqrt(hidden), the factor first rounded to the embeddings' dtype (as Gemma does)."""
        x = self.embed_tokens(input_ids)
        return x * torch.tensor(self.config.embedding_multiplier, dtype=x.dtype).item()
