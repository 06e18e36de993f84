"""The engine behind an asyncio server: one background thread steps the engine, coroutines stream results.

All engine calls happen on the engine thread, so the engine itself needs no locks: coroutines send
commands (add, abort) through a queue and receive each step's deltas through their own asyncio queue.
Between steps the thread drains commands, so a new request joins the very next step. When idle it
sleeps on the command queue instead of spinning.

The engine is also built on that thread. Loading a model runs OpenMP regions (torch's, Ember's kernels) on the
thread that loads it, and each thread that starts regions keeps a team of worker threads. Loaded on one
thread and stepped on another, the process held more OpenMP threads than cores, and libgomp then stops
spinning between regions: every region woke its workers from sleep, and a SmolLM2 decode step took 7.5-8.5
ms instead of 3.4-3.8.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ember.engine.engine import Engine, PromptType
from ember.engine.request import RequestOutput
from ember.engine.sampling_params import SamplingParams

T = TypeVar("T")

logger = logging.getLogger("ember.engine")


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full: the caller should retry later (HTTP 429)."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped after an internal error; requests in flight are failed, not dropped."""


@dataclass
class _Stream:
    """Where one request's deltas go, and the timings its metrics need."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]
    arrival: float
    first_token: float | None = None
    num_output_tokens: int = 0
    num_prompt_tokens: int = 0


@dataclass
class FinishedStats:
    """What the metrics (and the request log) need about a request that just ended."""

    request_id: str
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    finish_reasons: list[str]
    arrival: float
    first_token: float | None
    end: float
    first_scheduled: float | None = None  # when the engine first ran it (None: aborted while waiting)


class AsyncEngine:
    def __init__(self, build_engine: Callable[[], Engine], max_waiting: int = 512) -> None:
        """Build the engine with `build_engine` on the engine thread (see the module's note) and start stepping
        it; returns once it is built, and raises what building raised (e.g. ValueError for a bad model)."""
        self.max_waiting = max_waiting
        self.on_finished: Callable[[FinishedStats], None] | None = None
        self.on_step: Callable[[Engine, int], None] | None = None  # (engine, tokens generated) after each step
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # owned by the engine thread
        self._in_flight = 0  # owned by the event loop
        self._ids = itertools.count()
        self._stopped = threading.Event()
        self._dead: BaseException | None = None
        self.engine: Engine  # set by the engine thread
        failed: list[BaseException] = []
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(build_engine, failed, ready), name="ember-engine")
        self._thread.daemon = True
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]

    # ------------------------------------------------------------------------------------------------
    # Called from the event loop

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    async def generate(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str | None = None,
        lora: str | None = None,
        pooling: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's deltas (with the LoRA adapter named `lora`, if any; an embedding request with
        `pooling`; `priority` and `cache_salt`: see `Engine.add_request`). Raises ValueError for bad input,
        EngineOverloadedError when full.

        If the consumer stops early (e.g. the client disconnected), the request is aborted at once.
        """
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped: {self._dead}")
        if self._in_flight >= self.engine.config.scheduler.max_num_seqs + self.max_waiting:
            raise EngineOverloadedError(
                f"the server is at capacity ({self._in_flight} requests in flight); retry later"
            )
        if params.structured_outputs is not None:  # compiled here, off the engine thread, which then finds it cached
            await asyncio.to_thread(self.engine.compile_grammar, params.structured_outputs)
        if isinstance(params.prediction, str):  # tokenized off the engine thread too: a long file takes a while
            prediction = await asyncio.to_thread(self.engine.prediction_token_ids, params.prediction)
            params = dataclasses.replace(params, prediction=prediction)
        request_id = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), time.monotonic())
        accepted: asyncio.Future[int] = loop.create_future()
        finished = False
        self._in_flight += 1  # counted on the caller's side, so a burst of arrivals is bounded too
        try:
            self._commands.put(
                (
                    "add",
                    (
                        request_id,
                        prompt,
                        params,
                        {"lora": lora, "pooling": pooling, "priority": priority, "cache_salt": cache_salt},
                        stream,
                        accepted,
                    ),
                )
            )
            stream.num_prompt_tokens = await accepted  # raises the engine's ValueError for bad input
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._in_flight -= 1
            if not finished:
                self._commands.put(("abort", request_id))

    async def reset_prefix_cache(self) -> bool:
        """Forget cached prefixes, on the engine thread between steps; False while requests hold blocks."""
        return await self.call(self.engine.reset_prefix_cache)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the engine thread, between steps (what changes the engine's state, such as loading a
        LoRA adapter, must not run during one); its exception is raised here."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._commands.put(("call", (loop, done, fn, args)))
        return await done

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is in flight and stop the engine thread."""
        self._commands.put(("stop", None))
        self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------------
    # The engine thread

    def _run(self, build_engine: Callable[[], Engine], failed: list[BaseException], ready: threading.Event) -> None:
        try:
            self.engine = build_engine()
        except BaseException as e:  # raised again by the constructor, in its caller's thread
            failed.append(e)
            return
        finally:
            ready.set()
        try:
            while not self._stopped.is_set():
                block = not self.engine.has_unfinished_requests()
                self._drain_commands(block)
                if self._stopped.is_set():
                    break
                if self.engine.has_unfinished_requests():
                    self._step()
        except BaseException as e:  # a bug in a step must fail requests visibly, never hang them
            logger.exception("engine step failed; failing all requests in flight")
            self._dead = e
            for request_id, stream in list(self._streams.items()):
                self._deliver(stream, [EngineDeadError(f"the engine failed: {e!r}")])
                self._streams.pop(request_id, None)
        finally:
            for request_id in list(self._streams):
                self._finish_abort(request_id)

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "stop":
            self._stopped.set()
        elif kind == "abort":
            self._finish_abort(payload)
        elif kind == "call":
            loop, done, fn, args = payload
            try:
                result = fn(*args)
            except Exception as e:
                loop.call_soon_threadsafe(_set_exception, done, e)
            else:
                loop.call_soon_threadsafe(_set_result, done, result)
        elif kind == "add":
            request_id, prompt, params, options, stream, accepted = payload
            try:
                self.engine.add_request(prompt, params, request_id, **options)
            except Exception as e:  # ValueError: bad input; anything else: reported to that caller alone
                stream.loop.call_soon_threadsafe(_set_exception, accepted, e)
                return
            self._streams[request_id] = stream
            group = self.engine.groups[request_id]
            stream.loop.call_soon_threadsafe(_set_result, accepted, len(group.prompt_token_ids))

    def _finish_abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        final = self.engine.abort_request(request_id)
        if stream is not None and final is not None:
            final.finished = True
            self._deliver(stream, [final])
            self._report(stream, final, time.monotonic())

    def _step(self) -> None:
        outputs = self.engine.step()
        now = time.monotonic()
        generated = 0
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            new_tokens = sum(len(o.token_ids) for o in out.outputs)
            generated += new_tokens
            if new_tokens and stream.first_token is None:
                stream.first_token = now
            stream.num_output_tokens += new_tokens
            by_loop.setdefault(stream.loop, []).append((stream, out))
            if out.finished:
                del self._streams[out.request_id]
                self._report(stream, out, now)
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)
        if self.on_step is not None:
            self.on_step(self.engine, generated)

    def _deliver(self, stream: _Stream, items: list[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop already closed at shutdown
            stream.loop.call_soon_threadsafe(_put_all, [(stream, item) for item in items])

    def _report(self, stream: _Stream, out: RequestOutput, now: float) -> None:
        if self.on_finished is None:
            return
        reasons = [o.finish_reason or "abort" for o in out.outputs]
        self.on_finished(
            FinishedStats(
                out.request_id,
                stream.num_prompt_tokens,
                out.num_cached_tokens,
                stream.num_output_tokens,
                reasons,
                stream.arrival,
                stream.first_token,
                now,
                out.first_scheduled,
            )
        )


def _put_all(items: list[tuple[_Stream, Any]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
