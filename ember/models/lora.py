"""LoRA adapters served beside the base model: many adapters, and the base, in one batch.

An adapter is a PEFT directory (`adapter_config.json` + `adapter_model.safetensors`). Its weights are never
merged into the base: each adapted linear adds `scale * B(A(x))` to the base's output for the rows (tokens) of
requests that asked for that adapter, so requests of different adapters share every step. Ember's fused
projections (QKV, gate/up) take the adapters of their parts as one: the parts' A matrices are stacked (one
shrink matmul) and their B matrices laid block-diagonally into one [out, sum of ranks] matrix (one expand
matmul); the CPU's native kernel skips the zeros, reading each rank row only over its part's columns. A step
without adapter rows costs one empty loop per linear.
"""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ember.config import ModelConfig
from ember.kernels import native
from ember.kernels.elementwise import SUFFIX

# PEFT module name -> (Ember's fused module under the decoder layer, index of its part; None: the whole module,
# as Phi-3's checkpoints fuse q/k/v and gate/up themselves and its adapters adapt them so)
TARGETS: dict[str, tuple[str, int | None]] = {
    "q_proj": ("self_attn.qkv_proj", 0),
    "k_proj": ("self_attn.qkv_proj", 1),
    "v_proj": ("self_attn.qkv_proj", 2),
    "qkv_proj": ("self_attn.qkv_proj", None),
    "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0),
    "up_proj": ("mlp.gate_up_proj", 1),
    "gate_up_proj": ("mlp.gate_up_proj", None),
    "down_proj": ("mlp.down_proj", 0),
}
# config keys of PEFT features Ember does not serve; each must be unset, false or empty
UNSUPPORTED_CONFIG = (
    "use_dora",
    "modules_to_save",
    "alpha_pattern",
    "fan_in_fan_out",
    "lora_bias",
    "layer_replication",
    "trainable_token_indices",
    "alora_invocation_tokens",
)
WEIGHTS_FILE = "adapter_model.safetensors"
# On the CPU, steps of up to this many rows per adapter in the step (at most 4 counted) take the native kernel:
# measured on a rank-48 QKV in bf16, it took 11 us at 1 row against 44 for PyTorch, 40 against 238 at 8 rows of
# 4 adapters, 157 against 289 at 32 rows of 4, but 169 against 71 at 32 rows of one adapter.
NATIVE_ROWS_PER_ADAPTER = 16


def fused_parts(config: ModelConfig) -> dict[str, list[int]]:
    """Output sizes of the parts of each adaptable module, in the order they sit in its output."""
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    inter = config.intermediate_size
    return {
        "self_attn.qkv_proj": [q, kv, kv],
        "self_attn.o_proj": [config.hidden_size],
        "mlp.gate_up_proj": [inter, inter],
        "mlp.down_proj": [config.hidden_size],
    }


@dataclass
class LoRAWeights:
    """One adapter on one fused linear: `delta = (x @ a.T) @ b_t`, the scale already in `b_t`."""

    a: torch.Tensor  # [sum of the parts' ranks, in_features]
    b_t: torch.Tensor  # [sum of ranks, out_features]: B transposed, block-diagonal over the parts
    columns: torch.Tensor  # int64 [sum of ranks, 2], on the CPU: each rank row's part, as [start, end) of b_t's columns


@dataclass
class LoRAAdapter:
    name: str
    path: Path
    adapter_id: int  # > 0, never reused: the prefix cache keys an adapter's KV by it
    rank: int  # the largest rank of its modules
    weights: dict[str, LoRAWeights] = field(default_factory=dict)  # "layers.{i}.{fused module}" -> weights


def adapter_files(name: str, path: str | Path) -> tuple[Path, Path]:
    """A PEFT directory's config and weights files; raises ValueError when either is missing (checked before a
    model loads, so that a wrong path is reported at once)."""
    path = Path(path).expanduser()
    config_file, weights_file = path / "adapter_config.json", path / WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise ValueError(f"LoRA adapter {name!r}: {path} must hold adapter_config.json and {WEIGHTS_FILE} (PEFT)")
    return config_file, weights_file


