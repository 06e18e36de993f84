"""Launch options of the attention kernels, per GPU model.

The best options depend on the card: how many SMs, how many registers and bytes in flight each holds, its memory's
latency. The defaults below were measured on an H200; `ember tune-kernels` (`ember/kernels/tune_attention.py`)
times the candidates on the card at hand and writes the winners as JSON, which the kernels then use. A file is
looked for, first found wins:
1. `$EMBER_ATTENTION_TUNING` (a path; any device, the CPU's interpreter included);
2. `<cache dir>/kernels/attention-<card>.json` (what `ember tune-kernels` writes by default; `cache_dir()` is
   `$EMBER_CACHE_DIR`, else ~/.cache/ember);
3. `ember/kernels/tuned/<card>.json`, shipped with Ember for the cards it was tuned on.
`<card>` is the CUDA device name in lower case, runs of other characters than letters and digits as one "_"
("NVIDIA H200" -> "nvidia_h200"). A file holds the card's options for 16-bit KV caches and, apart, decode's for
float8 caches (`CardTuning`), timed at one attention shape (heads, KV heads, head_dim; recorded in the file): any
option set computes the same attention, so a file tuned at another shape is slower at worst, never wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ember.config import cache_dir

logger = logging.getLogger(__name__)

SHIPPED = Path(__file__).with_name("tuned")


@dataclass(frozen=True)
class AttentionTuning:
    """What the decode and prefill kernels launch with (`triton_attention`)."""

    # Warps and Triton pipeline stages of the decode kernel. Its tiles are small (a GQA group padded to 16 rows
    # against one block of keys): on an H200 at batch 256, contexts of 800 and 1,500, 2 warps and 1 stage took
    # 331 and 615 us a layer against 411 and 766 with 4 warps and 2 stages (92% of the copy floor).
    decode_warps: int = 2
    decode_stages: int = 1
    # Blocks of keys per loop trip of the decode kernel: more bytes in flight per program, more registers.
    decode_pages: int = 1
    # One block a trip, software-pipelined (`_pipelined_trips`): a trip waits on one memory latency instead of
    # three in a row, at 154 registers a thread with Triton 3.6 instead of 106 (6 programs an SM instead of 9).
    decode_prefetch: bool = True
    # Decode programs per SM that `decode_splits` aims at. On an H200 at context 800: batch 64 in 101.9 us with 4
    # splits (16 programs per SM) against 110.0 with one (4 per SM); batch 256 runs 16 per SM with one split
    # already (333.5 us; 4 splits 336.4), and batch 1 is best at 32 splits (6.6 us; 128: 7.2).
    programs_per_sm: int = 16
    # Query rows per prefill program: with 64 the sm_90 build runs its products as Hopper's asynchronous
    # warpgroup MMA (`wgmma`); 16 and 32 get `mma.sync` (tests/test_triton_ptx.py) and ran 3.3x and 2.3x slower
    # on an H200. The CPU's interpreter takes 16 (quicker there).
    prefill_block_m: int = 64
    prefill_warps: int = 4
    # Blocks of keys per loop trip of the prefill kernel: one gives [64, 16] score tiles, small for the tensor
    # cores (16% of the matmul rate on an H200); 4 give [64, 64].
    prefill_pages: int = 1
    # As decode_prefetch: a [64, 16] tile's products take ~70 ns of an SM's tensor cores, three memory
    # latencies in a row microseconds.
    prefill_prefetch: bool = True

    def __post_init__(self) -> None:
        powers = {
            "decode_warps": (1, 2, 4, 8),
            "decode_pages": (1, 2, 4, 8),
            "prefill_block_m": (16, 32, 64, 128),
            "prefill_warps": (1, 2, 4, 8),
            "prefill_pages": (1, 2, 4, 8),
        }
        for name, allowed in powers.items():
            if type(getattr(self, name)) is not int or getattr(self, name) not in allowed:  # (true == 1 in JSON)
                raise ValueError(f"attention tuning: {name} must be one of {allowed}, not {getattr(self, name)!r}")
        for name in ("decode_stages", "programs_per_sm"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"attention tuning: {name} must be a positive integer, not {value!r}")
        for name in ("decode_prefetch", "prefill_prefetch"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"attention tuning: {name} must be true or false, not {getattr(self, name)!r}")


DEFAULT = AttentionTuning()
# The CPU (Triton's interpreter), where each program costs its Python: small query tiles, and few decode splits (at
# 16 programs a core a tiny test's lone sequence took 16 splits, mostly empty; the engine tests on Triton's path ran
# 2 minutes longer in all). The split path still runs there at batch 1, and the kernel tests set the split count.
INTERPRETER = AttentionTuning(prefill_block_m=16, programs_per_sm=2)
# What a float8 cache (`--kv-cache-dtype fp8`) may set apart: its blocks are half the bytes, so decode's best
# blocks a trip and splits may differ. Its prefill takes the 16-bit cache's options (the query-tile height is
# chosen before the cache is seen).
FLOAT8_OPTIONS = ("decode_warps", "decode_stages", "decode_pages", "decode_prefetch", "programs_per_sm")
OPTIONS = tuple(field.name for field in dataclasses.fields(AttentionTuning))


@dataclass(frozen=True)
class CardTuning:
    """A card's launch options: for 16-bit KV caches (`wide`) and for float8 ones (`float8`: `wide` with
    FLOAT8_OPTIONS of its own)."""

    wide: AttentionTuning
    float8: AttentionTuning

    @classmethod
    def same(cls, tuning: AttentionTuning) -> CardTuning:
        return cls(tuning, tuning)

    def for_cache(self, dtype: torch.dtype | None) -> AttentionTuning:
        return self.float8 if dtype is not None and dtype.itemsize == 1 else self.wide


def card_name(device: torch.device) -> str:
    """The file-name form of a CUDA device's name."""
    return card_slug(torch.cuda.get_device_name(device))


