"""`normalize: false` on /api/embed (TEI's field): the pooled vector as the model gives it, held to
llama.cpp's own unnormalised vector of the same text, and cut by `dimensions` without renormalising."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import MakeClient

Client = TestClient[Any, Any]
TEXTS = ["Why is the sky blue?", "Rayleigh scattering of sunlight by the air", "a"]


def assert_same_direction(vectors: np.ndarray, expected: np.ndarray) -> None:
    # The daemon's context uses flash attention (llama.cpp's default, auto); Llama.embed turns it off:
    # the same vectors to about 1e-3 per value, so direction and length are what is compared.
    cosines = np.sum(vectors * expected, axis=1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(expected, axis=1))
    assert np.all(cosines >= 0.99999), cosines


@pytest.fixture(scope="module")
def raw_vectors(minilm_gguf: Path) -> Iterator[np.ndarray]:
    """llama.cpp's pooled vectors of each text, not normalised (llama-cpp-python's Llama.embed)."""
    model = llama_cpp.Llama(str(minilm_gguf), embedding=True, n_ctx=512, n_threads=1, verbose=False)
    try:
        yield np.array([model.embed(text, normalize=False) for text in TEXTS], dtype=np.float64)
    finally:
        model.close()


@pytest.fixture
async def client(make_client: MakeClient, minilm_gguf: Path) -> Client:
    return await make_client({"all-minilm": minilm_gguf})


async def embed(client: Client, **fields: Any) -> tuple[int, Any]:
    response = await client.post("/api/embed", json={"model": "all-minilm", "input": TEXTS, **fields})
    return response.status, await response.json()


async def test_normalize_false_gives_the_models_own_vectors(client: Client, raw_vectors: np.ndarray) -> None:
    status, body = await embed(client, normalize=False)
    assert status == 200, body
    vectors = np.array(body["embeddings"], dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    assert np.all(np.abs(norms - 1.0) > 0.01), norms  # all-MiniLM's mean-pooled vectors are not unit length
    np.testing.assert_allclose(norms, np.linalg.norm(raw_vectors, axis=1), rtol=1e-3)
    assert_same_direction(vectors, raw_vectors)


async def test_the_default_is_unit_length_and_is_the_raw_vector_scaled(client: Client, raw_vectors: np.ndarray) -> None:
    for fields in ({}, {"normalize": True}):
        status, body = await embed(client, **fields)
        assert status == 200, body
        vectors = np.array(body["embeddings"], dtype=np.float64)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert_same_direction(vectors, raw_vectors)


async def test_dimensions_without_normalize_cut_the_raw_vector(client: Client, raw_vectors: np.ndarray) -> None:
    status, body = await embed(client, normalize=False, dimensions=64)
    assert status == 200, body
    vectors = np.array(body["embeddings"], dtype=np.float64)
    assert vectors.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), np.linalg.norm(raw_vectors[:, :64], axis=1), rtol=1e-3)
    assert_same_direction(vectors, raw_vectors[:, :64])
    # Not renormalised: the cut holds part of the full vector's length.
    full = np.array((await embed(client, normalize=False))[1]["embeddings"], dtype=np.float64)
    assert np.all(np.linalg.norm(vectors, axis=1) < np.linalg.norm(full, axis=1))


async def test_normalize_must_be_a_boolean(client: Client) -> None:
    status, body = await embed(client, normalize="no")
    assert status == 400 and body["error"] == "normalize must be true or false", body
