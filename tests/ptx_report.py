"""Compile every Triton kernel ahead of time for an H100 (sm_90) on the CPU and print, as JSON, the global and
local memory instructions of each kernel's PTX, whether it uses the tensor cores, its shared memory, and the
registers and spilled bytes ptxas reports (spills are ptxas's choice: they never show in the PTX). Triton's
compiler and ptxas need no GPU. Run in a process of its own (`python -m tests.ptx_report`): under TRITON_INTERPRET=1,
which other tests set, `triton.jit` makes interpreter objects that cannot be compiled."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from collections import Counter
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from ember.kernels import triton_attention, triton_elementwise, triton_qkv, triton_sampling
from ember.kernels.attention_tuning import DEFAULT as TUNING  # the launch options without a tuning file

HOPPER = GPUTarget("cuda", 90, 32)
# Integer arguments that are multiples of 16 at Qwen3-0.6B's shapes (16 heads, hidden 1024, intermediate 3072,
# a q/k/v row of 4096, a vocabulary of 151,936). Triton's JIT specializes such values as divisible by 16 when it
# compiles at run time, which is what lets it vectorize loads at `row * stride + cols`, so the compile here marks
# them too.
ALIGNED_INTS = {"H", "x_stride", "width", "row_stride", "vocab"}
QWEN3 = {"G": 2, "BS": 16, "D": 128, "P": 8, "SOFTCAP": 0.0}  # 16 heads over 8 KV heads, head_dim 128, bf16 layout
DECODE = {**QWEN3, "G_PAD": 16, "PAGES": TUNING.decode_pages, "PREFETCH": TUNING.decode_prefetch,
          "ORDERED": True}  # fmt: skip
PREFILL = {**QWEN3, "PAGES": TUNING.prefill_pages, "PREFETCH": TUNING.prefill_prefetch}
ATTENTION_INTS = {"H": "i32", "KVH": "i32", "NB": "i32", "MAXB": "i32"}
DECODE_SIGNATURE = {"q": "*bf16", "k_cache": "*bf16", "v_cache": "*bf16", "tables": "*i64", "lens": "*i64",
                    "order": "*i64", "out": "*bf16", "mid_out": "*fp32", "mid_lse": "*fp32", "scale": "fp32",
                    **ATTENTION_INTS, "SPLITS": "i32", "WINDOW": "i32"}  # fmt: skip
PREFILL_SIGNATURE = {"q": "*bf16", "k_cache": "*bf16", "v_cache": "*bf16", "out": "*bf16", "tables": "*i64",
                     "tile_seq": "*i64", "tile_first": "*i64", "q_starts": "*i64", "q_lens": "*i64",
                     "ctx_lens": "*i64", "scale": "fp32", **ATTENTION_INTS, "WINDOW": "i32"}  # fmt: skip

# name -> (kernel, signature, constants, launch options)
KERNELS: dict[str, tuple[Any, dict[str, str], dict[str, Any], dict[str, int]]] = {
    **{
        f"decode-direct{direct}-stages{stages}": (
            triton_attention._decode_split_kernel, DECODE_SIGNATURE,
            {**DECODE, "DIRECT": direct, "DOT_FP32": False, "IEEE": False},
            {"num_stages": stages, "num_warps": TUNING.decode_warps},
        )
        for direct in (True, False) for stages in (1, 2, 3)
    },
    **{  # several blocks per loop trip: [pages, block, dim] tiles
        f"decode-pages{pages}-warps{warps}": (
            triton_attention._decode_split_kernel, DECODE_SIGNATURE,
            {**DECODE, "PAGES": pages, "DIRECT": True, "DOT_FP32": False, "IEEE": False},
            {"num_stages": 1, "num_warps": warps},
        )
        for pages in (2, 4) for warps in (2, 4)
    },
    "decode-no-prefetch": (  # one block a trip, its table entry, keys and values loaded one after another
        triton_attention._decode_split_kernel, DECODE_SIGNATURE,
        {**DECODE, "PREFETCH": False, "DIRECT": True, "DOT_FP32": False, "IEEE": False},
        {"num_stages": 1, "num_warps": TUNING.decode_warps},
    ),
    **{
        f"prefill-m{block_m}": (
            triton_attention._prefill_kernel, PREFILL_SIGNATURE,
            {**PREFILL, "BLOCK_M": block_m, "DOT_FP32": False, "IEEE": False}, {},
        )
        for block_m in (16, 32, 64)  # the CPU's, the CUDA default (64), and the one between
    },
    **{  # several blocks of keys per loop trip: [64, 16 * pages] score tiles
        f"prefill-m64-pages{pages}": (
            triton_attention._prefill_kernel, PREFILL_SIGNATURE,
            {**PREFILL, "BLOCK_M": 64, "PAGES": pages, "DOT_FP32": False, "IEEE": False}, {},
        )
        for pages in (2, 4)
    },
    "prefill-m64-no-prefetch": (  # one block a trip, its table entry, keys and values loaded one after another
        triton_attention._prefill_kernel, PREFILL_SIGNATURE,
        {**PREFILL, "BLOCK_M": 64, "PREFETCH": False, "DOT_FP32": False, "IEEE": False}, {},
    ),
    # fp32 (the dtype of the engine-level GPU tests): P = 4, products in full precision ("ieee")
    "decode-fp32": (
        triton_attention._decode_split_kernel, {k: v.replace("bf16", "fp32") for k, v in DECODE_SIGNATURE.items()},
        {**DECODE, "P": 4, "PREFETCH": False, "DIRECT": True, "DOT_FP32": True, "IEEE": True},
        {"num_warps": TUNING.decode_warps, "num_stages": TUNING.decode_stages},
    ),
    "prefill-fp32": (
        triton_attention._prefill_kernel, {k: v.replace("bf16", "fp32") for k, v in PREFILL_SIGNATURE.items()},
        {**PREFILL, "P": 4, "BLOCK_M": 64, "PREFETCH": False, "DOT_FP32": True, "IEEE": True},
        {"num_warps": triton_attention.PREFILL_WARPS_FP32},
    ),
    # a float8 cache (--kv-cache-dtype fp8): 16 elements a 16-byte group
    "decode-fp8": (
        triton_attention._decode_split_kernel,
        {**DECODE_SIGNATURE, "k_cache": "*fp8e4nv", "v_cache": "*fp8e4nv"},
        {**DECODE, "P": 16, "DIRECT": True, "DOT_FP32": False, "IEEE": False},
        {"num_warps": TUNING.decode_warps, "num_stages": TUNING.decode_stages},
    ),
    "prefill-fp8": (
        triton_attention._prefill_kernel, {**PREFILL_SIGNATURE, "k_cache": "*fp8e4nv", "v_cache": "*fp8e4nv"},
        {**PREFILL, "P": 16, "BLOCK_M": 64, "DOT_FP32": False, "IEEE": False}, {},
    ),
    # Gemma 2's soft-capped scores (its 2B's shape: 8 heads over 4 KV heads, head_dim 256)
    "decode-softcap": (
        triton_attention._decode_split_kernel, DECODE_SIGNATURE,
        {**DECODE, "D": 256, "SOFTCAP": 50.0, "PREFETCH": False, "DIRECT": False, "DOT_FP32": False, "IEEE": False},
        {"num_warps": TUNING.decode_warps, "num_stages": TUNING.decode_stages},
    ),
    "prefill-softcap": (
        triton_attention._prefill_kernel, PREFILL_SIGNATURE,
        {**PREFILL, "D": 256, "SOFTCAP": 50.0, "BLOCK_M": 64, "PREFETCH": False, "DOT_FP32": False, "IEEE": False},
        {},
    ),
    "decode-merge": (
        triton_attention._decode_merge_kernel,
        {"mid_out": "*fp32", "mid_lse": "*fp32", "out": "*bf16", "SPLITS": "i32"}, {"S_PAD": 8, "D": 128}, {},
    ),
    **{
        name: (
            triton_attention._write_kv_kernel,
            {"k": "*bf16", "v": "*bf16", "k_cache": cache, "v_cache": cache, "slots": "*i64", "NB": "i32",
             "KVH": "i32"},
            {"BS": 16, "D": 128, "P": 16 if cache == "*fp8e4nv" else 8, "HEADS": 8}, {},
        )
        for name, cache in (("write-kv", "*bf16"), ("write-kv-fp8", "*fp8e4nv"))
    },
    **{  # Qwen3's q/k norms, rotary and the cache store; Llama's: rotary and the store
        name: (
            triton_qkv._qkv_to_cache_kernel,
            {"qkv": "*bf16", "q_out": "*bf16", "q_weight": "*bf16", "k_weight": "*bf16", "cos": "*fp32",
             "sin": "*fp32", "k_cache": cache, "v_cache": cache, "slots": "*i64", "row_stride": "i32",
             "eps": "fp32", "H": "i32", "KVH": "i32", "NB": "i32"},
            {"HALF": 64, "QK_PAD": 32, "KV_PAD": 8, "BS": 16, "P": 16 if cache == "*fp8e4nv" else 8, "NORM": norm,
             "UNIT_OFFSET": False}, {},
        )
        for name, norm, cache in (("qkv-to-cache-norms", True, "*bf16"), ("qkv-to-cache", False, "*bf16"),
                                  ("qkv-to-cache-fp8", True, "*fp8e4nv"))
    },
    **{
        name: (
            triton_elementwise._rms_norm_kernel,
            {"x": "*bf16", "residual": "*bf16", "weight": "*bf16", "out": "*bf16", "x_stride": "i32", "H": "i32",
             "eps": "fp32"},
            {"HAS_RESIDUAL": True, "BLOCK": 1024, "UNIT_OFFSET": gemma}, {},
        )
        for name, gemma in (("rms-norm", False), ("rms-norm-gemma", True))  # Llama's norm, Gemma's
    },
    "rotary": (
        triton_elementwise._rotary_kernel,
        {"x": "*bf16", "cos": "*fp32", "sin": "*fp32", "row_stride": "i32", "heads": "i32"},
        {"HALF": 64, "HEADS": 16}, {},
    ),
    **{
        name: (
            triton_elementwise._silu_and_mul_kernel, {"gate_up": "*bf16", "out": "*bf16", "width": "i32"},
            {"BLOCK": 1024, "GELU": gelu}, {},
        )
        for name, gelu in (("silu-and-mul", False), ("gelu-and-mul", True))
    },
    "top-k-top-p": (
        triton_sampling._threshold_kernel,
        {"logits": "*fp32", "row_stride": "i32", "vocab": "i32", "top_k": "*i32", "top_p": "*fp32", "out": "*fp32"},
        {"BLOCK": triton_sampling.BLOCK, "UNROLL": triton_sampling.UNROLL}, {"num_warps": triton_sampling.NUM_WARPS},
    ),
    "gumbel-race": (
        triton_sampling._gumbel_race_kernel,
        {"logits": "*fp32", "row_stride": "i32", "vocab": "i32", "seed": "i32", "out": "*i64"},
        {"BLOCK": triton_sampling.RACE_BLOCK}, {"num_warps": triton_sampling.RACE_WARPS},
    ),
}  # fmt: skip


def compile_kernel(kernel: Any, signature: dict[str, str], constants: dict[str, Any], options: dict[str, int]) -> Any:
    """`kernel` compiled for sm_90; pointer arguments are 16-byte aligned, as PyTorch allocates them."""
    signature = {**signature, **dict.fromkeys(constants, "constexpr")}
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, (name, kind) in enumerate(signature.items())
        if kind.startswith("*") or name in ALIGNED_INTS
    }
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=aligned)
    return triton.compile(source, target=HOPPER, options={"num_warps": 4, **options})


def ptxas_usage(ptx: str) -> dict[str, int]:
    """Registers per thread and spilled bytes (stores + loads), from `ptxas -v` on the kernel's PTX."""
    with tempfile.TemporaryDirectory() as folder:
        source = f"{folder}/kernel.ptx"
        with open(source, "w") as f:
            f.write(ptx)
        arch = f"sm_{HOPPER.arch}a"
        command = [get_ptxas(HOPPER.arch).path, "-v", f"-arch={arch}", source, "-o", f"{folder}/kernel.cubin"]
        info = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", info)
    return {"registers": int(re.search(r"Used (\d+) registers", info).group(1)), "spilled_bytes": sum(map(int, spills))}  # type: ignore[union-attr]


def report() -> dict[str, dict[str, Any]]:
    result = {}
    for name, (kernel, signature, constants, options) in KERNELS.items():
        compiled = compile_kernel(kernel, signature, constants, options)
        ptx = compiled.asm["ptx"]
        ops = Counter(re.findall(r"(?:ld|st)\.(?:global|local)[.\w]*", ptx))
        result[name] = {
            "memory_ops": dict(ops),
            "tensor_cores": "mma" in ptx,
            "wgmma": "wgmma.mma_async" in ptx,
            "shared_bytes": compiled.metadata.shared,
            "warps": compiled.metadata.num_warps,
            **ptxas_usage(ptx),
        }
    return result


if __name__ == "__main__":
    print(json.dumps(report()))
