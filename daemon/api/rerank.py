"""POST /api/rerank, /v1/rerank and /v2/rerank: a reranker (a GGUF with llama.cpp's rank pooling)
scores each document against the query.

*emberd goes further:* Ollama has no reranking (ollama/ollama#3368). The request and answer are
the shape llama.cpp's server, Jina and Cohere use; query/document pairs join the runner's batches
like any embedding input.
"""

from __future__ import annotations

import uuid
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


def rank(scores: np.ndarray, top_n: int | None) -> list[int]:
    """Document indexes, best score first (ties keep the documents' order), at most top_n."""
    order = np.argsort(-scores, kind="stable")
    return [int(index) for index in order[: top_n if top_n is not None else len(order)]]


@admitted(queue_slot=True)
async def rerank(request: web.Request) -> web.Response:
    body = await read_model(request, RerankRequest)
    name, query = body.model_name, body.query
    if not name.strip():
        raise InvalidInput("model is required")
    if query is None:
        raise InvalidInput("query is required")
    if body.documents is None:
        raise InvalidInput("documents must be an array")
    documents = body.texts
    check_input_count(len(documents), request.app[SETTINGS])
    check_model_kind(await stored_model(request.app, name), pairs=True)
    usage = {"prompt_tokens": 0, "total_tokens": 0}
    answer: dict[str, Any] = {"id": str(uuid.uuid4()), "model": name, "results": [], "usage": usage}
    if not documents:
        return json_response(answer)
    pairs = [{"query": query, "document": text} for text in documents]
    embedded = await embed_inputs(request, name, pairs, True, {}, None)
    scores = embedded.vectors[:, 0]
    answer["results"] = [
        {
            "index": index,
            "relevance_score": float(scores[index]),
            **({"document": {"text": documents[index]}} if body.return_documents else {}),
        }
        for index in rank(scores, body.top_n)
    ]
    usage["prompt_tokens"] = usage["total_tokens"] = embedded.token_count
    answer["meta"] = {"billed_units": {"search_units": 1}}  # Cohere's clients read it
    return json_response(answer, headers=embedded.provenance)


def add_routes(app: web.Application) -> None:
    for path in ("/api/rerank", "/v1/rerank", "/v2/rerank"):
        app.router.add_post(path, rerank)
