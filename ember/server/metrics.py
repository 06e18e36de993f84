"""Prometheus metrics, named `ember:*` after vLLM's `vllm:*` so existing dashboards carry over."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ember.engine.async_engine import FinishedStats
from ember.engine.engine import Engine
from ember.engine.request import Request
from ember.models.lora import LoRAModel

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


def token_count_buckets(max_model_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to the context length (vLLM's buckets of its token-count histograms)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_model_len:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


class EngineMetrics:
    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        r = self.registry
        self.running = Gauge(
            "ember:num_requests_running", "Requests in the running batch.", ["model_name"], registry=r
        ).labels(**labels)
        self.waiting = Gauge(
            "ember:num_requests_waiting", "Requests waiting to be scheduled.", ["model_name"], registry=r
        ).labels(**labels)
        self.kv_usage = Gauge(
            "ember:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).", ["model_name"], registry=r
        ).labels(**labels)
        cache = engine.config.cache
        cache_info = {"block_size": str(cache.block_size), "cache_dtype": cache.kv_cache_dtype,
                      "num_gpu_blocks": str(engine.kv_cache.num_blocks),
                      "enable_prefix_caching": str(cache.enable_prefix_caching)}  # fmt: skip
        Gauge(  # vLLM's cache_config_info (its label names, so its dashboards read it; the blocks on any device)
            "ember:cache_config_info",
            "The KV cache's configuration, in labels.",
            ["model_name", *cache_info],
            registry=r,
        ).labels(**labels, **cache_info).set(1)
        self.prompt_tokens = Counter(
            "ember:prompt_tokens", "Prompt tokens of admitted requests.", ["model_name"], registry=r
        ).labels(**labels)
        self.generation_tokens = Counter(
            "ember:generation_tokens", "Generated tokens.", ["model_name"], registry=r
        ).labels(**labels)
        self.preemptions = Counter(
            "ember:num_preemptions", "Requests preempted to free KV blocks.", ["model_name"], registry=r
        ).labels(**labels)
        self.prefix_queries = Counter(
            "ember:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", ["model_name"], registry=r
        ).labels(**labels)
        self.prefix_hits = Counter(
            "ember:prefix_cache_hits", "Prompt tokens found in the prefix cache.", ["model_name"], registry=r
        ).labels(**labels)
        self.spec_drafts = Counter(
            "ember:spec_decode_num_drafts", "Request-steps that verified drafted tokens.", ["model_name"], registry=r
        ).labels(**labels)
        self.spec_draft_tokens = Counter(
            "ember:spec_decode_num_draft_tokens",
            "Tokens drafted by the speculative proposer.",
            ["model_name"],
            registry=r,
        ).labels(**labels)
        self.spec_accepted_tokens = Counter(
            "ember:spec_decode_num_accepted_tokens",
            "Drafted tokens the target model accepted.",
            ["model_name"],
            registry=r,
        ).labels(**labels)
        self.spec_acceptance_rate = Gauge(
            "ember:spec_decode_acceptance_rate", "Accepted / drafted tokens since start.", ["model_name"], registry=r
        ).labels(**labels)
        self.spec_mean_accepted_length = Gauge(
            "ember:spec_decode_mean_accepted_length",
            "Tokens emitted per verifying request-step (accepted drafts + 1) since start.",
            ["model_name"],
            registry=r,
        ).labels(**labels)
        self.request_success = Counter(
            "ember:request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )

        def histogram(name: str, text: str, buckets: Sequence[float]) -> Any:
            return Histogram(name, text, ["model_name"], buckets=buckets, registry=r).labels(**labels)

        self.ttft = histogram("ember:time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS)
        self.tpot = histogram(
            "ember:time_per_output_token_seconds", "Mean time per output token after the first.", TOKEN_LATENCY_BUCKETS
        )
        self.e2e = histogram("ember:e2e_request_latency_seconds", "End-to-end request latency.", LATENCY_BUCKETS)
        # where a request's time went: waiting for admission, then prefill (to the first token), then decode
        phases = {
            "queue": "Time from arrival until the request first ran (waiting for a sequence slot and KV blocks).",
            "prefill": "Time from the request's first run to its first token.",
            "decode": "Time from the request's first token to its last.",
            "inference": "Time from the request's first run to its end (prefill and decode).",
        }
        self.phase_times = {
            phase: histogram(f"ember:request_{phase}_time_seconds", text, LATENCY_BUCKETS)
            for phase, text in phases.items()
        }
        counts = token_count_buckets(engine.max_model_len)
        self.request_prompt_tokens = histogram("ember:request_prompt_tokens", "Prompt tokens per request.", counts)
        self.request_generation_tokens = histogram(
            "ember:request_generation_tokens", "Generated tokens per request (all its samples).", counts
        )
        self.lora_info = Gauge(
            "ember:lora_requests_info",
            "LoRA adapters of the running and waiting requests, as labels (names, comma-separated); the value is "
            "the scrape's Unix time.",
            ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            registry=r,
        )
        self.model_name = model_name
        self.num_generated = 0  # the generation counter's total, readable (the periodic stats line reads it)
        self._seen: dict[Counter, float] = {}

    def _advance(self, counter: Counter, total: float) -> None:
        """Move a counter up to an engine-side running total."""
        seen = self._seen.get(counter, 0)
        if total > seen:
            counter.inc(total - seen)
            self._seen[counter] = total

    def on_step(self, engine: Engine, generated: int) -> None:
        """Called on the engine thread after each step."""
        self.generation_tokens.inc(generated)
        self.num_generated += generated
        self._advance(self.preemptions, engine.scheduler.num_preemptions)
        self._advance(self.prefix_queries, engine.kv_cache.prefix_queries)
        self._advance(self.prefix_hits, engine.kv_cache.prefix_hits)
        stats = engine.speculator.stats
        self._advance(self.spec_drafts, stats.num_steps)
        self._advance(self.spec_draft_tokens, stats.num_draft_tokens)
        self._advance(self.spec_accepted_tokens, stats.num_accepted_tokens)

    def on_finished(self, stats: FinishedStats) -> None:
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        for reason in stats.finish_reasons:
            self.request_success.labels(model_name=self.model_name, finished_reason=reason).inc()
        self.e2e.observe(stats.end - stats.arrival)
        self.request_prompt_tokens.observe(stats.num_prompt_tokens)
        self.request_generation_tokens.observe(stats.num_output_tokens)
        if stats.first_scheduled is not None:
            self.phase_times["queue"].observe(max(0.0, stats.first_scheduled - stats.arrival))
            self.phase_times["inference"].observe(stats.end - stats.first_scheduled)
        if stats.first_token is not None:
            self.ttft.observe(stats.first_token - stats.arrival)
            self.phase_times["decode"].observe(stats.end - stats.first_token)
            if stats.first_scheduled is not None:
                self.phase_times["prefill"].observe(max(0.0, stats.first_token - stats.first_scheduled))
            if stats.num_output_tokens > 1:
                self.tpot.observe((stats.end - stats.first_token) / (stats.num_output_tokens - 1))

    def render(self) -> bytes:
        """The exposition text; gauges are read from the engine at scrape time."""
        scheduler = self.engine.scheduler
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        self.kv_usage.set(self.engine.kv_cache.usage())
        self.spec_acceptance_rate.set(self.engine.speculator.stats.acceptance_rate)
        self.spec_mean_accepted_length.set(self.engine.speculator.stats.mean_accepted_length)
        if self.engine.runner.lora is not None:
            self.set_lora_info(self.engine.runner.lora)
        return generate_latest(self.registry)

    def set_lora_info(self, lora: LoRAModel) -> None:
        """vLLM's lora_requests_info, one series only: the adapters in use now. `max_lora` is --max-loras, or
        the number loaded when any number may run at once."""
        # copies first: the engine thread changes these while the server's thread reads them
        names = {adapter.adapter_id: name for name, adapter in list(lora.adapters.items())}
        scheduler = self.engine.scheduler
        running, waiting = list(scheduler.running), list(scheduler.waiting)

        def in_use(requests: list[Request]) -> str:
            return ",".join(sorted({names[r.lora_id] for r in requests if r.lora_id in names}))

        max_lora = scheduler.max_loras if scheduler.max_loras is not None else len(names)
        self.lora_info.clear()
        self.lora_info.labels(str(max_lora), in_use(waiting), in_use(running)).set_to_current_time()
