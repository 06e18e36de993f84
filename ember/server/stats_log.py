"""The server's log of its work, as vLLM's: a periodic stats line (throughput, queue, KV-cache use,
prefix-cache hits) and, with `--enable-log-requests`, a line per finished request.

Every `interval` seconds while there is work, one line on the server's log, e.g.
`ember: prompt 812.4 tok/s, generation 95.0 tok/s; running 8, waiting 0; KV cache 12.5% used; prefix cache
hits 64.0%`. Prompt throughput counts the prompt tokens admitted to be computed (those not found in the prefix
cache), generation throughput the tokens sampled. A thread reads the engine's and the metrics' running totals;
it changes nothing and costs the engine nothing.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from ember.engine.async_engine import FinishedStats
from ember.engine.engine import Engine
from ember.server.metrics import EngineMetrics

logger = logging.getLogger("ember.stats")
request_logger = logging.getLogger("ember.requests")


def interval_from_environment() -> float:
    """Seconds between stats lines: $EMBER_LOG_STATS_INTERVAL, else 10."""
    value = os.environ.get("EMBER_LOG_STATS_INTERVAL", "10")
    try:
        interval = float(value)
    except ValueError:
        interval = 0.0
    if not interval > 0:
        raise ValueError(f"EMBER_LOG_STATS_INTERVAL must be a positive number of seconds, got {value!r}")
    return interval


class StatsLogger:
    def __init__(self, engine: Engine, metrics: EngineMetrics, interval: float) -> None:
        self.engine, self.metrics, self.interval = engine, metrics, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ember-stats", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, if it started."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def totals(self) -> tuple[int, ...]:
        """Running totals: prompt tokens looked up in the prefix cache, found there, tokens generated, drafted and
        accepted by speculative decoding."""
        kv_cache, spec = self.engine.kv_cache, self.engine.speculator.stats
        return (kv_cache.prefix_queries, kv_cache.prefix_hits, self.metrics.num_generated, spec.num_draft_tokens,
                spec.num_accepted_tokens)  # fmt: skip

    def _run(self) -> None:
        last, before = time.monotonic(), self.totals()
        while not self._stop.wait(self.interval):
            now, totals = time.monotonic(), self.totals()
            line = self.line(now - last, before, totals)
            if line:
                logger.info(line)
            last, before = now, totals

    def line(self, seconds: float, before: tuple[int, ...], after: tuple[int, ...]) -> str | None:
        """The stats of one interval, or None when nothing ran and nothing waits."""
        queries, hits, generated, drafted, accepted = (a - b for a, b in zip(after, before, strict=True))
        scheduler = self.engine.scheduler
        running, waiting = len(scheduler.running), len(scheduler.waiting)
        if not (queries or generated or running or waiting):
            return None
        parts = [
            f"prompt {(queries - hits) / seconds:.1f} tok/s, generation {generated / seconds:.1f} tok/s",
            f"running {running}, waiting {waiting}",
            f"KV cache {100 * self.engine.kv_cache.usage():.1f}% used",
        ]
        if queries:
            parts.append(f"prefix cache hits {100 * hits / queries:.1f}%")
        if drafted:
            parts.append(f"drafts accepted {100 * accepted / drafted:.1f}%")
        return "; ".join(parts)


def log_finished_request(stats: FinishedStats) -> None:
    """One line for a request that ended, under the API's id: why, its tokens and its timings."""
    first_token = "" if stats.first_token is None else f"first token after {stats.first_token - stats.arrival:.3f} s, "
    request_logger.info(
        "%s finished (%s): %d prompt tokens (%d cached), %d generated; %sdone after %.3f s",
        stats.request_id,
        ", ".join(stats.finish_reasons),
        stats.num_prompt_tokens,
        stats.num_cached_tokens,
        stats.num_output_tokens,
        first_token,
        stats.end - stats.arrival,
    )
