"""The embedding path every dialect shares: (auto-pull), admit, lease a runner, embed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from daemon.api.common import HUB, PULLS, SCHEDULER, SETTINGS, STORE
from daemon.errors import UnknownModel


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # (inputs, n_embd) float32 as pooled by the model, not normalised
    token_count: int
    truncated_count: int
    load_duration_ns: int


async def pull_if_allowed(app: web.Application, name: str) -> None:
    """With auto_pull on, fetch a model that is not local but that the Hub can provide."""
    if not app[SETTINGS].auto_pull:
        return
    try:
        await asyncio.to_thread(app[STORE].get, name)
    except UnknownModel:
        if not app[HUB].knows(name):
            raise
        await app[PULLS].pull(name)


async def embed_inputs(
    app: web.Application,
    model: str,
    inputs: list[str] | list[str | list[int]],
    truncate: bool,
    options: dict[str, Any],
    keep_alive_s: float | None,
) -> Embedded:
    """Embed texts (or token-id lists of the model's vocabulary). With no inputs, the model is
    only loaded: the preload idiom."""
    await pull_if_allowed(app, model)
    scheduler = app[SCHEDULER]
    async with scheduler.admit(), scheduler.lease(model, options, keep_alive_s) as lease:
        if not inputs:
            return Embedded(np.empty((0, 0), np.float32), 0, 0, lease.load_duration_ns)
        result = await lease.loaded.runner.embed(inputs, truncate)
    return Embedded(result.vectors, result.token_count, result.truncated_count, lease.load_duration_ns)
