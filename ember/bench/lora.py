"""`ember bench lora`: output tok/s and TPOT with no adapter, one adapter, and several adapters mixed in each
batch, in the same run on the same engine.

Without `--lora-modules`, the adapters are random ones of `--lora-rank` on every projection (q, k, v, o, gate,
up, down), written as PEFT directories: what a LoRA costs depends on its shape, not on its values.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.bench.latency import add_batch_sizes_arg, parse_batch_sizes, run_closed_loop, save_report
from ember.bench.workloads import load_workload, positive_int

if TYPE_CHECKING:
    from ember.config import ModelConfig


def write_random_adapter(config: ModelConfig, directory: Path, rank: int, seed: int) -> Path:
    """A PEFT LoRA directory for a model of `config`, with random A and B on every target module."""
    import torch
    from safetensors.torch import save_file

    from ember.models.lora import TARGETS, WEIGHTS_FILE, target_shape

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for target, (module, _) in TARGETS.items():
            out_features, in_features = target_shape(config, target)
            prefix = f"base_model.model.model.layers.{layer}.{module.split('.')[0]}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_FILE))
    adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(TARGETS)}
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config))
    return directory


def bench_lora(args: Any) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    from ember.cli import load_llm

    batch_sizes = parse_batch_sizes(args.batch_sizes)
    console = Console(stderr=True)
    random_adapters = not args.lora_modules
    args.enable_lora = True
    llm = load_llm(args)
    engine = llm.engine
    if random_adapters:
        with (
            console.status(f"writing and loading {args.num_adapters} random adapters of rank {args.lora_rank} ..."),
            tempfile.TemporaryDirectory(prefix="ember-lora-bench-") as tmp,
        ):
            for i in range(args.num_adapters):
                directory = write_random_adapter(engine.model_config, Path(tmp) / str(i), args.lora_rank, seed=i)
                engine.load_lora(f"random-{i}", str(directory))
    names = engine.lora_names
    workload = load_workload(args.workload, engine.model_config.vocab_size, args.num_requests or 32)
    console.print(
        f"workload {workload.name}: {len(workload.requests)} requests, {workload.prompt_tokens} prompt tokens, "
        f"{workload.output_tokens} output tokens; adapters {', '.join(names)}"
    )
    modes: dict[str, list[str | None]] = {"none": [None], "one": names[:1]}
    if len(names) > 1:
        modes[f"{len(names)} mixed"] = list(names)
    run_closed_loop(llm, workload.requests[:1], 1, True, adapters=names[:1])  # warm-up: kernels, allocator
    runs = []
    for batch in batch_sizes:
        for mode, adapters in modes.items():
            engine.reset_prefix_cache()
            with console.status(f"batch {batch}, adapters: {mode} ..."):
                result = run_closed_loop(llm, workload.requests, batch, True, adapters=adapters)
            runs.append({**result, "batch": batch, "adapters": mode})
    table = Table(title=f"ember bench lora: {workload.name}, {engine.loaded.name}")
    for column in ("batch", "adapters", "output tok/s", "vs none", "mean TPOT ms"):
        table.add_column(column, justify="right")
    for run in runs:
        base = next(r for r in runs if r["batch"] == run["batch"] and r["adapters"] == "none")
        table.add_row(
            str(run["batch"]),
            run["adapters"],
            f"{run['output_tps']:.1f}",
            f"{run['output_tps'] / base['output_tps']:.2f}x",
            "-" if run["mean_tpot_ms"] is None else f"{run['mean_tpot_ms']:.1f}",
        )
    Console().print(table)
    report = {
        "workload": workload.name,
        "model": engine.loaded.name,
        "adapters": names,
        "random_adapter_rank": args.lora_rank if random_adapters else None,
        "runs": runs,
    }
    return save_report(args, report)


def add_lora_bench_args(parser: Any) -> None:
    g = parser.add_argument_group("LoRA benchmark")
    g.add_argument("--workload", default="random", help="'random' (default) or a workload JSON")
    g.add_argument("--num-requests", type=positive_int, default=None, help="requests to run (default 32)")
    add_batch_sizes_arg(g)
    g.add_argument(
        "--num-adapters",
        type=positive_int,
        default=4,
        help="random adapters to write and serve when --lora-modules gives none (default 4)",
    )
    g.add_argument("--lora-rank", type=positive_int, default=16, help="rank of the random adapters (default 16)")
    g.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
