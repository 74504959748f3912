"""Correctness on the real all-MiniLM-L6-v2, converted by emberd from the PyPI snapshot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import DATA_DIR, MINILM_DIR, MakeClient
from tests.test_api_embed import embed

Client = TestClient[Any, Any]
ST_REFERENCE = json.loads((DATA_DIR / "st_all_minilm.json").read_text(encoding="utf-8"))
OLLAMA_REFERENCE = json.loads((DATA_DIR / "ollama_all-minilm.json").read_text(encoding="utf-8"))


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture
async def minilm_client(make_client: MakeClient, minilm_gguf: Path) -> Client:
    return await make_client({"all-minilm": minilm_gguf})


async def test_vectors_match_sentence_transformers(minilm_client: Client) -> None:
    texts = [item["text"] for item in ST_REFERENCE["texts"]]
    assert len(texts) >= 12
    status, body = await embed(minilm_client, {"model": "all-minilm", "input": texts})
    assert status == 200
    for item, vector in zip(ST_REFERENCE["texts"], body["embeddings"], strict=True):
        assert len(vector) == 384
        assert cosine(vector, item["vector"]) >= 0.9999, item["text"]
    assert body["prompt_eval_count"] == sum(item["token_count"] for item in ST_REFERENCE["texts"])


async def test_matches_ollamas_own_expected_vectors(minilm_client: Client) -> None:
    single = OLLAMA_REFERENCE["api_embed"]
    status, body = await embed(minilm_client, {"model": "all-minilm", "input": single["input"]})
    assert status == 200
    assert body["prompt_eval_count"] == single["prompt_eval_count"] == 8
    assert cosine(body["embeddings"][0], single["vector"]) >= 0.99

    batch = OLLAMA_REFERENCE["api_embed_batch"]
    status, body = await embed(minilm_client, {"model": "all-minilm", "input": batch["input"]})
    assert body["prompt_eval_count"] == batch["prompt_eval_count"]
    for vector, expected in zip(body["embeddings"], batch["vectors"], strict=True):
        assert cosine(vector, expected) >= 0.99


async def test_the_readme_curls(minilm_client: Client) -> None:
    status, body = await embed(minilm_client, {"model": "all-minilm", "input": "Why is the sky blue?"})
    assert status == 200
    assert (len(body["embeddings"]), len(body["embeddings"][0]), body["prompt_eval_count"]) == (1, 384, 8)
    two = ["Why is the sky blue?", "Why is the grass green?"]
    status, body = await embed(minilm_client, {"model": "all-minilm", "input": two})
    assert (len(body["embeddings"]), body["prompt_eval_count"]) == (2, 16)


async def test_a_text_gets_the_same_vector_alone_and_inside_a_batch_of_64(minilm_client: Client) -> None:
    texts = [item["text"] for item in ST_REFERENCE["texts"]]
    batch = [texts[i % len(texts)] + f" #{i}" for i in range(64)]
    target = batch[37]
    _, alone = await embed(minilm_client, {"model": "all-minilm", "input": target})
    _, together = await embed(minilm_client, {"model": "all-minilm", "input": batch})
    assert len(together["embeddings"]) == 64
    assert cosine(alone["embeddings"][0], together["embeddings"][37]) >= 0.99999


async def test_the_full_trained_context_is_honoured_with_no_hidden_cap(minilm_client: Client) -> None:
    long_text = "the sky is blue because of rayleigh scattering. " * 60  # about 600 tokens
    response = await minilm_client.post("/api/embed", json={"model": "all-minilm", "input": long_text})
    body = await response.json()
    assert body["prompt_eval_count"] == 512  # the model's trained context, not less
    assert response.headers["X-Emberd-Truncated-Inputs"] == "1"


async def test_the_legacy_endpoint_matches_ollamas_raw_vector_and_scale(minilm_client: Client) -> None:
    legacy = OLLAMA_REFERENCE["legacy_api_embeddings"]
    response = await minilm_client.post("/api/embeddings", json={"model": "all-minilm", "prompt": legacy["prompt"]})
    vector = (await response.json())["embedding"]
    assert cosine(vector, legacy["vector"]) >= 0.99
    # Ollama returns all-MiniLM's mean-pooled vector unnormalised; so does emberd.
    assert np.linalg.norm(vector) == pytest.approx(np.linalg.norm(legacy["vector"]), rel=0.01)


async def test_token_ids_with_or_without_the_special_tokens_give_the_texts_vector(
    make_client: MakeClient, minilm_gguf: Path
) -> None:
    client = await make_client({"all-minilm": minilm_gguf}, openai_token_ids="model")
    vocab = (MINILM_DIR / "vocab.txt").read_text(encoding="utf-8").splitlines()
    bare = [vocab.index(word) for word in ["why", "is", "the", "sky", "blue", "?"]]
    as_a_tokenizer_gives_them = [vocab.index("[CLS]"), *bare, vocab.index("[SEP]")]  # [101, 2339, ..., 102]
    _, text = await embed(client, {"model": "all-minilm", "input": "why is the sky blue?"})
    for ids in (as_a_tokenizer_gives_them, bare):
        response = await client.post("/v1/embeddings", json={"model": "all-minilm", "input": [ids]})
        body = await response.json()
        assert body["usage"]["prompt_tokens"] == 8
        assert cosine(body["data"][0]["embedding"], text["embeddings"][0]) > 0.99999


async def test_every_embedding_answer_says_what_produced_it(minilm_client: Client) -> None:
    digest = next(m["digest"] for m in (await (await minilm_client.get("/api/tags")).json())["models"])
    for path, body in (
        ("/api/embed", {"model": "all-minilm", "input": "hello"}),
        ("/api/embeddings", {"model": "all-minilm", "prompt": "hello"}),
        ("/v1/embeddings", {"model": "all-minilm", "input": "hello"}),
    ):
        response = await minilm_client.post(path, json=body)
        assert response.status == 200
        assert response.headers["X-Emberd-Model-Digest"] == f"sha256:{digest}"  # /api/tags gives the hex
        assert response.headers["X-Emberd-Llama-Cpp"].startswith("llama-cpp-python 0.3.")
        assert "ggml " in response.headers["X-Emberd-Llama-Cpp"]
