"""benchmarks/gpu/bench.py end to end on its CPU fallback (a tiny Qwen3 shape): the script a GPU machine runs
once must not fail there for a reason the CPU could have shown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs the full shape (minutes)")
def test_gpu_benchmark_script_runs_on_its_cpu_fallback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu/bench.py"), "--results", str(tmp_path), "--hf-cb-seconds", "60"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "results.json").read_text())
    engines = [run["engine"] for run in report["runs"]]
    assert engines == ["ember", "hf-continuous-batching", "hf-naive"]
    ember, continuous, naive = report["runs"]
    assert ember["output_tokens"] == continuous["output_tokens"] == 345  # every request, exactly its length
    assert naive["requests"] == 4 and naive["output_tokens"] > 0
    assert "ember x" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs the full shapes")
def test_kernel_benchmark_script_runs_on_its_cpu_fallback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu/kernel_times.py"), "--results", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "kernels.json").read_text())
    kernels = {row["kernel"] for row in report["rows"]}
    assert {"decode attention", "prefill attention", "write kv", "rms norm", "silu and mul"} <= kernels
    assert {"decode step (graph + logits)", "sampler greedy"} <= kernels
    assert all(row["us"] > 0 and row["floor_us"] > 0 for row in report["rows"])
