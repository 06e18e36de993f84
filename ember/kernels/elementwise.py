"""Fused RMSNorm (+ residual add), rotary embedding and SiLU-and-mul (GELU-and-mul for Gemma).

On the CPU (fp32/bf16) each is one C pass over the activations (`csrc/elementwise.c`); elsewhere, or
without a C compiler, the PyTorch formulation below, which is also the reference the C code follows
(same fp32 math, same rounding points, as HF transformers computes them).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ember.kernels import use_triton
from ember.kernels.native import load

SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _native(x: torch.Tensor) -> ctypes.CDLL | None:
    if x.device.type != "cpu" or x.dtype not in SUFFIX:
        return None
    return load()


def _triton(x: torch.Tensor) -> Any:
    """The Triton kernels module when x lives where they run (CUDA, or the CPU under EMBER_KERNELS=triton)."""
    if not use_triton(x.device):
        return None
    from ember.kernels import triton_elementwise

    return triton_elementwise


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """Llama's RMSNorm (normalize in fp32, round, scale), or with `unit_offset` Gemma's (scale by 1 + weight in
    fp32, then round once)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (xf * (1.0 + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim (`unit_offset`: Gemma's)."""
    if (kernels := _triton(x)) is not None:
        return kernels.rms_norm(x, weight, eps, unit_offset)
    library = _native(x)
    if library is None or weight.dtype != x.dtype:
        return rms_norm_reference(x, weight, eps, unit_offset)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape, dtype=x.dtype)
    getattr(library, f"{NORM_KERNELS[unit_offset]}_{SUFFIX[x.dtype]}")(
        rows.data_ptr(), None, weight.data_ptr(), out.data_ptr(), rows.shape[0], rows.shape[1], rows.stride(0), eps
    )
    return out.view(x.shape)


NORM_KERNELS = {False: "rms_norm", True: "gemma_rms_norm"}  # by unit_offset


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual) for [tokens, hidden]; the native path updates `residual` in place."""
    if (kernels := _triton(x)) is not None and residual.is_contiguous():
        return kernels.add_rms_norm(x, residual, weight, eps, unit_offset)
    library = _native(x)
    if library is None or weight.dtype != x.dtype or not residual.is_contiguous() or x.stride(-1) != 1:
        total = x + residual
        return rms_norm_reference(total, weight, eps, unit_offset), total
    out = torch.empty_like(residual)
    getattr(library, f"{NORM_KERNELS[unit_offset]}_{SUFFIX[x.dtype]}")(
        x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], x.stride(0), eps
    )
    return out, residual


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [tokens, heads, head_dim] ("rotate half" layout); cos/sin [tokens, head_dim / 2]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [tokens, heads, dims] in place; each head's dims contiguous (a view of a QKV row's heads is, and
    of their leading dims under partial rotary)."""
    tokens, heads, dims = x.shape
    if (kernels := _triton(x)) is not None and x.stride(2) == 1 and x.stride(1) == dims:
        kernels.rotary_(x, cos, sin)
        return
    library = _native(x)
    if library is None or x.stride(2) != 1:
        x.copy_(rotate_reference(x, cos, sin))
        return
    getattr(library, f"rotary_{SUFFIX[x.dtype]}")(
        x.data_ptr(), cos.data_ptr(), sin.data_ptr(), tokens, heads, dims, x.stride(1), x.stride(0)
    )


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for rows [gate | up] of a fused gate/up projection."""
    if (kernels := _triton(gate_up)) is not None:
        return kernels.silu_and_mul(gate_up)
    out = _gated_native(gate_up, "silu_and_mul")
    return _gated_reference(gate_up, F.silu) if out is None else out


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu(gate) * up (GELU's tanh approximation, Gemma's) for rows [gate | up] of a fused gate/up projection."""
    if (kernels := _triton(gate_up)) is not None:
        return kernels.silu_and_mul(gate_up, gelu=True)
    out = _gated_native(gate_up, "gelu_tanh_and_mul")
    return _gated_reference(gate_up, functools.partial(F.gelu, approximate="tanh")) if out is None else out


def _gated_reference(gate_up: torch.Tensor, activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return activation(gate) * up


def _gated_native(gate_up: torch.Tensor, kernel: str) -> torch.Tensor | None:
    """The C kernel's activation(gate) * up; None where it does not run (no compiler, not the CPU, a view)."""
    library = _native(gate_up)
    if library is None or not gate_up.is_contiguous():
        return None
    tokens, width = gate_up.shape
    out = torch.empty(tokens, width // 2, dtype=gate_up.dtype)
    getattr(library, f"{kernel}_{SUFFIX[gate_up.dtype]}")(gate_up.data_ptr(), out.data_ptr(), tokens, width // 2)
    return out


GATED_ACTIVATIONS = {"silu": silu_and_mul, "gelu_tanh": gelu_tanh_and_mul}  # by `ModelConfig.hidden_act`
