"""GGUF-quantized linear weights, multiplied in their blocks for decode steps of a few rows (CPU).

At batch 1 a decode step's linears read every weight once, so their time is the weights' bytes over memory
bandwidth. A GGUF file's Q4 blocks are 5/8 of a byte per weight against bf16's 2: the native kernel reads
the blocks and dequantizes them in registers to the very values the loader produces (fp32, or those rounded
to bf16), so results differ from oneDNN's matmul only in summation order. Larger steps are compute bound and
stay on oneDNN, so the model keeps both copies (the blocks add about a third of bf16 weights' memory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ember.kernels import native

# GGUF type -> (weights, bytes) per block; Q4_K blocks are split into sub-blocks of 32 weights at load
GGUF_BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34), "Q4_K": (256, 144)}
BLOCK = 32
# Above this many rows a step's matmul is compute bound and oneDNN's kernel is about as fast or faster
# (measured on an AVX512-BF16 EPYC, and fp32 also as an AVX2 build: `benchmarks/NOTES.md`, steps 20 and 21).
MAX_ROWS = {torch.bfloat16: 8, torch.float32: 8}
SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}


@dataclass
class QuantizedWeight:
    """A linear weight [N, K] as the kernel reads it: per output feature, K / 32 blocks."""

    kernel: str  # "q4" (4-bit: Q4_0, Q4_1, Q4_K) or "q8" (Q8_0)
    quants: torch.Tensor  # uint8 [N, K / 32, 16 or 32]
    scales: torch.Tensor  # fp32 [N, K / 32]
    mins: torch.Tensor | None  # fp32 [N, K / 32], or None (Q8_0)

    @property
    def shape(self) -> tuple[int, int]:
        return self.quants.shape[0], self.quants.shape[1] * BLOCK


def _half(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 field at `offset` of every block, as fp32."""
    return blocks[..., offset : offset + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def from_gguf_blocks(raw: torch.Tensor, gguf_type: str) -> QuantizedWeight:
    """Split a GGUF tensor's rows of blocks (uint8 [N, K / per_block * block bytes]) into quants, scales and
    mins, with every weight's `scale * q + min` exactly the fp32 value of gguf-py's dequantization.

    Q4_0's weights are `d * (q - 8)`: stored as min `-8 d`, which keeps `d * q + min` exact in fp32.
    """
    _, block_bytes = GGUF_BLOCKS[gguf_type]
    blocks = raw.numpy().reshape(raw.shape[0], -1, block_bytes)
    if gguf_type == "Q4_K":
        return _from_q4_k(blocks)
    scales = _half(blocks, 0)
    mins = {"Q4_0": -8.0 * scales, "Q4_1": _half(blocks, 2), "Q8_0": None}[gguf_type]
    first_quant = 4 if gguf_type == "Q4_1" else 2
    quants = np.ascontiguousarray(blocks[:, :, first_quant:])
    kernel = "q8" if gguf_type == "Q8_0" else "q4"
    return QuantizedWeight(
        kernel, torch.from_numpy(quants), torch.from_numpy(scales), None if mins is None else torch.from_numpy(mins)
    )


def _from_q4_k(blocks: np.ndarray) -> QuantizedWeight:
    """Q4_K: super-blocks of 256 weights, 8 sub-blocks of 32 with 6-bit scales and mins under the super-block's
    fp16 `d` and `dmin`. Each sub-block becomes a Q4_1-style block: scale `d * sc` and min `-dmin * m` are exact
    in fp32 (11 times 6 bits), and its nibbles (the low or high halves of 32 bytes) are repacked into 16 bytes."""
    from gguf.quants import Q4_K

    rows, supers, _ = blocks.shape
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, :, 4:16]).reshape(-1, 12))
    scales = _half(blocks, 0)[..., None] * sc.reshape(rows, supers, 8).astype(np.float32)
    mins = -(_half(blocks, 2)[..., None] * m.reshape(rows, supers, 8).astype(np.float32))
    chunks = blocks[:, :, 16:].reshape(rows, supers, 4, 1, 32)  # sub-block 2c: low nibbles of chunk c, 2c+1 high
    weights = ((chunks >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)) & 0x0F).reshape(rows, -1, 32)
    quants = weights[..., :16] | (weights[..., 16:] << 4)
    return QuantizedWeight(
        "q4",
        torch.from_numpy(np.ascontiguousarray(quants)),
        torch.from_numpy(scales.reshape(rows, -1)),
        torch.from_numpy(np.ascontiguousarray(mins.reshape(rows, -1))),
    )


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight | None:
    """The weights of a fused projection (q/k/v, gate/up) stacked by rows; None if their formats differ."""
    if len({(p.kernel, p.mins is None, p.shape[1]) for p in parts}) != 1:
        return None
    mins = None if parts[0].mins is None else torch.cat([p.mins for p in parts])  # type: ignore[misc]
    return QuantizedWeight(
        parts[0].kernel, torch.cat([p.quants for p in parts]), torch.cat([p.scales for p in parts]), mins
    )


def kernels_available(dtype: torch.dtype) -> bool:
    """Whether the quantized kernels for activations of `dtype` run here: fp32 on x86 CPUs with AVX-512 or AVX2,
    bf16 on AVX512-BF16. EMBER_DISABLE_QUANTIZED_KERNELS=1 turns them off (for A/B comparisons)."""
    library = native.load()
    return (
        library is not None
        and dtype in SUFFIX
        and hasattr(library, f"quantized_linear_q4_{SUFFIX[dtype]}")
        and not os.environ.get("EMBER_DISABLE_QUANTIZED_KERNELS")
    )


class QuantizedMatmul:
    """`x @ weight.T (+ bias)` for x of at most `max_rows` rows, from the blocks (pointers bound once)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        library = native.load()
        assert library is not None
        self.weight, self.bias, self.dtype = weight, bias, dtype  # kept alive: the kernel holds their pointers
        self.out_features, self.in_features = weight.shape
        self.max_rows = MAX_ROWS[dtype]
        self.function = getattr(library, f"quantized_linear_{weight.kernel}_{SUFFIX[dtype]}")
        mins = None if weight.mins is None else weight.mins.data_ptr()
        bias_ptr = None if bias is None else bias.data_ptr()
        self.weight_args = (weight.quants.data_ptr(), weight.scales.data_ptr(), mins, bias_ptr)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        rows = x.shape[0]
        out = torch.empty((rows, self.out_features), dtype=self.dtype)
        self.function(*self.weight_args, x.data_ptr(), out.data_ptr(), rows, self.out_features, self.in_features)
        return out


def usable(weight: QuantizedWeight | None, linear: torch.nn.Linear) -> bool:
    """Whether `weight` can stand in for `linear`'s weight in a kernel that runs here."""
    dtype = linear.weight.dtype
    return (
        weight is not None
        and kernels_available(dtype)
        and weight.shape == tuple(linear.weight.shape)
        and (linear.bias is None or linear.bias.dtype == dtype)
    )
