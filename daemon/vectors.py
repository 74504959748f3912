"""Post-processing of pooled vectors: L2 normalisation, Matryoshka `dimensions`, finiteness."""

from __future__ import annotations

import numpy as np

from daemon.errors import InvalidEmbedding, InvalidInput

NON_FINITE_MESSAGE = "embedding contains NaN or Inf values"


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Unit-length rows; an all-zero row stays zero (as Ollama's normalize does)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    safe = np.where(norms > 0, norms, 1.0)
    return (vectors / safe).astype(np.float32, copy=False)


def check_finite(vectors: np.ndarray) -> None:
    if not np.isfinite(vectors).all():
        raise InvalidEmbedding(NON_FINITE_MESSAGE)


def finish_embeddings(pooled: np.ndarray, dimensions: int | None) -> np.ndarray:
    """What /api/embed returns: normalised, optionally cut to the first `dimensions` values and
    renormalised. More dimensions than the model has is a 400, as OpenAI answers it (not silently
    the full width); 0 or None means the full width (Go's zero value: Ollama clients send it)."""
    check_finite(pooled)
    vectors = normalize_rows(pooled)
    width = vectors.shape[1]
    if dimensions is not None and (dimensions < 0 or (dimensions > width and len(vectors))):
        raise InvalidInput(f"dimensions must be between 1 and the model's {width}, got {dimensions}")
    if dimensions is not None and 0 < dimensions < width:
        vectors = normalize_rows(np.ascontiguousarray(vectors[:, :dimensions]))
    return vectors
