"""Reranking as a user would: a random-weight cross-encoder saved by transformers, converted by emberd,
scores as sentence-transformers' CrossEncoder scores the same folder; the order follows the scores,
and a real client (cohere's ClientV2) works unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cohere
import httpx
import numpy as np
import pytest
import torch
from aiohttp.test_utils import TestClient
from sentence_transformers import CrossEncoder

from daemon.convert import convert_hf_directory
from daemon.store import ModelStore
from tests.conftest import MakeClient
from tests.live import running_daemon
from tests.tiny_models import make_transformers_cross_encoder_dir

Client = TestClient[Any, Any]
QUERY = "why is the sky blue?"
# llama.cpp's GELU (a table of f16 values) against torch's exact one (1.8e-4 apart on a score of 0.04).
TOLERANCE = 2e-3
DOCUMENTS = ["the sky is blue", "grass is green", "hello world", "why is grass green?", "blue blue sky", "the"]


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's cross-encoder folder: a random BertForSequenceClassification saved by transformers."""
    return make_transformers_cross_encoder_dir(tmp_path_factory.mktemp("cross-encoder") / "model", seed=3)


@pytest.fixture(scope="module")
def cross_encoder_gguf(cross_encoder_dir: Path) -> Path:
    path = cross_encoder_dir.parent / "cross-encoder.gguf"
    convert_hf_directory(cross_encoder_dir, path, "f32", "cross-encoder")
    return path


@pytest.fixture(scope="module")
def expected(cross_encoder_dir: Path) -> list[float]:
    """sentence-transformers' CrossEncoder on the same folder: the model's raw relevance scores."""
    model = CrossEncoder(str(cross_encoder_dir), device="cpu", activation_fn=torch.nn.Identity())
    scores = [float(score) for score in model.predict([(QUERY, document) for document in DOCUMENTS])]
    assert np.diff(np.sort(scores)).min() > 10 * TOLERANCE  # far apart: the order means something
    return scores


@pytest.fixture
async def client(make_client: MakeClient, cross_encoder_gguf: Path, tiny_gguf: Path) -> Client:
    return await make_client({"reranker": cross_encoder_gguf, "tiny": tiny_gguf})


async def post(client: Client, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    response = await client.post(path, json=body)
    return response.status, await response.json()


async def test_scores_are_the_cross_encoders_and_the_order_follows_them(client: Client, expected: list[float]) -> None:
    for path in ("/api/rerank", "/v1/rerank"):
        response = await client.post(path, json={"model": "reranker", "query": QUERY, "documents": DOCUMENTS})
        status, body = response.status, await response.json()
        assert status == 200
        assert response.headers["X-Emberd-Model-Digest"].startswith("sha256:")  # what produced the scores
        assert response.headers["X-Emberd-Llama-Cpp"].startswith("llama-cpp-python ")
        results = body["results"]
        assert [r["index"] for r in results] == sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
        for result in results:
            assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=TOLERANCE)
            assert "document" not in result
        assert body["usage"]["prompt_tokens"] > len(DOCUMENTS) * 4


async def test_top_n_return_documents_and_an_empty_list(client: Client) -> None:
    body = {"model": "reranker", "query": QUERY, "documents": [{"text": d} for d in DOCUMENTS], "top_n": 2}
    status, answer = await post(client, "/api/rerank", {**body, "return_documents": True})
    assert status == 200 and len(answer["results"]) == 2
    assert all(r["document"] == {"text": DOCUMENTS[r["index"]]} for r in answer["results"])
    status, answer = await post(client, "/api/rerank", {**body, "top_n": 100})
    assert len(answer["results"]) == len(DOCUMENTS)  # top_n beyond the documents: all of them
    status, answer = await post(client, "/api/rerank", {**body, "documents": []})
    assert (status, answer["results"]) == (200, [])


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/api/embed", {"model": "reranker", "input": "x"}, "reranker:latest is a reranker: use /api/rerank"),
        ("/v1/embeddings", {"model": "reranker", "input": "x"}, "is a reranker"),
        ("/api/rerank", {"model": "tiny", "query": "q", "documents": ["d"]}, "not a reranker: use /api/embed"),
        ("/api/rerank", {"model": "reranker", "query": "q", "documents": ["d"], "top_n": 0}, "top_n must be"),
        ("/api/rerank", {"model": "reranker", "documents": ["d"]}, "query is required"),
        ("/api/rerank", {"model": "reranker", "query": "q", "documents": "d"}, "documents must be an array"),
        ("/api/rerank", {"model": "reranker", "query": "q", "documents": [5]}, "documents must be strings"),
    ],
)
async def test_mismatched_models_and_bad_requests_get_a_clear_400(
    client: Client, path: str, body: dict[str, Any], message: str
) -> None:
    response = await client.post(path, json=body)
    assert response.status == 400
    assert message in await response.text()


async def test_show_lists_the_rerank_capability(client: Client) -> None:
    _, shown = await post(client, "/api/show", {"model": "reranker"})
    assert shown["capabilities"] == ["rerank"]
    _, shown = await post(client, "/api/show", {"model": "tiny"})
    assert shown["capabilities"] == ["embedding"]


def test_coheres_client_v2_reranks_through_emberd(
    tmp_path: Path, cross_encoder_gguf: Path, expected: list[float]
) -> None:
    home = tmp_path / "home"
    store = ModelStore(home)
    store.open()
    store.create("reranker", cross_encoder_gguf)
    with running_daemon(home, {}, {}) as daemon, httpx.Client() as http:
        client = cohere.ClientV2(api_key="unused", base_url=daemon.url, httpx_client=http)
        answer = client.rerank(model="reranker", query=QUERY, documents=DOCUMENTS, top_n=3)
    best = sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])[:3]
    assert [result.index for result in answer.results] == best
    assert [result.relevance_score for result in answer.results] == pytest.approx(
        [expected[i] for i in best], abs=TOLERANCE
    )