def card_slug(name: str) -> str:
    """A device name in lower case, runs of other characters than letters and digits as one "_"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def user_tuning_path(card: str) -> Path:
    """Where `ember tune-kernels` writes by default, and where the kernels look second."""
    return cache_dir() / "kernels" / f"attention-{card}.json"


def load(path: Path) -> CardTuning:
    """The options in a tuning file: its "attention" object, and its optional "attention_fp8" (FLOAT8_OPTIONS for
    float8 caches); other keys are notes (the card, the shape, the times). Options this version does not know (a
    file from another version) are left out with a warning; options it lacks take their defaults. Raises ValueError
    naming the file when it is not a tuning file or a value is invalid."""
    try:
        content = json.loads(path.read_text())
        wide = AttentionTuning(**_known(path, content["attention"], OPTIONS))
        float8 = _known(path, content.get("attention_fp8", {}), FLOAT8_OPTIONS)
        return CardTuning(wide, dataclasses.replace(wide, **float8))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not an attention tuning file ({error})") from error


def _known(path: Path, options: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(known))
    if unknown:
        logger.warning("%s: options %s left out (this version sets only %s)", path, unknown, ", ".join(known))
    return {name: value for name, value in options.items() if name in known}


def save(path: Path, tuning: CardTuning, notes: dict[str, Any]) -> None:
    """Write `tuning` with `notes` (where and how it was measured) beside it, whole or not at all (a process killed
    while writing leaves the file as it was)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    float8 = {name: getattr(tuning.float8, name) for name in FLOAT8_OPTIONS}
    content = {"attention": dataclasses.asdict(tuning.wide), "attention_fp8": float8, **notes}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(content, indent=2) + "\n")
    partial.replace(path)


def tuning_file(device: torch.device) -> Path | None:
    """The tuning file that applies to `device` (the module docstring says which), or None: the defaults."""
    explicit = os.environ.get("EMBER_ATTENTION_TUNING")
    if explicit:
        return Path(explicit)
    if device.type != "cuda":
        return None
    card = card_name(device)
    return next((path for path in (user_tuning_path(card), SHIPPED / f"{card}.json") if path.is_file()), None)


_override: AttentionTuning | None = None  # set by `launching_with`


def tuning_for(device: torch.device, cache_dtype: torch.dtype | None = None) -> AttentionTuning:
    """The launch options for `device` over a cache of `cache_dtype` (None: 16-bit): those of a `launching_with`
    block, else its tuning file's, else the defaults."""
    return _override or _card_tuning(device).for_cache(cache_dtype)


@contextlib.contextmanager
def launching_with(tuning: AttentionTuning) -> Iterator[None]:
    """Within the block, every kernel launch (and CUDA-graph capture) takes `tuning`, whatever the files say: to
    compare option sets in one process (`bench.py`'s variants)."""
    global _override
    before, _override = _override, tuning
    try:
        yield
    finally:
        _override = before


@functools.cache
def _card_tuning(device: torch.device) -> CardTuning:
    """A device's tuning file's options, else the defaults. Cached: read once a process."""
    path = tuning_file(device)
    if path is None and device.type == "cuda":
        logger.info("attention kernels: default launch options (`ember tune-kernels` tunes them for this GPU)")
    if path is None:
        return CardTuning.same(DEFAULT if device.type == "cuda" else INTERPRETER)
    logger.info("attention kernels: launch options from %s", path)
    return load(path)
