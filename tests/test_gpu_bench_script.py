"""What a GPU machine runs once (benchmarks/gpu/check.sh), here on the CPU fallback (tiny shapes) with only
what that machine has: PyTorch, Triton and transformers (and what they need). It must not fail there for a
reason the CPU could have shown, such as an import of a server dependency."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# What the GPU machine holds of Ember's needs: PyTorch, Triton and transformers (issue 7), and pytest and httpx
# for the tests check.sh runs there (its image's package list)
GPU_IMAGE = ("torch", "triton", "transformers", "pytest", "httpx")
# Ember's dependencies that the GPU machine's image lacks (its package list as read in 2026-11), left out even
# where a newer local version of one of the above requires them (typer, through transformers, needs pydantic)
SERVER_ONLY = {"gguf", "fastapi", "uvicorn", "pydantic", "xgrammar", "openai", "mcp"}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the scripts run the full shapes")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _with_dependencies(roots: tuple[str, ...]) -> list[metadata.Distribution]:
    """The installed distributions `roots` need, transitively (extras and SERVER_ONLY left out)."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(roots)
    while todo:
        name = _canonical(todo.pop())
        if name in found or name in SERVER_ONLY:
            continue
        try:
            found[name] = dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:  # a requirement of another platform (CUDA wheels, say)
            continue
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(found.values())


@pytest.fixture(scope="module")
def gpu_image_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for `python -S`: a site folder of links to those distributions' files alone."""
    site = tmp_path_factory.mktemp("gpu-image-site")
    for dist in _with_dependencies(GPU_IMAGE):
        for file in dist.files or []:
            top = file.parts[0]
            source = Path(str(dist.locate_file(top)))
            if top != ".." and source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    return {**os.environ, "PYTHONPATH": str(site)}


def run_script(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-S", str(ROOT / script), *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_the_environment_lacks_the_server_dependencies(gpu_image_env: dict[str, str]) -> None:
    """The guard itself: the scripts below would also pass in the full environment if this one leaked it."""
    probe = "import torch, triton, transformers\ntry:\n    import fastapi\nexcept ImportError:\n    print('absent')"
    result = subprocess.run(
        [sys.executable, "-S", "-c", probe], capture_output=True, text=True, timeout=120, env=gpu_image_env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "absent"


def test_gpu_benchmark_script_runs_on_its_cpu_fallback(gpu_image_env: dict[str, str], tmp_path: Path) -> None:
    result = run_script("benchmarks/gpu/bench.py", gpu_image_env, "--results", str(tmp_path), "--hf-cb-seconds", "60")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "results.json").read_text())
    engines = [run["engine"] for run in report["runs"]]
    assert engines == ["ember", "hf-naive", "hf-continuous-batching"]  # naive before HF's batching thread
    ember, naive, continuous = report["runs"]
    assert ember["output_tokens"] == continuous["output_tokens"] == 345  # every request, exactly its length
    assert continuous["finished_requests"] == continuous["requests"] == 16  # all finished within the budget
    assert continuous["finished_tokens"] == 345
    assert naive["requests"] == 4 and naive["output_tokens"] > 0
    assert "ember x" in result.stdout
    # the run's steps by group: every prompt token computed once (no prefix caching), decode groups by rows
    assert sum(group["prompt_tokens"] for group in ember["steps"]) == 674
    assert ember["steps"][0]["steps"] == "with prompt tokens" and len(ember["steps"]) >= 2


def test_kernel_benchmark_script_runs_on_its_cpu_fallback(gpu_image_env: dict[str, str], tmp_path: Path) -> None:
    result = run_script("benchmarks/gpu/kernel_times.py", gpu_image_env, "--results", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "kernels.json").read_text())
    kernels = {row["kernel"] for row in report["rows"]}
    assert {"decode attention", "prefill attention", "write kv", "rms norm", "silu and mul"} <= kernels
    assert {"decode step (graph + logits)", "sampler greedy", "qkv norms+rotary+store, fused"} <= kernels
    assert all(row["us"] > 0 and row["floor_us"] > 0 for row in report["rows"])
    (profile,) = report["step_profiles"].values()  # one decode step's time by kernel (here: by CPU op)
    assert profile and all(row["us"] >= 0 and row["calls"] > 0 for row in profile)


def test_host_overhead_script_runs_with_the_gpu_image(gpu_image_env: dict[str, str]) -> None:
    result = run_script("benchmarks/host_overhead.py", gpu_image_env, "--steps", "20", "--profile", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ms of host time per step" in result.stdout


def test_the_gpu_tests_are_collected_with_the_gpu_image(gpu_image_env: dict[str, str]) -> None:
    """check.sh runs these test modules there: their imports (conftest's too) must resolve."""
    tests = ["tests/test_triton_kernels.py", "tests/test_tiny_parity.py", "tests/test_attention_tuning.py"]
    result = subprocess.run(
        [sys.executable, "-S", "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *tests],
        capture_output=True, text=True, timeout=300, env=gpu_image_env, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:]
    assert "tests collected" in result.stdout


def test_the_tuner_runs_with_the_gpu_image(gpu_image_env: dict[str, str], tmp_path: Path) -> None:
    """check.sh tunes first and the benchmark then runs on the file it writes (EMBER_ATTENTION_TUNING)."""
    output = tmp_path / "attention.json"
    result = subprocess.run(
        [sys.executable, "-S", "-m", "ember.kernels.tune_attention", "--output", str(output)],
        capture_output=True, text=True, timeout=300, env={**gpu_image_env, "TRITON_INTERPRET": "1"}, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tuned options, 16-bit caches:" in result.stdout and "tuned options, float8 caches:" in result.stdout
    probe = (
        f"from ember.kernels.attention_tuning import load; from pathlib import Path; print(load(Path({str(output)!r})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-S", "-c", probe], capture_output=True, text=True, timeout=120, env=gpu_image_env, cwd=ROOT
    )
    assert loaded.returncode == 0 and loaded.stdout.startswith("CardTuning("), loaded.stderr[-2000:]
    notes = json.loads(output.read_text())
    assert notes["complete"] is True  # (saved after each step of the search with false, at its end with true)
    assert notes["decode"]["tuned_us"] <= notes["decode"]["start_us"]
    assert notes["prefill"]["tuned_us"] <= notes["prefill"]["start_us"]
    assert notes["decode_fp8"]["tuned_us"] <= notes["decode_fp8"]["start_us"]
