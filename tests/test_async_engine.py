"""The engine thread behind the server: it builds the engine it steps, and a failed build fails its caller."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ember.engine.async_engine import AsyncEngine
from ember.engine.engine import LLM, Engine
from ember.engine.sampling_params import SamplingParams


def test_engine_is_built_on_the_thread_that_steps_it(tiny_models: dict) -> None:
    """OpenMP keeps a team of workers per thread that starts regions: loading on one thread and stepping on
    another left more threads than cores, which made every step 2.3x slower (see async_engine's note)."""
    builders: list[threading.Thread] = []
    steppers: set[threading.Thread] = set()

    def build() -> Engine:
        builders.append(threading.current_thread())
        return LLM(str(tiny_models["llama3"][0]), num_blocks=32).engine

    async_engine = AsyncEngine(build)
    async_engine.on_step = lambda engine, generated: steppers.add(threading.current_thread())

    async def generate() -> list[int]:
        tokens: list[int] = []
        async for out in async_engine.generate([5, 6, 7], SamplingParams(max_tokens=4, temperature=0)):
            tokens += out.outputs[0].token_ids if out.outputs else []
        return tokens

    try:
        assert len(asyncio.run(generate())) == 4
        assert builders == [async_engine._thread] and steppers == {async_engine._thread}
        assert builders[0] is not threading.current_thread()
    finally:
        async_engine.shutdown()


def test_a_failed_build_raises_in_the_caller() -> None:
    def build() -> Engine:
        raise ValueError("model 'x' not found")

    with pytest.raises(ValueError, match="model 'x' not found"):
        AsyncEngine(build)
