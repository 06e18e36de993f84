"""Per-card launch options of the attention kernels (`attention_tuning`) and their tuner (`tune_attention`):
files the kernels follow, clear errors for bad ones, the search's choices, `ember tune-kernels` without a GPU."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from ember.kernels import attention_tuning, triton_attention
from ember.kernels.attention_tuning import DEFAULT, AttentionTuning, CardTuning, card_slug, tuning_for
from ember.kernels.tune_attention import DECODE_STEPS, MARGIN, Case, Search

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture
def tuning_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[dict[str, Any]], Path]]:
    """Write a tuning file and point EMBER_ATTENTION_TUNING at it; until then, no file (as check.sh may have set
    one); the cached options are dropped before and after, so no other test sees them."""
    monkeypatch.delenv("EMBER_ATTENTION_TUNING", raising=False)
    attention_tuning._card_tuning.cache_clear()

    def write(options: dict[str, Any]) -> Path:
        path = tmp_path / "tuning.json"
        path.write_text(json.dumps({"attention": options, "card": "test"}))
        monkeypatch.setenv("EMBER_ATTENTION_TUNING", str(path))
        attention_tuning._card_tuning.cache_clear()
        return path

    yield write
    attention_tuning._card_tuning.cache_clear()


def test_a_tuning_file_sets_the_kernels_options(tuning_file: Callable[[dict[str, Any]], Path]) -> None:
    """The file's options are what the kernels launch with: here its programs per SM set decode's split count."""
    units = triton_attention._parallel_units(CPU)
    assert triton_attention.decode_splits(units, 1, CPU) == attention_tuning.INTERPRETER.programs_per_sm == 2
    tuned = AttentionTuning(decode_pages=2, decode_prefetch=False, programs_per_sm=4, prefill_block_m=32)
    tuning_file(dataclasses.asdict(tuned))
    assert tuning_for(CPU) == tuned
    assert triton_attention.decode_splits(units, 1, CPU) == 4
    assert triton_attention.prefill_launch([0], [40], [40], CPU).block_m == 32


def test_launching_with_overrides_the_file_for_a_block(tuning_file: Callable[[dict[str, Any]], Path]) -> None:
    tuned = AttentionTuning(programs_per_sm=4)
    tuning_file(dataclasses.asdict(tuned))
    with attention_tuning.launching_with(DEFAULT):
        assert tuning_for(CPU) == DEFAULT
    assert tuning_for(CPU) == tuned


def test_saved_tuning_loads_back(tmp_path: Path) -> None:
    wide = AttentionTuning(decode_warps=4, decode_stages=2, prefill_pages=4, prefill_prefetch=False)
    tuned = CardTuning(wide, dataclasses.replace(wide, decode_pages=2, programs_per_sm=32))
    path = tmp_path / "deep" / "attention-nvidia_h100.json"
    attention_tuning.save(path, tuned, {"card": "NVIDIA H100", "decode": {"tuned_us": 1.0}})
    assert attention_tuning.load(path) == tuned
    assert json.loads(path.read_text())["card"] == "NVIDIA H100"


def test_a_float8_cache_takes_its_own_decode_options(tuning_file: Callable[[dict[str, Any]], Path]) -> None:
    """A file's "attention_fp8" sets decode's options over float8 caches; prefill over them keeps the 16-bit
    cache's (its query tiles are cut before the cache is seen); without it, float8 takes the 16-bit options."""
    path = tuning_file({"decode_pages": 1, "prefill_block_m": 32})
    assert tuning_for(CPU, torch.float8_e4m3fn) == tuning_for(CPU, torch.bfloat16)
    content = json.loads(path.read_text())
    path.write_text(json.dumps({**content, "attention_fp8": {"decode_pages": 4, "programs_per_sm": 8}}))
    attention_tuning._card_tuning.cache_clear()
    float8 = tuning_for(CPU, torch.float8_e4m3fn)
    assert (float8.decode_pages, float8.programs_per_sm, float8.prefill_block_m) == (4, 8, 32)
    assert tuning_for(CPU, torch.bfloat16).decode_pages == tuning_for(CPU).decode_pages == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not an attention tuning file"),
        (json.dumps({"card": "x"}), "'attention'"),
        (json.dumps({"attention": {"decode_warps": 3}}), "decode_warps must be one of"),
        (json.dumps({"attention": {"decode_pages": True}}), "decode_pages must be one of"),
        (json.dumps({"attention": {"programs_per_sm": 0}}), "programs_per_sm must be a positive integer"),
        (json.dumps({"attention": {"decode_prefetch": "yes"}}), "decode_prefetch must be true or false"),
        (json.dumps({"attention": []}), "not an attention tuning file"),
        (json.dumps({"attention": {}, "attention_fp8": {"decode_pages": 3}}), "decode_pages must be one of"),
    ],
)
def test_a_bad_tuning_file_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"bad\.json") as error:
        attention_tuning.load(path)
    assert message in str(error.value)


