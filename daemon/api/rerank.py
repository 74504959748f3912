"""POST /api/rerank, /v1/rerank and /v2/rerank: a reranker (a GGUF with llama.cpp's rank pooling)
scores each document against the query.

*emberd goes further:* Ollama has no reranking (ollama/ollama#3368). The request and answer are
the shape llama.cpp's server, Jina and Cohere use; query/document pairs join the runner's batches
like any embedding input.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from daemon.api.common import (
    SETTINGS,
    admitted,
    check_input_count,
    json_response,
    read_model,
    stored_model,
)
from daemon.api.embedding import check_model_kind, embed_inputs
from daemon.api.models import RerankRequest
from daemon.errors import InvalidInput


@dataclass(frozen=True)
class Rerank:
    """A checked rerank request."""

    model: str
    query: str
    documents: list[str]
    top_n: int | None
    return_documents: bool


def check_rerank_request(body: RerankRequest) -> Rerank:
    """What the model's types cannot say: the fields a request must have."""
    name = body.model_name
    if not name.strip():
        raise InvalidInput("model is required")
    if body.query is None:
        raise InvalidInput("query is required")
    if body.documents is None:
        raise InvalidInput("documents must be an array")
    return Rerank(name, body.query, body.texts, body.top_n, bool(body.return_documents))


def rank(scores: np.ndarray, top_n: int | None) -> list[int]:
    """Document indexes, best score first (ties keep the documents' order), at most top_n."""
    order = np.argsort(-scores, kind="stable")
    return [int(index) for index in order[: top_n if top_n is not None else len(order)]]


@admitted(queue_slot=True)
async def rerank(request: web.Request) -> web.Response:
    body = check_rerank_request(await read_model(request, RerankRequest))
    check_input_count(len(body.documents), request.app[SETTINGS])
    check_model_kind(await stored_model(request.app, body.model), pairs=True)
    usage = {"prompt_tokens": 0, "total_tokens": 0}
    answer: dict[str, Any] = {"id": str(uuid.uuid4()), "model": body.model, "results": [], "usage": usage}
    if not body.documents:
        return json_response(answer)
    pairs = [{"query": body.query, "document": text} for text in body.documents]
    embedded = await embed_inputs(request, body.model, pairs, True, {}, None)
    scores = embedded.vectors[:, 0]
    answer["results"] = [
        {
            "index": index,
            "relevance_score": float(scores[index]),
            **({"document": {"text": body.documents[index]}} if body.return_documents else {}),
        }
        for index in rank(scores, body.top_n)
    ]
    usage["prompt_tokens"] = usage["total_tokens"] = embedded.token_count
    answer["meta"] = {"billed_units": {"search_units": 1}}  # Cohere's clients read it
    return json_response(answer, headers=embedded.provenance)


def add_routes(app: web.Application) -> None:
    for path in ("/api/rerank", "/v1/rerank", "/v2/rerank"):
        app.router.add_post(path, rerank)
