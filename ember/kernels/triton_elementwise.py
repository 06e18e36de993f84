"""Triton versions of the fused elementwise ops of `ember.kernels.elementwise` (the CUDA path): RMSNorm with
an optional residual add (Llama's, or Gemma's scaling by 1 + weight), rotary embedding in place, SiLU-and-mul and
GELU-and-mul. Same fp32 math and rounding points as the PyTorch references there."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x, residual, weight, out, x_stride, H, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    UNIT_OFFSET: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    s = tl.load(x + row * x_stride + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s = (s + tl.load(residual + row * H + cols, mask=ok, other=0.0).to(tl.float32)).to(out.dtype.element_ty)
        tl.store(residual + row * H + cols, s, mask=ok)
        s = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / H + eps)
    w = tl.load(weight + cols, mask=ok, other=0.0)
    tl.store(out + row * H + cols, scale_normalized(s * inv, w, UNIT_OFFSET, out.dtype.element_ty), mask=ok)


@triton.jit
def scale_normalized(normalized, weight, UNIT_OFFSET: tl.constexpr, dtype: tl.constexpr):
    """RMSNorm's last step, in `dtype`: Gemma's (UNIT_OFFSET) scales by 1 + weight in fp32 and rounds once,
    Llama's rounds the normalized value before the scaling."""
    w = weight.to(tl.float32)
    if UNIT_OFFSET:
        return (normalized * (1.0 + w)).to(dtype)
    return (w * normalized.to(dtype).to(tl.float32)).to(dtype)


def _launch_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, unit_offset: bool
) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    hidden = rows.shape[1]
    _rms_norm_kernel[(rows.shape[0],)](
        rows, residual if residual is not None else rows, weight, out, rows.stride(0), hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden), UNIT_OFFSET=unit_offset,
    )  # fmt: skip
    return out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    return _launch_rms_norm(x, None, weight, eps, unit_offset)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual); `residual` (contiguous [tokens, hidden]) is updated in place."""
    return _launch_rms_norm(x, residual, weight, eps, unit_offset), residual


@triton.jit
def _rotary_kernel(x, cos, sin, row_stride, heads, HALF: tl.constexpr, HEADS: tl.constexpr):
    """One program per token rotates all its heads: a [heads, head_dim / 2] tile whose rows are contiguous,
    so the loads are 16-byte vectors (a program per (token, head) moved 2 bytes per thread)."""
    row = tl.program_id(0)
    head = tl.arange(0, HEADS)[:, None]
    i = tl.arange(0, HALF)[None, :]
    ok = head < heads
    first = x + row * row_stride + head * 2 * HALF + i
    x1 = tl.load(first, mask=ok).to(tl.float32)
    x2 = tl.load(first + HALF, mask=ok).to(tl.float32)
    c = tl.load(cos + row * HALF + i)
    s = tl.load(sin + row * HALF + i)
    tl.store(first, rotate_first(x1, x2, c, s).to(x.dtype.element_ty), mask=ok)
    tl.store(first + HALF, rotate_second(x1, x2, c, s).to(x.dtype.element_ty), mask=ok)


@triton.jit
def rotate_first(x1, x2, cos, sin):
    """The first half of a head rotated ("rotate half" layout), in fp32."""
    return x1 * cos - x2 * sin


@triton.jit
def rotate_second(x1, x2, cos, sin):
    return x2 * cos + x1 * sin


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [tokens, heads, head_dim] in place (heads of a token contiguous); cos/sin [tokens, head_dim/2]."""
    tokens, heads, head_dim = x.shape
    assert x.stride(2) == 1 and x.stride(1) == head_dim
    _rotary_kernel[(tokens,)](
        x, cos.contiguous(), sin.contiguous(), x.stride(0), heads, HALF=head_dim // 2,
        HEADS=triton.next_power_of_2(heads),
    )  # fmt: skip


@triton.jit
def _silu_and_mul_kernel(gate_up, out, width, BLOCK: tl.constexpr, GELU: tl.constexpr):
    """act(gate) * up, act = x * sigmoid(a): SiLU with a = x, GELU's tanh form with a = 2 sqrt(2/pi) (x + 0.044715
    x^3) (0.5 (1 + tanh z) = sigmoid(2 z))."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    gate = tl.load(gate_up + row * 2 * width + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up + row * 2 * width + width + cols, mask=ok, other=0.0).to(tl.float32)
    a = 1.5957691216057308 * (gate + 0.044715 * gate * gate * gate) if GELU else gate
    act = (gate / (1.0 + tl.exp(-a))).to(out.dtype.element_ty).to(tl.float32)
    tl.store(out + row * width + cols, (act * up).to(out.dtype.element_ty), mask=ok)


def silu_and_mul(gate_up: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """silu(gate) * up, or (`gelu`) GELU's tanh form of it."""
    tokens, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(tokens, width, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(width))
    _silu_and_mul_kernel[(tokens, triton.cdiv(width, block))](gate_up.contiguous(), out, width, BLOCK=block, GELU=gelu)
    return out
