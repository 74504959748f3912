"""Prometheus metrics (prometheus_client), one registry per daemon.

Events are recorded where they happen, through the methods below (the scheduler, the embedding
path, pulls, the access-log middleware). State that is cheaper to read than to track, such as queue
depth and the RSS of each runner, is read when /metrics is scraped (`StateCollector`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


@dataclass(frozen=True)
class RunnerState:
    """One loaded model, as /metrics shows it."""

    model: str
    queue_depth: int  # requests holding it: waiting in its runner or being decoded
    memory_bytes: int  # what the scheduler counts for it on the host
    gpu_memory_bytes: int = 0  # what it holds on its GPU (as /api/ps's size_vram)


@dataclass(frozen=True)
class DaemonState:
    runners: Sequence[RunnerState]
    requests_admitted: int
    jobs_running: int
    ready: bool


class StateCollector(Collector):
    """Gauges read at scrape time from the daemon's live state."""

    def __init__(self, read_state: Callable[[], DaemonState]) -> None:
        self._read_state = read_state

    def collect(self) -> Iterable[Metric]:
        state = self._read_state()
        depth = GaugeMetricFamily(
            "emberd_queue_depth", "Requests holding a model: queued or decoding", labels=["model"]
        )
        memory = GaugeMetricFamily(
            "emberd_runner_memory_bytes",
            "What each runner holds alone, plus what it may still grow to within its allowance",
            labels=["model"],
        )
        gpu_memory = GaugeMetricFamily(
            "emberd_runner_gpu_memory_bytes",
            "What each runner holds on its GPU (llama.cpp's device buffers; 0 on the CPU)",
            labels=["model"],
        )
        for runner in state.runners:
            depth.add_metric([runner.model], runner.queue_depth)
            memory.add_metric([runner.model], runner.memory_bytes)
            gpu_memory.add_metric([runner.model], runner.gpu_memory_bytes)
        yield depth
        yield memory
        yield gpu_memory
        yield GaugeMetricFamily("emberd_models_loaded", "Model runners alive", value=len(state.runners))
        yield GaugeMetricFamily(
            "emberd_requests_admitted", "Requests accepted and not answered", state.requests_admitted
        )
        yield GaugeMetricFamily(
            "emberd_jobs_running", "Downloads and conversions running or waiting", state.jobs_running
        )
        yield GaugeMetricFamily("emberd_ready", "1 when serving, 0 while starting or draining", int(state.ready))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self._requests = Counter(
            "emberd_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=registry
        )
        self._queue_seconds = Histogram(
            "emberd_request_queue_seconds",
            "Time an embedding request waited before its first decode: admission, loading, the runner's queue",
            ["model"],
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self._inference_seconds = Histogram(
            "emberd_request_inference_seconds",
            "Time from an embedding request's first decode to its last",
            ["model"],
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self._request_inputs = Histogram(
            "emberd_request_inputs",
            "Inputs per embedding request",
            ["model"],
            buckets=_COUNT_BUCKETS,
            registry=registry,
        )
        self._request_tokens = Histogram(
            "emberd_request_tokens",
            "Tokens per embedding request",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=registry,
        )
        self._decode_tokens = Histogram(
            "emberd_decode_tokens", "Tokens per llama.cpp decode", ["model"], buckets=_TOKEN_BUCKETS, registry=registry
        )
        self._decode_sequences = Histogram(
            "emberd_decode_sequences",
            "Sequences per llama.cpp decode (above 1: requests share batches)",
            ["model"],
            buckets=_COUNT_BUCKETS,
            registry=registry,
        )
        self._quick_lane_decodes = Counter(
            "emberd_quick_lane_decodes",
            "Decodes of short inputs on a runner's quick lane, beside a long decode",
            ["model"],
            registry=registry,
        )
        self._truncated = Counter(
            "emberd_truncated_inputs", "Inputs cut to the context length", ["model"], registry=registry
        )
        self._loads = Counter("emberd_model_loads", "Runners started", ["model"], registry=registry)
        self._load_seconds = Histogram(
            "emberd_model_load_seconds",
            "Time to start a runner",
            ["model"],
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self._unloads = Counter(
            "emberd_model_unloads",
            "Runners stopped, by reason: expired, evicted, requested, deleted, reloaded, shutdown",
            ["model", "reason"],
            registry=registry,
        )
        self._unload_seconds = Histogram(
            "emberd_model_unload_seconds",
            "Time from the decision to unload to the runner's exit (waits for its requests)",
            ["model", "reason"],
            buckets=_SECONDS_BUCKETS,
            registry=registry,
        )
        self._renewals = Counter(
            "emberd_context_renewals",
            "Idle runners that gave back what a long input made them hold (a fresh context)",
            ["model"],
            registry=registry,
        )
        self._crashes = Counter("emberd_runner_crashes", "Runners that died unasked", ["model"], registry=registry)
        self._pulled_bytes = Counter(
            "emberd_pulled_bytes", "Bytes received from the Hugging Face Hub", registry=registry
        )
        self._cache_hits = Counter(
            "emberd_cache_hits", "Inputs whose vector the vector cache held", ["model"], registry=registry
        )
        self._cache_misses = Counter(
            "emberd_cache_misses", "Inputs the vector cache did not hold (then decoded)", ["model"], registry=registry
        )
        self._cache_evictions = Counter(
            "emberd_cache_evictions",
            "Vectors this daemon evicted from the on-disk cache (least recently used)",
            registry=registry,
        )
        self._cache_bytes = Gauge(
            "emberd_cache_bytes",
            "Keys and vectors the on-disk vector cache holds, as of this daemon's last write to it",
            registry=registry,
        )

    def watch_state(self, read_state: Callable[[], DaemonState]) -> None:
        self.registry.register(StateCollector(read_state))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- events ----------------------------------------------------------------------------------

    def request_answered(self, route: str, status: int) -> None:
        self._requests.labels(route, str(status)).inc()

    def embedded(
        self, model: str, inputs: int, tokens: int, truncated: int, queue_s: float, inference_s: float
    ) -> None:
        self._request_inputs.labels(model).observe(inputs)
        self._request_tokens.labels(model).observe(tokens)
        self._queue_seconds.labels(model).observe(queue_s)
        self._inference_seconds.labels(model).observe(inference_s)
        if truncated:
            self._truncated.labels(model).inc(truncated)

    def decoded(
        self, model: str, decodes: Sequence[tuple[int, int]], quick_decodes: Sequence[tuple[int, int]] = ()
    ) -> None:
        """(tokens, sequences) of each llama.cpp decode a runner reported, on its main context and on
        its quick lane's."""
        for tokens, sequences in [*decodes, *quick_decodes]:
            self._decode_tokens.labels(model).observe(tokens)
            self._decode_sequences.labels(model).observe(sequences)
        if quick_decodes:
            self._quick_lane_decodes.labels(model).inc(len(quick_decodes))

    def model_loaded(self, model: str, seconds: float) -> None:
        self._loads.labels(model).inc()
        self._load_seconds.labels(model).observe(seconds)

    def model_unloaded(self, model: str, reason: str, seconds: float) -> None:
        self._unloads.labels(model, reason).inc()
        self._unload_seconds.labels(model, reason).observe(seconds)

    def context_renewed(self, model: str) -> None:
        self._renewals.labels(model).inc()

    def runner_crashed(self, model: str) -> None:
        self._crashes.labels(model).inc()

    def pulled(self, byte_count: int) -> None:
        self._pulled_bytes.inc(byte_count)

    def cache_looked_up(self, model: str, hits: int, misses: int) -> None:
        if hits:
            self._cache_hits.labels(model).inc(hits)
        if misses:
            self._cache_misses.labels(model).inc(misses)

    def cache_stored(self, evicted: int, stored_bytes: int | None) -> None:
        """A write to the vector cache: entries it evicted, and the bytes stored after it (None:
        not known, as with Redis)."""
        if evicted:
            self._cache_evictions.inc(evicted)
        if stored_bytes is not None:
            self._cache_bytes.set(stored_bytes)
