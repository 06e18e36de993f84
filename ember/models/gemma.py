"""Gemma 2 and Gemma 3 (text models) on the Llama family's attention, MLP and paged KV cache.

What differs from Llama: each sublayer's output is normalized before it joins the residual stream (four norms a
layer), norms scale by (1 + weight) in fp32, the MLP's gate is GELU (tanh approximation), embeddings are scaled
by sqrt(hidden) rounded to the model's dtype, and local layers attend within a sliding window (every other layer
in Gemma 2; five in six in Gemma 3, at a rotary base of their own, `ModelConfig.local_rope_theta`). Gemma 3
RMS-normalizes q/k per head as Qwen3; Gemma 2 soft-caps attention scores and logits instead (config flags).
"""

from __future__ import annotations

import torch

from ember.config import ModelConfig
from ember.models.llama import DecoderLayer, LlamaForCausalLM, RMSNorm


class GemmaRMSNorm(RMSNorm):
    """Gemma's: the weight is an offset from 1, applied in fp32 before the one rounding to the model's dtype."""

    unit_weight = 0.0
    unit_offset = True


class GemmaDecoderLayer(DecoderLayer):
    """Llama's layer with each sublayer's output normalized before it joins the residual stream, and the norm
    before the MLP a fourth one."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__(config, layer, GemmaRMSNorm)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def pre_mlp_norm(self) -> RMSNorm:
        return self.pre_feedforward_layernorm

    @property
    def attention_output_norm(self) -> RMSNorm:
        return self.post_attention_layernorm

    @property
    def mlp_output_norm(self) -> RMSNorm:
        return self.post_feedforward_layernorm

    def attention_output(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_output_norm(h)

    def mlp_output(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp_output_norm(h)


class GemmaForCausalLM(LlamaForCausalLM):
    norm_class = GemmaRMSNorm
    decoder_layer_class = GemmaDecoderLayer

    def embedding_scale(self) -> float:
        """sqrt(hidden), first rounded to the embeddings' dtype (as Gemma does)."""
        return torch.tensor(self.config.embedding_multiplier, dtype=self.norm.weight.dtype).item()
