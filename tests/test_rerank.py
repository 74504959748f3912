"""Reranking on a tiny random-weight cross-encoder made in the tests: the scores are llama.cpp's own
rank pooling, the order follows them, and a real client (cohere's ClientV2) works unchanged."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import cohere
import httpx
import llama_cpp
import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from llama_cpp import _internals as internals

from daemon.store import ModelStore
from tests.conftest import MakeClient
from tests.live import running_daemon

Client = TestClient[Any, Any]
QUERY = "why is the sky blue?"
DOCUMENTS = ["the sky is blue", "grass is green", "hello world", "why is grass green?", "blue blue sky", "the"]


def llama_cpp_scores(path: Path, query: str, documents: list[str]) -> list[float]:
    """Rank pooling run directly with llama-cpp-python, each pair laid out as llama.cpp's server
    does for a BERT vocabulary: [CLS] query [SEP] document [SEP]."""
    llama_cpp.llama_backend_init()
    model = internals.LlamaModel(path_model=str(path), params=llama_cpp.llama_model_default_params(), verbose=False)
    params = llama_cpp.llama_context_default_params()
    params.embeddings, params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = True, 64, 64, 64, 1
    context = internals.LlamaContext(model=model, params=params, verbose=False)
    assert llama_cpp.llama_pooling_type(context.ctx) == llama_cpp.LLAMA_POOLING_TYPE_RANK
    cls, sep = llama_cpp.llama_vocab_bos(model.vocab), llama_cpp.llama_vocab_sep(model.vocab)
    scores = []
    for document in documents:
        tokens = [cls, *model.tokenize(query.encode(), False, False), sep]
        tokens += [*model.tokenize(document.encode(), False, False), sep]
        batch = internals.LlamaBatch(n_tokens=64, embd=0, n_seq_max=1, verbose=False)
        batch.add_sequence(tokens, 0, True)
        context.decode(batch)
        pointer = llama_cpp.llama_get_embeddings_seq(context.ctx, 0)
        scores.append(float(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float))[0]))
        batch.close()
    context.close()
    model.close()
    return scores


@pytest.fixture
async def client(make_client: MakeClient, reranker_gguf: Path, tiny_gguf: Path) -> Client:
    return await make_client({"reranker": reranker_gguf, "tiny": tiny_gguf})


async def post(client: Client, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    response = await client.post(path, json=body)
    return response.status, await response.json()


async def test_scores_are_llama_cpps_rank_pooling_and_the_order_follows_them(
    client: Client, reranker_gguf: Path
) -> None:
    expected = llama_cpp_scores(reranker_gguf, QUERY, DOCUMENTS)
    assert len(set(np.round(expected, 4))) == len(DOCUMENTS)  # distinct: the order means something
    for path in ("/api/rerank", "/v1/rerank"):
        response = await client.post(path, json={"model": "reranker", "query": QUERY, "documents": DOCUMENTS})
        status, body = response.status, await response.json()
        assert status == 200
        assert response.headers["X-Emberd-Model-Digest"].startswith("sha256:")  # what produced the scores
        assert response.headers["X-Emberd-Llama-Cpp"].startswith("llama-cpp-python ")
        results = body["results"]
        assert [r["index"] for r in results] == sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
        for result in results:
            # Equal up to float accumulation: emberd packs pairs into one decode, this test one by one.
            assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=2e-3)
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


def test_coheres_client_v2_reranks_through_emberd(tmp_path: Path, reranker_gguf: Path) -> None:
    home = tmp_path / "home"
    store = ModelStore(home)
    store.open()
    store.create("reranker", reranker_gguf)
    expected = llama_cpp_scores(reranker_gguf, QUERY, DOCUMENTS)
    with running_daemon(home, {}, {}) as daemon, httpx.Client() as http:
        client = cohere.ClientV2(api_key="unused", base_url=daemon.url, httpx_client=http)
        answer = client.rerank(model="reranker", query=QUERY, documents=DOCUMENTS, top_n=3)
    best = sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])[:3]
    assert [result.index for result in answer.results] == best
    assert [result.relevance_score for result in answer.results] == pytest.approx([expected[i] for i in best], abs=2e-3)
