"""Post-processing of pooled vectors: L2 normalisation, Matryoshka `dimensions`, finiteness, and how
the windows of a long input make its one vector."""

from __future__ import annotations

import numpy as np

from daemon.errors import InvalidEmbedding, InvalidInput

# llama.cpp's LLAMA_POOLING_TYPE_MEAN (gguf's PoolingType.MEAN).
MEAN_POOLING = 1

NON_FINITE_MESSAGE = "embedding contains NaN or Inf values"


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Unit-length rows; an all-zero row stays zero (as Ollama's normalize does)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    safe = np.where(norms > 0, norms, 1.0)
    return (vectors / safe).astype(np.float32, copy=False)


def check_finite(vectors: np.ndarray) -> None:
    if not np.isfinite(vectors).all():
        raise InvalidEmbedding(NON_FINITE_MESSAGE)


def finish_embeddings(pooled: np.ndarray, dimensions: int | None, normalize: bool = True) -> np.ndarray:
    """What /api/embed returns: normalised, optionally cut to the first `dimensions` values and
    renormalised. More dimensions than the model has is a 400, as OpenAI answers it (not silently
    the full width); 0 or None means the full width (Go's zero value: Ollama clients send it).

    `normalize` False (TEI's field) returns the pooled vectors as the model gave them, and cuts them
    to `dimensions` without renormalising (a long input's windows are still combined as
    window_share says)."""
    check_finite(pooled)
    vectors = normalize_rows(pooled) if normalize else pooled.astype(np.float32, copy=False)
    width = vectors.shape[1]
    if dimensions is not None and (dimensions < 0 or (dimensions > width and len(vectors))):
        raise InvalidInput(f"dimensions must be between 1 and the model's {width}, got {dimensions}")
    if dimensions is not None and 0 < dimensions < width:
        cut = np.ascontiguousarray(vectors[:, :dimensions])
        vectors = normalize_rows(cut) if normalize else cut
    return vectors


def window_share(vector: np.ndarray, window_tokens: int, pooling_type: int) -> tuple[np.ndarray, float]:
    """A window's part in the vector of the long input it came from (split_long_inputs): what is added
    to the input's sum, and the weight added to its total (the input's vector is the sum over the
    total, normalised as every vector is).

    Mean pooling: the window's vector weighted by its tokens, so the input's vector is the mean of
    every token's (a token two windows share counts twice). CLS, last-token and other pooling: the
    window's vector is one token's, which says nothing of the window's length, so every window counts
    the same: the plain mean of the windows' unit vectors (normalised first, so that no window
    weighs more for the length of its raw vector)."""
    if pooling_type == MEAN_POOLING:
        return vector * window_tokens, float(window_tokens)
    norm = float(np.linalg.norm(vector))
    return (vector / norm if norm > 0 else vector), 1.0