def test_options_of_another_version_are_left_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file written by another version (an option renamed or gone) still loads: what this version knows applies,
    the rest is named in a warning, and float8 caches take decode options only."""
    path = tmp_path / "old.json"
    options = {"decode_pages": 2, "decode_splits": 4}
    path.write_text(json.dumps({"attention": options, "attention_fp8": {"prefill_pages": 2, "decode_warps": 4}}))
    with caplog.at_level("WARNING", logger="ember.kernels.attention_tuning"):
        tuning = attention_tuning.load(path)
    assert tuning.wide == AttentionTuning(decode_pages=2)
    assert tuning.float8 == AttentionTuning(decode_pages=2, decode_warps=4)
    warnings = " ".join(record.getMessage() for record in caplog.records)
    assert "['decode_splits'] left out" in warnings and "['prefill_pages'] left out" in warnings


def test_the_engine_checks_its_tuning_file_at_start(
    tiny_models: dict, tuning_file: Callable[[dict[str, Any]], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad file stops the engine at start-up, naming the file, not in its first step."""
    from ember.engine.engine import LLM

    monkeypatch.setenv("EMBER_KERNELS", "triton")
    path = tuning_file({"decode_pages": 3})
    with pytest.raises(ValueError, match=re.escape(str(path))):
        LLM(str(tiny_models["qwen3"][0]), num_blocks=64, dtype="float32")


