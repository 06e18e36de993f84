"""GGUF-quantized linear weights, multiplied in their blocks for decode steps of a few rows (CPU, bf16).

At batch 1 a decode step's linears read every weight once, so their time is the weights' bytes over memory
bandwidth. A GGUF file's Q4 blocks are 5/8 of a byte per weight against bf16's 2: the native kernel reads
the blocks and dequantizes them in registers to the very bf16 values the loader produces, so results
differ from the bf16 matmul only in summation order. Larger steps are compute bound and stay on oneDNN's
bf16 matmul, so the model keeps both copies (the blocks add about a third of the bf16 weights' memory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ember.kernels import native

# GGUF type -> (kernel, bytes per block of 32 weights); a block opens with its fp16 scale (and for Q4_1 min)
BLOCK_FORMATS = {"Q4_0": ("q4", 18), "Q4_1": ("q4", 20), "Q8_0": ("q8", 34)}
BLOCK = 32
# Above this many rows a step's matmul is compute bound and oneDNN's bf16 kernel is faster (measured on an
# AVX512-BF16 EPYC: `benchmarks/NOTES.md`, step 20).
MAX_ROWS = 8


@dataclass
class QuantizedWeight:
    """A linear weight [N, K] as the kernel reads it: per output feature, K / 32 blocks."""

    kernel: str  # "q4" (4-bit, Q4_0 and Q4_1) or "q8" (Q8_0)
    quants: torch.Tensor  # uint8 [N, K / 32, 16 or 32]
    scales: torch.Tensor  # fp32 [N, K / 32]
    mins: torch.Tensor | None  # fp32 [N, K / 32], or None (Q8_0)

    @property
    def shape(self) -> tuple[int, int]:
        return self.quants.shape[0], self.quants.shape[1] * BLOCK


def from_gguf_blocks(raw: torch.Tensor, gguf_type: str) -> QuantizedWeight:
    """Split a GGUF tensor's rows of blocks (uint8 [N, K / 32 * block bytes]) into quants, scales and mins.

    Q4_0's weights are `d * (q - 8)`: stored as min `-8 d`, which keeps `d * q + min` exact in fp32.
    """
    kernel, block_bytes = BLOCK_FORMATS[gguf_type]
    blocks = raw.numpy().reshape(raw.shape[0], -1, block_bytes)

    def half_field(offset: int) -> torch.Tensor:
        return torch.from_numpy(blocks[:, :, offset : offset + 2].copy().view(np.float16)[..., 0].astype(np.float32))

    scales = half_field(0)
    mins = {"Q4_0": -8.0 * scales, "Q4_1": half_field(2), "Q8_0": None}[gguf_type]
    first_quant = 4 if gguf_type == "Q4_1" else 2
    quants = torch.from_numpy(np.ascontiguousarray(blocks[:, :, first_quant:]))
    return QuantizedWeight(kernel, quants, scales, mins)


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight | None:
    """The weights of a fused projection (q/k/v, gate/up) stacked by rows; None if their formats differ."""
    if len({(p.kernel, p.mins is None, p.shape[1]) for p in parts}) != 1:
        return None
    mins = None if parts[0].mins is None else torch.cat([p.mins for p in parts])  # type: ignore[misc]
    return QuantizedWeight(
        parts[0].kernel, torch.cat([p.quants for p in parts]), torch.cat([p.scales for p in parts]), mins
    )


def kernels_available() -> bool:
    """Whether the quantized kernels were built here (an AVX512-BF16 CPU); EMBER_DISABLE_QUANTIZED_KERNELS=1
    turns them off (for A/B comparisons; the weights then are only bf16)."""
    library = native.load()
    return (
        library is not None
        and hasattr(library, "quantized_linear_q4")
        and not os.environ.get("EMBER_DISABLE_QUANTIZED_KERNELS")
    )


class QuantizedMatmul:
    """`x @ weight.T (+ bias)` for bf16 x of at most `MAX_ROWS` rows, from the blocks (pointers bound once)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None) -> None:
        library = native.load()
        assert library is not None
        self.weight, self.bias = weight, bias  # kept alive: the kernel holds their pointers
        self.out_features, self.in_features = weight.shape
        self._fn = getattr(library, f"quantized_linear_{weight.kernel}")
        mins = None if weight.mins is None else weight.mins.data_ptr()
        bias_ptr = None if bias is None else bias.data_ptr()
        self._weight_args = (weight.quants.data_ptr(), weight.scales.data_ptr(), mins, bias_ptr)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        rows = x.shape[0]
        out = torch.empty((rows, self.out_features), dtype=torch.bfloat16)
        self._fn(*self._weight_args, x.data_ptr(), out.data_ptr(), rows, self.out_features, self.in_features)
        return out


def usable(weight: QuantizedWeight | None, linear: torch.nn.Linear) -> bool:
    """Whether `weight` can stand in for `linear`'s bf16 weight in the kernel."""
    return (
        weight is not None
        and linear.weight.dtype == torch.bfloat16
        and weight.shape == tuple(linear.weight.shape)
        and (linear.bias is None or linear.bias.dtype == torch.bfloat16)
    )
