"""Ember's native CPU kernels: plain C with OpenMP, compiled once on first use and called via ctypes.

Plain C (no PyTorch headers) compiles in about a second, so no build step is needed at install time.
The shared object is cached under the Ember cache directory, keyed by the source and compiler flags.
Where no C compiler is available, `load()` returns None and callers use the PyTorch implementation.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ember.config import cache_dir

logger = logging.getLogger("ember.kernels")

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-std=c11"]


def _library_path() -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + os.uname().machine.encode())
    return cache_dir() / "kernels" / f"paged_decode-{key.hexdigest()[:16]}.so"


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with a warning) when they cannot be built here."""
    if os.environ.get("EMBER_DISABLE_CPU_KERNELS"):
        return None
    target = _library_path()
    if not target.is_file():
        compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if compiler is None:
            logger.warning("no C compiler found: using the slower PyTorch paged attention")
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run(
                [compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True
            )
            if result.returncode != 0:
                logger.warning(
                    "could not compile Ember's CPU kernels (%s); using PyTorch attention", result.stderr.strip()[:500]
                )
                return None
            built.replace(target)
    library = ctypes.CDLL(str(target))
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    for name in ("paged_decode_f32", "paged_decode_bf16"):
        fn = getattr(library, name)
        fn.argtypes = [ptr] * 6 + [i64] * 7 + [f32]
        fn.restype = None
    library.write_kv.argtypes = [ptr] * 5 + [i64] * 6
    library.write_kv.restype = None
    return library


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new keys/values [T, kv_heads, head_dim] at their slots (keys block-transposed)."""
    library = load()
    assert library is not None and slot_mapping.dtype == torch.int64
    k, v = k.contiguous(), v.contiguous()
    kv_heads, num_blocks, block_size, head_dim = v_cache.shape
    library.write_kv(
        k.data_ptr(),
        v.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slot_mapping.data_ptr(),
        k.shape[0],
        kv_heads,
        num_blocks,
        block_size,
        head_dim,
        k.element_size(),
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Single-token queries [D, heads, head_dim] over paged caches: keys [kv_heads, blocks, head_dim, block_size],
    values [kv_heads, blocks, block_size, head_dim]."""
    library = load()
    assert library is not None
    kernel = library.paged_decode_bf16 if q.dtype == torch.bfloat16 else library.paged_decode_f32
    if q.dtype not in (torch.bfloat16, torch.float32) or k_cache.dtype != q.dtype:
        raise TypeError(f"paged decode kernel supports float32 and bfloat16, got {q.dtype} / {k_cache.dtype}")
    q = q.contiguous()
    out = torch.empty_like(q)
    num_decodes, num_heads, head_dim = q.shape
    kv_heads, num_blocks, block_size, _ = v_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert block_tables.dtype == torch.int64 and context_lens.dtype == torch.int64
    kernel(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        context_lens.data_ptr(),
        out.data_ptr(),
        num_decodes,
        num_heads,
        kv_heads,
        num_blocks,
        block_size,
        head_dim,
        block_tables.shape[1],
        scale,
    )
    return out
