"""Linear layers whose weights are reordered once into oneDNN's blocked layout (CPU only).

`F.linear` on the CPU hands oneDNN a plain row-major weight, and oneDNN re-packs it on every call. At
decode batch sizes that re-packing costs as much as the multiply itself: measured on the project's CPU,
a packed weight makes a 64-row bf16 matmul 1.2-6x faster and an fp32 one about 2.3x faster, with
bit-identical bf16 results. This is what `torch.compile`'s freezing pass does for linears, without the
compile. A linear loaded from GGUF blocks also keeps them, for steps of a few rows (`quantized.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from ember.models import quantized

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """Drop-in for an `nn.Linear` at inference; keeps only the packed weight, so no memory is doubled, and
    multiplies steps of few rows (`quantized.MAX_ROWS`) from the GGUF blocks when given them."""

    def __init__(self, linear: nn.Linear, batch_hint: int, blocks: quantized.QuantizedMatrix | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()
        # beside a dequantized copy only AMX's kernel for many rows beats oneDNN's (NOTES steps 29, 32)
        many_rows = quantized.many_row_kernel() == "amx"
        self.small_steps = (
            None if blocks is None else quantized.QuantizedMatmul(blocks, self.bias, weight.dtype, many_rows)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.small_steps is not None and x.shape[0] <= self.small_steps.max_rows:
            return self.small_steps(x)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        blocks = f", blocks={self.small_steps.weight.kernels}" if self.small_steps is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{blocks}"


def pack_linears(
    model: nn.Module, batch_hint: int = 64, blocks: dict[str, quantized.QuantizedMatrix] | None = None
) -> int:
    """Replace every CPU fp32/bf16 `nn.Linear` in `model` by a `PackedLinear`; returns how many were packed.

    `batch_hint` is the row count oneDNN tunes the layout for (any row count works). A tied LM head is
    packed as its own copy; the embedding keeps the original weight. `blocks` maps module names to GGUF
    blocks, used where a quantized kernel for the linear's dtype runs here.
    """
    blocks = blocks or {}
    if not packing_available():
        return 0
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module.weight.device.type == "cpu"
        and module.weight.dtype in PACKABLE_DTYPES
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        weight = blocks.get(name)
        small_steps = weight if quantized.usable(weight, module) else None
        setattr(model.get_submodule(parent_name), child, PackedLinear(module, batch_hint, small_steps))
    return len(targets)
