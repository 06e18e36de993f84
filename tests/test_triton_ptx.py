"""Every Triton kernel compiled ahead of time for an H100 (sm_90), here on the CPU: Triton's own compiler and
ptxas run without a GPU. The interpreter tests check what the kernels compute; these check what the
interpreter cannot: that each kernel compiles for the GPU at Qwen3-0.6B's shapes, loads the KV cache in
16-byte vectors (bandwidth is what decode attention is made of) and spills no registers."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ember.kernels import triton_attention, triton_elementwise  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
QWEN3 = {"G": 2, "BS": 16, "D": 128, "P": 8}  # 16 heads over 8 KV heads, head_dim 128, bf16 CUDA layout
ATTENTION_INTS = {"H": "i32", "KVH": "i32", "NB": "i32", "MAXB": "i32"}


def compile_ptx(kernel: Any, signature: dict[str, str], constants: dict[str, Any], **options: Any) -> str:
    """PTX of `kernel` for sm_90; pointer arguments are 16-byte aligned, as PyTorch allocates them."""
    signature = {**signature, **dict.fromkeys(constants, "constexpr")}
    aligned = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind.startswith("*")}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned)
    return triton.compile(source, target=HOPPER, options={"num_warps": 4, **options}).asm["ptx"]


def memory_ops(ptx: str) -> Counter[str]:
    return Counter(re.findall(r"(?:ld|st)\.(?:global|local)[.\w]*", ptx))


def assert_vectorized(ops: Counter[str]) -> None:
    """No 2-byte global loads or stores (one bf16 at a time) and no spills to local memory."""
    assert not [op for op in ops if op.endswith(".b16") or ".local" in op], ops
    assert any(".v4." in op for op in ops), ops


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_decode_attention_compiles_with_vector_loads(direct: bool, num_stages: int) -> None:
    signature = {"q": "*bf16", "k_cache": "*bf16", "v_cache": "*bf16", "tables": "*i64", "lens": "*i64",
                 "out": "*bf16", "mid_out": "*fp32", "mid_lse": "*fp32", "scale": "fp32", **ATTENTION_INTS,
                 "SPLITS": "i32"}  # fmt: skip
    constants = {**QWEN3, "G_PAD": 16, "DIRECT": direct, "DOT_FP32": False, "IEEE": False}
    ptx = compile_ptx(triton_attention._decode_split_kernel, signature, constants, num_stages=num_stages)
    assert_vectorized(memory_ops(ptx))
    assert "mma" in ptx  # the GQA heads go through the tensor cores


def test_prefill_attention_compiles_with_vector_loads() -> None:
    signature = {"q": "*bf16", "k_cache": "*bf16", "v_cache": "*bf16", "out": "*bf16", "tables": "*i64",
                 "tile_seq": "*i64", "tile_first": "*i64", "q_starts": "*i64", "q_lens": "*i64",
                 "ctx_lens": "*i64", "scale": "fp32", **ATTENTION_INTS}  # fmt: skip
    constants = {**QWEN3, "BLOCK_M": 16, "DOT_FP32": False, "IEEE": False}
    ptx = compile_ptx(triton_attention._prefill_kernel, signature, constants)
    assert_vectorized(memory_ops(ptx))


@pytest.mark.parametrize(
    ("kernel", "signature", "constants"),
    [
        (
            triton_attention._decode_merge_kernel,
            {"mid_out": "*fp32", "mid_lse": "*fp32", "out": "*bf16", "SPLITS": "i32"},
            {"S_PAD": 8, "D": 128},
        ),
        (
            triton_elementwise._rms_norm_kernel,
            {"x": "*bf16", "residual": "*bf16", "weight": "*bf16", "out": "*bf16", "x_stride": "i32", "H": "i32",
             "eps": "fp32"},
            {"HAS_RESIDUAL": True, "BLOCK": 1024},
        ),
        (
            triton_elementwise._rotary_kernel,
            {"x": "*bf16", "cos": "*fp32", "sin": "*fp32", "row_stride": "i32"},
            {"HALF": 64},
        ),
        (
            triton_attention._write_kv_kernel,
            {"k": "*bf16", "v": "*bf16", "k_cache": "*bf16", "v_cache": "*bf16", "slots": "*i64", "NB": "i32",
             "KVH": "i32"},
            {"BS": 16, "D": 128, "P": 8},
        ),
        (
            triton_elementwise._silu_and_mul_kernel,
            {"gate_up": "*bf16", "out": "*bf16", "width": "i32"},
            {"BLOCK": 1024},
        ),
    ],
    ids=["decode-merge", "rms-norm", "rotary", "write-kv", "silu-and-mul"],
)  # fmt: skip
def test_other_kernels_compile_without_spills(kernel: Any, signature: dict, constants: dict) -> None:
    """(A token's values land in 2-byte steps in the CUDA layout, P tokens interleaved per dim: the price of
    16-byte loads when decode reads them, the side that moves gigabytes.)"""
    ops = memory_ops(compile_ptx(kernel, signature, constants))
    assert not [op for op in ops if ".local" in op], ops
