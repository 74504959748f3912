"""Typed vectors in the answers of /api/embed, /v1/embeddings and /v2/embed (daemon.typed_vectors),
with the model's calibrated ranges when int8 or uint8 is asked for (daemon.calibration)."""

from __future__ import annotations

from typing import Any

import numpy as np
from aiohttp import web

from daemon.api.common import CALIBRATOR, stored_model
from daemon.typed_vectors import CALIBRATED_TYPES, check_calibrated_use, check_embedding_types, typed_vectors


def requested_types(types: list[str], what: str, normalized: bool, cut: bool) -> list[str]:
    """The types asked for, checked before anything is embedded: each known, and int8/uint8 only on
    unit vectors at full width (their ranges were calibrated there)."""
    chosen = check_embedding_types(types, what)
    check_calibrated_use(chosen, normalized, cut)
    return chosen


async def typed_embeddings(app: web.Application, model: str, vectors: np.ndarray, types: list[str]) -> dict[str, Any]:
    """The finished vectors as each type asks, by type."""
    ranges = None
    if CALIBRATED_TYPES.intersection(types) and len(vectors):
        ranges = await app[CALIBRATOR].ranges(await stored_model(app, model))
    return {kind: typed_vectors(vectors, kind, ranges) for kind in types}
