"""The embedding path every dialect shares: (auto-pull), admit, lease a runner, embed, record."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from daemon.adapters import choose_input_prefix
from daemon.api.common import (
    HUB,
    LLAMA_VERSION_HEADER,
    METRICS,
    MODEL_DIGEST_HEADER,
    PULLS,
    REQUEST_STATS,
    SCHEDULER,
    SETTINGS,
    RequestStats,
    check_request_tokens,
    stored_model,
)
from daemon.errors import InvalidInput, UnknownModel
from daemon.memory import input_tokens_bound
from daemon.options import context_limit, resolve_load_options
from daemon.prompts import apply_prompt
from daemon.runner.client import RunnerInput
from daemon.store import StoredModel

MAX_LOGGED_NAME_CHARS = 200


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # (inputs, n_embd) float32 as pooled by the model, not normalised
    token_count: int
    truncated_count: int
    load_duration_ns: int
    provenance: dict[str, str]  # headers saying what produced the vectors (model digest, llama.cpp)
    windows: list[int]  # per input: 1, or the windows a long input was split into


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
    request: web.Request,
    model: str,
    inputs: Sequence[RunnerInput],
    truncate: bool,
    options: dict[str, Any],
    keep_alive_s: float | None,
    prompt_name: str | None = None,
    input_type: str | None = None,
    split_long_inputs: bool = False,
    task: str | None = None,
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
    longest_tokens = input_tokens_bound(inputs)
    async with scheduler.lease(stored, options, keep_alive_s, longest_tokens) as lease:
        stats.model = lease.loaded.name
        facts = lease.loaded.runner.facts
        provenance = {
            MODEL_DIGEST_HEADER: lease.loaded.model.digest,
            LLAMA_VERSION_HEADER: facts.llama_version if facts is not None else "",
        }
        if not inputs:
            return Embedded(np.empty((0, 0), np.float32), 0, 0, lease.load_duration_ns, provenance, [])
        result = await lease.loaded.runner.embed(inputs, truncate, lease.limit_tokens, split_long_inputs, chosen.task)
    # Queue time is everything but the runner's decoding: admission, loading, the runner's queue.
    queue_s = max(0.0, time.perf_counter() - started_s - result.inference_s)
    stats.tokens, stats.queue_ms, stats.inference_ms = result.token_count, queue_s * 1e3, result.inference_s * 1e3
    metrics = app[METRICS]
    metrics.embedded(stats.model, len(inputs), result.token_count, result.truncated_count, queue_s, result.inference_s)
    metrics.decoded(stats.model, result.decodes, result.quick_decodes)
    return Embedded(
        result.vectors, result.token_count, result.truncated_count, lease.load_duration_ns, provenance, result.windows
    )
