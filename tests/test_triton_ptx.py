"""Every Triton kernel compiled ahead of time for an H100 (sm_90), here on the CPU (`tests/ptx_report.py`).
The interpreter tests check what the kernels compute; these check what the interpreter cannot: that each
kernel compiles for the GPU at Qwen3-0.6B's shapes, loads the KV cache in 16-byte vectors (bandwidth is what
decode attention is made of), uses the tensor cores where it should, spills no registers (as ptxas reports)
and fits an H100's shared memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ptx() -> dict[str, dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EMBER_KERNELS")}
    result = subprocess.run(
        [sys.executable, "-m", "tests.ptx_report"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


H100_SHARED_BYTES = 227 * 1024  # the most one block may use (opted in)


PREFILL_VARIANTS = [*(f"prefill-m{block_m}" for block_m in (16, 32, 64)), "prefill-m64-pages2", "prefill-m64-pages4"]
DECODE_VARIANTS = [f"decode-direct{direct}-stages{stages}" for direct in (True, False) for stages in (1, 2, 3)] + [
    f"decode-pages{pages}-warps{warps}" for pages in (2, 4) for warps in (2, 4)
]


@pytest.mark.parametrize(
    "kernel", [*PREFILL_VARIANTS, *DECODE_VARIANTS, "decode-softcap", "prefill-softcap", "decode-fp8", "prefill-fp8"]
)
def test_attention_loads_the_cache_in_16_byte_vectors(ptx: dict, kernel: str) -> None:
    ops = ptx[kernel]["memory_ops"]
    assert not [op for op in ops if op.startswith("ld.global") and op.endswith(".b16")], ops  # one bf16 per load
    assert ops.get("ld.global.v4.b32", 0) >= 2, ops
    assert ptx[kernel]["tensor_cores"]  # QK and PV through mma, GQA heads padded to 16 rows in decode


def test_cuda_prefill_tiles_use_hopper_warpgroup_mma(ptx: dict) -> None:
    """Why CUDA's prefill tiles are 64 query rows: then the products run as `wgmma` on sm_90."""
    assert ptx["prefill-m64"]["wgmma"] and not ptx["prefill-m16"]["wgmma"]


@pytest.mark.parametrize(
    "kernel",
    ["write-kv", "write-kv-fp8", "qkv-to-cache", "qkv-to-cache-norms", "qkv-to-cache-fp8", "rms-norm",
     "rms-norm-gemma", "rotary", "silu-and-mul", "gelu-and-mul"],
)  # fmt: skip
def test_per_token_kernels_move_16_byte_vectors(ptx: dict, kernel: str) -> None:
    """Each thread loads 16 bytes of a token's row. (A token's values land in 2-byte steps in the CUDA layout,
    P tokens interleaved per dim: the price of 16-byte loads when decode reads them, the side that moves
    gigabytes.)"""
    ops = ptx[kernel]["memory_ops"]
    assert not [op for op in ops if op.startswith("ld.global") and op.endswith(".b16")], ops
    assert ops.get("ld.global.v4.b32", 0) >= 1, ops


def test_top_k_top_p_reads_logits_in_vectors(ptx: dict) -> None:
    """Each of its passes over the vocabulary (a row max, 8 per filter) loads in vectors (two fp32 per thread:
    `triton_sampling.NUM_WARPS` says why not four), `UNROLL` tiles a loop trip in the 16 search passes."""
    from ember.kernels.triton_sampling import UNROLL

    ops = ptx["top-k-top-p"]["memory_ops"]
    assert ops.get("ld.global.v2.b32", 0) == 1 + 16 * UNROLL, ops


def test_gumbel_race_reads_logits_in_16_byte_vectors(ptx: dict) -> None:
    ops = ptx["gumbel-race"]["memory_ops"]
    assert ops.get("ld.global.v4.b32", 0) >= 1 and not ops.get("ld.global.b32"), ops


def test_no_kernel_spills_registers_or_overflows_shared_memory(ptx: dict) -> None:
    """Spills are ptxas's doing, after the PTX: what the PTX's own local loads cannot show (fp32 prefill spilled
    40 bytes at 4 warps)."""
    usage = {name: (k["spilled_bytes"], k["shared_bytes"], k["registers"]) for name, k in ptx.items()}
    assert all(spilled == 0 and shared <= H100_SHARED_BYTES for spilled, shared, _ in usage.values()), usage
    assert all(not [op for op in k["memory_ops"] if ".local" in op] for k in ptx.values())
