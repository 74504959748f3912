"""The embedding path every dialect shares: (auto-pull), admit, the vector cache, lease a runner,
embed, record.

With the vector cache on (daemon/cache.py), the inputs are tokenized first, by the loaded runner or
a vocabulary-only one (daemon/vocabularies.py), into the exact sequences an embed decodes; the
cache is asked for all of them in one lookup, and only the misses go to the runner, as those
sequences. A request whose inputs are all hits loads nothing. A long input split into windows
(split_long_inputs) is not cached: its vector pools several decodes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import web

from daemon.adapters import choose_input_prefix
from daemon.api.common import (
    CACHE_HITS_HEADER,
    HUB,
    LLAMA_VERSION_HEADER,
    METRICS,
    MODEL_DIGEST_HEADER,
    PULLS,
    REQUEST_STATS,
    SCHEDULER,
    SETTINGS,
    VOCABULARIES,
    Caller,
    RequestStats,
    check_request_tokens,
    stored_model,
)
from daemon.cache import POOLED, CacheEvents, StoreOutcome, VectorCache, cache_key
from daemon.errors import InvalidInput, RunnerCrashed, UnknownModel
from daemon.memory import input_tokens_bound
from daemon.metrics import Metrics
from daemon.options import context_limit, resolve_load_options
from daemon.prompts import apply_prompt
from daemon.runner.client import RunnerInput
from daemon.store import StoredModel
from daemon.vocabularies import InputSequences

# The vector cache, when the settings turn it on (absent otherwise).
VECTOR_CACHE = web.AppKey("vector_cache", VectorCache)


def cache_events(metrics: Metrics) -> CacheEvents:
    """The vector cache's reports, into /metrics."""

    def stored(outcome: StoreOutcome) -> None:
        metrics.cache_stored(outcome.evicted, outcome.stored_bytes)

    return CacheEvents(metrics.cache_looked_up, stored)


MAX_LOGGED_NAME_CHARS = 200


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # (inputs, n_embd) float32 as pooled by the model, not normalised
    token_count: int
    truncated_count: int
    load_duration_ns: int
    provenance: dict[str, str]  # headers saying what produced the vectors (model digest, llama.cpp)
    windows: list[int]  # per input: 1, or the windows a long input was split into
    # With tokens=True: each input's token vectors (tokens, n_embd), its token ids, and which ids
    # are special tokens (see EmbedResult); `vectors` is then empty.
    token_vectors: list[np.ndarray] | None = None
    token_ids: list[list[int]] = field(default_factory=list)
    special_ids: list[int] = field(default_factory=list)


async def stored_or_pulled(app: web.Application, name: str) -> StoredModel:
    """The stored model for a name; with auto_pull on, one that is not local but that the Hub can
    provide is pulled first."""
    try:
        return await stored_model(app, name)
    except UnknownModel:
        if not app[SETTINGS].auto_pull or not app[HUB].knows(name):
            raise
    await app[PULLS].pull(name)
    return await stored_model(app, name)


def check_model_kind(model: StoredModel, pairs: bool) -> None:
    """A reranker takes query/document pairs (/api/rerank), an embedding model texts (/api/embed):
    asked for the other, InvalidInput names the route to use."""
    if model.facts.is_reranker and not pairs:
        raise InvalidInput(f"{model.name} is a reranker: use /api/rerank")
    if pairs and not model.facts.is_reranker:
        raise InvalidInput(f"{model.name} is an embedding model, not a reranker: use /api/embed")


def request_tokens_bound(inputs: Sequence[RunnerInput], limit_tokens: int, split_long_inputs: bool) -> int:
    """An upper bound on the tokens a request's inputs are tokenized into, known before tokenizing:
    each input's bound (memory.input_tokens_bound: its UTF-8 bytes and special tokens), at most the
    context `limit_tokens` unless long inputs are split (a longer one is cut, or refused)."""
    total = 0
    for item in inputs:
        bound = input_tokens_bound((item,))
        total += bound if split_long_inputs else min(bound, limit_tokens)
    return total


