"""Ember's native CPU kernels: plain C with OpenMP, compiled once on first use and called via ctypes.

Plain C (no PyTorch headers) compiles in about a second, so no build step is needed at install time.
All sources in `csrc/` build into one shared object, cached under the Ember cache directory and keyed by
the sources and compiler flags. Where no C compiler is available, `load()` returns None and callers use
the PyTorch implementations.
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

from ember.config import cache_dir

logger = logging.getLogger("ember.kernels")

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.c"))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-std=c11"]

_ptr, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES: dict[str, list[type]] = {
    "write_kv": [_ptr] * 5 + [_i64] * 6,
    "paged_decode_f32": [_ptr] * 9 + [_i64] * 7 + [_f32, _i64, _f32],
    "paged_decode_bf16": [_ptr] * 9 + [_i64] * 7 + [_f32, _i64, _f32],
    **{
        f"{kind}_{t}": [_ptr] * 4 + [_i64] * 3 + [_f32]
        for kind in ("rms_norm", "gemma_rms_norm")
        for t in ("f32", "bf16")
    },
    **{f"rotary_{t}": [_ptr] * 3 + [_i64] * 5 for t in ("f32", "bf16")},
    **{f"scale_{t}": [_ptr, _i64, _f32] for t in ("f32", "bf16")},
    **{
        f"{kind}_{t}": [_ptr] * 2 + [_i64] * 2
        for kind in ("silu_and_mul", "gelu_tanh_and_mul")
        for t in ("f32", "bf16")
    },
    "decode_stack": [_ptr] * 8 + [_i64] * 2 + [_ptr],
    **{f"lora_add_{t}": [_ptr] * 7 + [_i64] * 3 for t in ("f32", "bf16")},
}
QUANTIZED_FORMATS = ("q4", "q5", "q6", "q8", "iq4", "q2")  # `quantized_blocks.h`'s
# built only where the compiler targets the instructions they need (fp32 and dequantize: AVX-512 or AVX2; bf16:
# AVX512-BF16; dpbf16: AVX512-BF16; amx: AMX-BF16, and `amx_enable`)
OPTIONAL_SIGNATURES: dict[str, list[type]] = {
    **{f"quantized_linear_{f}_{t}": [_ptr] * 6 + [_i64] * 4 for f in QUANTIZED_FORMATS for t in ("f32", "bf16")},
    **{f"dequantize_{f}_f32": [_ptr] * 4 + [_i64] * 2 for f in QUANTIZED_FORMATS},
    **{f"{many}_linear_{f}_bf16": [_ptr] * 6 + [_i64] * 4 for many in ("amx", "dpbf16") for f in QUANTIZED_FORMATS},
}


def _library_path() -> Path:
    key = hashlib.sha256(b"".join(path.read_bytes() for path in sorted(CSRC.glob("*.[ch]"))))
    key.update(" ".join(FLAGS).encode() + os.uname().machine.encode())
    return cache_dir() / "kernels" / f"ember-{key.hexdigest()[:16]}.so"


def _compile(target: Path) -> bool:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: using the slower PyTorch kernels")
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        command = [compiler, *FLAGS, *map(str, SOURCES), "-o", str(built), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            logger.warning("could not compile Ember's CPU kernels (%s); using PyTorch", result.stderr.strip()[:500])
            return False
        built.replace(target)
    return True


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with a warning) when they cannot be built here.

    `EMBER_DISABLE_CPU_KERNELS=1` forces the PyTorch paths (for comparisons and debugging).
    """
    if os.environ.get("EMBER_DISABLE_CPU_KERNELS"):
        return None
    target = _library_path()
    if not target.is_file() and not _compile(target):
        return None
    library = ctypes.CDLL(str(target))
    optional = {name: argtypes for name, argtypes in OPTIONAL_SIGNATURES.items() if hasattr(library, name)}
    for name, argtypes in {**SIGNATURES, **optional}.items():
        fn = getattr(library, name)
        fn.argtypes = argtypes
        fn.restype = None
    for flag in ("has_avx512bf16", "amx_enable"):
        if hasattr(library, flag):
            getattr(library, flag).argtypes = []
            getattr(library, flag).restype = ctypes.c_int
    return library