def load_adapter(
    name: str, path: str | Path, adapter_id: int, config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> LoRAAdapter:
    """Read a PEFT LoRA directory for a model of `config`; raises ValueError saying what does not fit."""
    from safetensors.torch import load_file

    config_file, weights_file = adapter_files(name, path)
    path = config_file.parent
    peft = json.loads(config_file.read_text())
    if peft.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {name!r}: peft_type {peft.get('peft_type')!r} is not LORA")
    unsupported = [key for key in UNSUPPORTED_CONFIG if peft.get(key)]
    if unsupported:
        raise ValueError(f"LoRA adapter {name!r}: Ember does not serve adapters with {', '.join(unsupported)}")
    alpha, rslora = float(peft.get("lora_alpha", peft.get("r", 8))), bool(peft.get("use_rslora"))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        layer, target, matrix = _parse_key(name, key)
        if layer >= config.num_hidden_layers:
            raise ValueError(f"LoRA adapter {name!r}: {key} is for layer {layer}, the model has "
                             f"{config.num_hidden_layers}")  # fmt: skip
        pairs.setdefault((layer, target), {})[matrix] = tensor
    if not pairs:
        raise ValueError(f"LoRA adapter {name!r}: {weights_file} holds no LoRA weights")
    sizes = fused_parts(config)
    parts: dict[str, list[tuple[int | None, torch.Tensor, torch.Tensor]]] = {}  # fused key -> (part, A, scaled B)
    for (layer, target), pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA adapter {name!r}: layer {layer} {target} lacks one of lora_A, lora_B")
        a, b = pair["lora_A"].float(), pair["lora_B"].float()
        module, part = TARGETS[target]
        (out_features, in_features), rank = target_shape(config, target), a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_features or b.shape != (out_features, rank):
            raise ValueError(
                f"LoRA adapter {name!r}: layer {layer} {target} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                f"but this model needs A [rank, {in_features}] and B [{out_features}, rank]: an adapter of "
                "another base model?"
            )
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        parts.setdefault(f"layers.{layer}.{module}", []).append((part, a, b * scale))
    adapter = LoRAAdapter(name, path, adapter_id, rank=max(a.shape[0] for p in parts.values() for _, a, _ in p))
    for key, module_parts in parts.items():
        adapter.weights[key] = _fuse(module_parts, sizes[key.split(".", 2)[2]], dtype, device)
    return adapter


def target_shape(config: ModelConfig, target: str) -> tuple[int, int]:
    """(out_features, in_features) of a PEFT target module (`TARGETS`) of this model."""
    module, part = TARGETS[target]
    in_features = {
        "self_attn.o_proj": config.num_attention_heads * config.head_dim,
        "mlp.down_proj": config.intermediate_size,
    }.get(module, config.hidden_size)
    sizes = fused_parts(config)[module]
    return (sum(sizes) if part is None else sizes[part]), in_features


def _parse_key(name: str, key: str) -> tuple[int, str, str]:
    """(layer, PEFT module, "lora_A" | "lora_B") of a PEFT weight name such as
    `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`."""
    fields = key.split(".")
    try:
        index = fields.index("layers")
        layer, target, matrix = int(fields[index + 1]), fields[index + 3], fields[index + 4]
    except (ValueError, IndexError):
        raise ValueError(
            f"LoRA adapter {name!r}: cannot serve weight {key!r}; Ember adapts the decoder layers' attention and "
            f"MLP projections ({', '.join(TARGETS)})"
        ) from None
    if target not in TARGETS or matrix not in ("lora_A", "lora_B") or fields[-1] != "weight":
        raise ValueError(
            f"LoRA adapter {name!r}: cannot serve weight {key!r}; Ember adapts {', '.join(TARGETS)} with lora_A "
            "and lora_B weights"
        )
    return layer, target, matrix


def _fuse(
    parts: list[tuple[int | None, torch.Tensor, torch.Tensor]],
    sizes: list[int],
    dtype: torch.dtype,
    device: torch.device,
) -> LoRAWeights:
    """Stack the parts' A matrices and place their B matrices block-diagonally (a missing part adds nothing; part
    None spans the whole module)."""
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    total_rank = sum(a.shape[0] for _, a, _ in parts)
    b_t = torch.zeros(total_rank, sum(sizes))
    columns = torch.empty(total_rank, 2, dtype=torch.int64)
    rank_row = 0
    for part, a, b in parts:
        start, end = (0, sum(sizes)) if part is None else (offsets[part], offsets[part] + sizes[part])
        rows = slice(rank_row, rank_row + a.shape[0])
        b_t[rows, start:end] = b.t()
        columns[rows] = torch.tensor([start, end])
        rank_row += a.shape[0]
    a_full = torch.cat([a for _, a, _ in parts])
    return LoRAWeights(a_full.to(device, dtype).contiguous(), b_t.to(device, dtype).contiguous(), columns)


class LoRABatch:
    """Which rows of the current step use which adapter, shared by every `LoRALinear` of a model and set by
    `LoRAModel.set_step` before each forward: per adapter its rows (None: every row of the step), and on the CPU
    each row's adapter slot (-1: none) for the native kernel."""

    def __init__(self) -> None:
        self.groups: list[tuple[int, torch.Tensor | None]] = []  # (adapter id, row indices)
        self.slots: torch.Tensor | None = None  # int64 [rows]


class LoRALinear(nn.Module):
    """A base linear plus the deltas of the adapters whose rows are in the step: on the CPU's few-row steps in
    one native call for all rows, else two matmuls per adapter in the step."""

    def __init__(self, base: nn.Module, batch: LoRABatch, kernel: Callable[..., None] | None) -> None:
        super().__init__()
        self.base = base
        self.batch = batch
        self.kernel = kernel
        self.adapters: dict[int, LoRAWeights] = {}  # by adapter id
        self.table: tuple[ctypes.Array, ...] = ()  # the kernel's (A, B^T, column spans, rank) pointers by slot
        self.set_slots([])

    def set_slots(self, slots: list[LoRAWeights | None]) -> None:
        """The adapters in slot order (None: one that leaves this linear alone), for the native kernel."""
        n = len(slots)
        self.table = (
            (ctypes.c_void_p * n)(*(w.a.data_ptr() if w else None for w in slots)),
            (ctypes.c_void_p * n)(*(w.b_t.data_ptr() if w else None for w in slots)),
            (ctypes.c_void_p * n)(*(w.columns.data_ptr() if w else None for w in slots)),
            (ctypes.c_int64 * n)(*(w.a.shape[0] if w else 0 for w in slots)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.batch
        if not batch.groups:
            return y
        if batch.slots is not None and self.kernel is not None:  # a step of few rows, on the CPU
            x = x.contiguous()
            self.kernel(
                x.data_ptr(), y.data_ptr(), *self.table, batch.slots.data_ptr(), x.shape[0], y.shape[1], x.shape[1]
            )
            return y
        for adapter_id, rows in batch.groups:
            weights = self.adapters.get(adapter_id)
            if weights is None:  # the adapter leaves this module alone
                continue
            if rows is None:
                y.addmm_(x @ weights.a.t(), weights.b_t)
            else:
                y.index_add_(0, rows, (x.index_select(0, rows) @ weights.a.t()) @ weights.b_t)
        return y


class LoRAModel:
    """The model's adaptable linears wrapped in `LoRALinear`, and the adapters loaded into them, by name (in
    load order: an adapter's slot is its place in `adapters`)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device, max_rank: int | None = None) -> None:
        self.config: ModelConfig = model.config
        self.dtype, self.device, self.max_rank = dtype, device, max_rank
        self.batch = LoRABatch()
        self.adapters: dict[str, LoRAAdapter] = {}
        self._slot_of: dict[int, int] = {}  # adapter id -> slot
        self._next_id = 1
        self.kernel = native_kernel(dtype, device)
        self.linears: dict[str, LoRALinear] = {}
        for index, layer in enumerate(model.layers):
            for module in fused_parts(self.config):
                parent_name, _, child = module.rpartition(".")
                parent = layer.get_submodule(parent_name)
                wrapped = LoRALinear(getattr(parent, child), self.batch, self.kernel)
                setattr(parent, child, wrapped)
                self.linears[f"layers.{index}.{module}"] = wrapped

    def load(self, name: str, path: str | Path) -> LoRAAdapter:
        """Load an adapter under `name` (a name not in use); raises ValueError when it cannot be served."""
        if name in self.adapters:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded")
        adapter = load_adapter(name, path, self._next_id, self.config, self.dtype, self.device)
        if self.max_rank is not None and adapter.rank > self.max_rank:
            raise ValueError(f"LoRA adapter {name!r} has rank {adapter.rank}, above --max-lora-rank {self.max_rank}")
        self._next_id += 1
        for key, weights in adapter.weights.items():
            self.linears[key].adapters[adapter.adapter_id] = weights
        self.adapters[name] = adapter
        self._assign_slots()
        return adapter

    def unload(self, name: str) -> None:
        adapter = self.adapters.pop(name)
        for linear in self.linears.values():
            linear.adapters.pop(adapter.adapter_id, None)
        self._assign_slots()

    def _assign_slots(self) -> None:
        self._slot_of = {adapter.adapter_id: slot for slot, adapter in enumerate(self.adapters.values())}
        for key, linear in self.linears.items():
            linear.set_slots([adapter.weights.get(key) for adapter in self.adapters.values()])

    def tables(self) -> list[list[tuple[ctypes.Array, ...]]]:
        """Each layer's native tables, in `fused_parts` order (the C decode stack's qkv, o, gate_up, down)."""
        modules = list(fused_parts(self.config))
        return [[self.linears[f"layers.{i}.{m}"].table for m in modules] for i in range(self.config.num_hidden_layers)]

    def set_step(self, spans: list[tuple[int, int]]) -> bool:
        """Set the rows of the next forward: `spans` holds (adapter id, 0 for none; its row count) per request,
        in row order. Returns whether any row has an adapter."""
        rows_of: dict[int, list[int]] = {}
        slots: list[int] = []
        row = 0
        for adapter_id, num_rows in spans:
            if adapter_id:
                rows_of.setdefault(adapter_id, []).extend(range(row, row + num_rows))
            slots.extend([self._slot_of[adapter_id] if adapter_id else -1] * num_rows)
            row += num_rows
        self.batch.groups = [
            (adapter_id, None if len(rows) == row else torch.tensor(rows, device=self.device))
            for adapter_id, rows in rows_of.items()
        ]
        # the native kernel's time grows with the rows, PyTorch's with the adapters (two matmuls each)
        native = self.kernel is not None and row <= NATIVE_ROWS_PER_ADAPTER * min(len(rows_of), 4)
        self.batch.slots = torch.tensor(slots) if native else None
        return bool(rows_of)


def native_kernel(dtype: torch.dtype, device: torch.device) -> Callable[..., None] | None:
    """The native kernel for activations of `dtype` on the CPU, where it is built; else None."""
    if device.type != "cpu" or dtype not in SUFFIX:
        return None
    library = native.load()
    return None if library is None else getattr(library, f"lora_add_{SUFFIX[dtype]}")