async def embed_inputs(
    request: Caller,
    model: str,
    inputs: Sequence[RunnerInput],
    truncate: bool,
    options: dict[str, Any],
    keep_alive_s: float | None,
    prompt_name: str | None = None,
    input_type: str | None = None,
    split_long_inputs: bool = False,
    task: str | None = None,
    keep_end: bool = False,
    tokens: bool = False,
    max_tokens: int | None = None,
    background: bool = False,
) -> Embedded:
    """Embed texts (or token-id lists of the model's vocabulary), after the model's prompt that
    `prompt_name` or `input_type` picks (see daemon.prompts), or with the task adapter and its
    prefix that `task`, `prompt_name` or `input_type` picks (daemon.adapters). With no inputs, the
    model is only loaded: the preload idiom. What happened is left in request[REQUEST_STATS] for the log."""
    app = request.app
    started_s = time.perf_counter()
    # The name as sent, until the lease gives the canonical one (cut: it is echoed into a log line).
    stats = request[REQUEST_STATS] = RequestStats(model[:MAX_LOGGED_NAME_CHARS], len(inputs))
    scheduler = app[SCHEDULER]
    # The handler admitted the request (admitted(queue_slot=True)) before its body was read: an
    # auto-pull counts against the queue bound and the shutdown drain too.
    stored = await stored_or_pulled(app, model)
    if inputs:
        check_model_kind(stored, pairs=any(isinstance(item, dict) for item in inputs))
    chosen = choose_input_prefix(
        stored.prompts, stored.task_prefixes, stored.default_task, task, prompt_name, input_type
    )
    inputs = apply_prompt(chosen.prefix, inputs)
    # Bounded before tokenizing: the request's tokens against max_request_tokens, and memory for the
    # largest decode set aside before it is sent.
    limit_tokens = context_limit(resolve_load_options(app[SETTINGS], options).num_ctx, stored.facts.context_length)
    check_request_tokens(
        request_tokens_bound(inputs, limit_tokens, split_long_inputs),
        app[SETTINGS],
        "the inputs (UTF-8 bytes and special tokens, each at most its context)",
    )
    cache = app.get(VECTOR_CACHE)
    if cache is not None and inputs and not tokens:
        sequences = await app[VOCABULARIES].input_sequences(
            stored, inputs, truncate, min(limit_tokens, max_tokens or limit_tokens), split_long_inputs, keep_end
        )
        return await _embed_through_cache(
            request, cache, stored, sequences, chosen.task, options, keep_alive_s, started_s, background
        )
    longest_tokens = input_tokens_bound(inputs)
    async with scheduler.lease(stored, options, keep_alive_s, longest_tokens) as lease:
        stats.model = lease.loaded.name
        facts = lease.loaded.runner.facts
        provenance = {
            MODEL_DIGEST_HEADER: lease.loaded.model.digest,
            LLAMA_VERSION_HEADER: facts.llama_version if facts is not None else "",
            CACHE_HITS_HEADER: "0",
        }
        if not inputs:
            return Embedded(np.empty((0, 0), np.float32), 0, 0, lease.load_duration_ns, provenance, [])
        result = await lease.loaded.runner.embed(
            inputs,
            truncate,
            min(lease.limit_tokens, max_tokens or lease.limit_tokens),  # max_tokens: Cohere's, a shorter cut
            split_long_inputs,
            chosen.task,
            keep_end,
            tokens,
            background,
        )
    # Queue time is everything but the runner's decoding: admission, loading, the runner's queue.
    queue_s = max(0.0, time.perf_counter() - started_s - result.inference_s)
    stats.tokens, stats.queue_ms, stats.inference_ms = result.token_count, queue_s * 1e3, result.inference_s * 1e3
    metrics = app[METRICS]
    metrics.embedded(stats.model, len(inputs), result.token_count, result.truncated_count, queue_s, result.inference_s)
    metrics.decoded(stats.model, result.decodes, result.quick_decodes)
    return Embedded(
        result.vectors,
        result.token_count,
        result.truncated_count,
        lease.load_duration_ns,
        provenance,
        result.windows,
        result.token_vectors() if tokens else None,
        result.token_ids,
        result.special_ids,
    )