def test_the_engine_on_tuned_options_equals_the_default_path(
    tiny_models: dict, tuning_file: Callable[[dict[str, Any]], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever options a file sets (here none of the defaults: several blocks a loop trip, no pipelined trips,
    other splits and query tiles), the Triton path's greedy tokens are the default path's."""
    from ember.engine.engine import LLM
    from ember.engine.sampling_params import SamplingParams

    path = str(tiny_models["qwen3"][0])
    prompts = [[5, 9, 13, 2, 7] * 7, [3, 4], list(range(10, 60))]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(path, num_blocks=64, dtype="float32").generate(prompts, params)]
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    tuned = AttentionTuning(
        decode_pages=2, decode_prefetch=False, programs_per_sm=1, prefill_block_m=32, prefill_pages=4
    )
    tuning_file(dataclasses.asdict(tuned))
    llm = LLM(path, num_blocks=64, dtype="float32")
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected


def test_card_names_become_file_names() -> None:
    assert card_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert card_slug("NVIDIA GeForce RTX 4090") == "nvidia_geforce_rtx_4090"


def fake_search(
    cost: Callable[[dict[str, Any]], float], wrong: set[tuple[str, Any]], failing: set[tuple[str, Any]],
    failing_late: frozenset[tuple[str, Any]] = frozenset(),
) -> Search:  # fmt: skip
    """A search over one case whose "time" under a tuning is `cost` of the options that differ from the defaults
    (the timer reads what the last run left); settings in `wrong` give another output, in `failing` raise as a
    launch that does not fit the GPU would, in `failing_late` raise only when timed (a failure seen at a later
    sync)."""
    last: dict[str, Any] = {"cost": 0.0, "changed": set()}

    def run(tuning: AttentionTuning) -> torch.Tensor:
        changed = {k: v for k, v in dataclasses.asdict(tuning).items() if getattr(DEFAULT, k) != v}
        if set(changed.items()) & failing:
            raise RuntimeError("out of shared memory")
        last["cost"], last["changed"] = cost(changed), set(changed.items())
        return torch.ones(4) * (2.0 if set(changed.items()) & wrong else 1.0)

    def timer(fn: Callable[[], Any]) -> float:
        fn()
        if last["changed"] & failing_late:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return last["cost"]

    return Search("decode", [Case("fake", run)], CPU, DEFAULT, timer)


def product_of(costs: dict[tuple[str, Any], float]) -> Callable[[dict[str, Any]], float]:
    """Each changed option multiplies the time by its cost (1: no effect)."""
    return lambda changed: float(torch.tensor([costs.get(setting, 1.0) for setting in changed.items()]).prod())


def test_the_search_keeps_what_is_faster_by_its_margin() -> None:
    costs = {
        ("decode_pages", 2): 0.8,  # faster: kept
        ("decode_pages", 4): 0.7,  # faster still, but wrong: left out
        ("decode_warps", 4): 1 - MARGIN / 2,  # within the noise margin: the default stays
        ("programs_per_sm", 32): 0.5,  # fastest, but fails: left out
        ("programs_per_sm", 8): 0.9,
        ("programs_per_sm", 64): 0.4,  # faster still, but fails when timed: left out
    }
    failing, late = {("programs_per_sm", 32)}, frozenset({("programs_per_sm", 64)})
    search = fake_search(product_of(costs), wrong={("decode_pages", 4)}, failing=failing, failing_late=late)
    best = search.run(DECODE_STEPS)
    assert best == dataclasses.replace(DEFAULT, decode_pages=2, programs_per_sm=8)
    assert search.notes()["tuned_us"] == pytest.approx(1e6 * 0.8 * 0.9)
    assert search.notes()["start_us"] == pytest.approx(1e6)


def test_a_second_pass_finds_what_pays_only_with_a_later_choice() -> None:
    """Trips without prefetch lose at 2 warps and win at 4 (fewer registers a thread): the first pass takes 4
    warps after it tried the prefetch, the second pass drops the prefetch."""

    def cost(changed: dict[str, Any]) -> float:
        warps4 = changed.get("decode_warps") == 4 and "decode_stages" not in changed
        no_prefetch = changed.get("decode_prefetch") is False
        return (0.9 if warps4 else 1.0) * ((0.5 if warps4 else 1.1) if no_prefetch else 1.0)

    saved: list[AttentionTuning] = []
    search = fake_search(cost, wrong=set(), failing=set())
    best = search.run(DECODE_STEPS, after_step=lambda: saved.append(search.best))
    assert best == dataclasses.replace(DEFAULT, decode_warps=4, decode_prefetch=False)
    # the best so far after each step of both passes: what a search cut short would have left in its file
    assert len(saved) == 2 * len(DECODE_STEPS) and saved[-1] == best
    assert saved[len(DECODE_STEPS) - 1] == dataclasses.replace(DEFAULT, decode_warps=4)
    assert fake_search(cost, wrong=set(), failing=set()).run(DECODE_STEPS, passes=1) == dataclasses.replace(
        DEFAULT, decode_warps=4
    )


def test_the_search_stops_when_its_start_fails() -> None:
    search = fake_search(product_of({}), wrong=set(), failing={("decode_warps", 4)})
    search.start = dataclasses.replace(DEFAULT, decode_warps=4)
    with pytest.raises(RuntimeError, match="starting options"):
        search.run(DECODE_STEPS)


def test_tune_kernels_without_a_gpu_says_so() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "ember.cli", "tune-kernels"], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 2
    assert "no CUDA GPU here" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "ember.cli", "tune-kernels", "--model", "no-such-model"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    assert "ember: error: dummy weights need a preset" in result.stderr and "Traceback" not in result.stderr