def _vector(value: bytes) -> np.ndarray:
    return np.frombuffer(value, dtype="<f4")


async def _embed_through_cache(
    request: Caller,
    cache: VectorCache,
    stored: StoredModel,
    inputs: InputSequences,
    task: str | None,
    options: dict[str, Any],
    keep_alive_s: float | None,
    started_s: float,
    background: bool = False,
) -> Embedded:
    """Embed tokenized inputs: the cache's hits as they are, the misses decoded (and then cached).
    Tokens and truncation are counted for hits as for misses."""
    app = request.app
    stats = request[REQUEST_STATS]
    stats.model = stored.name
    sequences = inputs.sequences
    # One key per input decoded as one sequence; a split input's windows are pooled: not cached.
    keys = [
        cache_key(stored.digest, inputs.llama_version, POOLED, task, np.asarray(windows[0], "<i4").tobytes())
        if len(windows) == 1
        else None
        for windows in sequences
    ]
    cached = [row for row, key in enumerate(keys) if key is not None]
    values = await cache.lookup(stored.name, [key for key in keys if key is not None])
    hits = {row: value for row, value in zip(cached, values, strict=True) if value is not None}
    if hits:  # every vector of a model has its width: one that differs is not trusted
        width_bytes = len(next(iter(hits.values())))
        hits = {row: value for row, value in hits.items() if len(value) == width_bytes and width_bytes % 4 == 0}
    misses = [row for row in range(len(sequences)) if row not in hits]
    token_count = sum(len(window) for windows in sequences for window in windows)
    truncated_count = sum(inputs.truncated)
    provenance = {
        MODEL_DIGEST_HEADER: stored.digest,
        LLAMA_VERSION_HEADER: inputs.llama_version,
        CACHE_HITS_HEADER: str(len(hits)),
    }
    load_duration_ns = 0
    inference_s = 0.0
    metrics = app[METRICS]
    if misses:
        longest_tokens = max(len(window) for row in misses for window in sequences[row])
        async with app[SCHEDULER].lease(stored, options, keep_alive_s, longest_tokens) as lease:
            stats.model = lease.loaded.name
            load_duration_ns = lease.load_duration_ns
            result = await lease.loaded.runner.embed_sequences([sequences[row] for row in misses], task, background)
        inference_s = result.inference_s
        metrics.decoded(stats.model, result.decodes, result.quick_decodes)
        vectors = np.empty((len(sequences), result.vectors.shape[1]), dtype=np.float32)
        vectors[misses] = result.vectors
        cache.store(
            [
                (key, result.vectors[index].tobytes())
                for index, row in enumerate(misses)
                if (key := keys[row]) is not None
            ]
        )
    else:
        vectors = np.empty((len(sequences), len(next(iter(hits.values()))) // 4), dtype=np.float32)
    for row, value in hits.items():
        if len(value) != 4 * vectors.shape[1]:
            raise RunnerCrashed(f"the vector cache holds a vector of another width for {stored.name}")
        vectors[row] = _vector(value)
    queue_s = max(0.0, time.perf_counter() - started_s - inference_s)
    stats.tokens, stats.queue_ms, stats.inference_ms = token_count, queue_s * 1e3, inference_s * 1e3
    metrics.embedded(stats.model, len(sequences), token_count, truncated_count, queue_s, inference_s)
    windows = [len(windows) for windows in sequences]
    return Embedded(vectors, token_count, truncated_count, load_duration_ns, provenance, windows)
