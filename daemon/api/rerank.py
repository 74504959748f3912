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
    STORE,
    admitted,
    check_input_count,
    json_response,
    model_name,
    read_json_object,
    require_type,
)
from daemon.api.embedding import embed_inputs
from daemon.errors import InvalidInput


@dataclass(frozen=True)
class RerankRequest:
    model: str
    query: str
    documents: list[str]
    top_n: int | None
    return_documents: bool


def _document_text(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return str(item["text"])  # Cohere's and Jina's {"text": ...}
    raise InvalidInput('documents must be strings (or {"text": ...} objects)')


def decode_rerank_request(document: dict[str, Any]) -> RerankRequest:
    name = model_name(document)
    if not name.strip():
        raise InvalidInput("model is required")
    query = require_type(document, "query", str, "a string")
    if query is None:
        raise InvalidInput("query is required")
    documents = document.get("documents")
    if not isinstance(documents, list):
        raise InvalidInput("documents must be an array")
    top_n = require_type(document, "top_n", int, "an integer")
    if top_n is not None and top_n < 1:
        raise InvalidInput("top_n must be a positive integer")
    return_documents = require_type(document, "return_documents", bool, "true or false") or False
    return RerankRequest(name, query, [_document_text(item) for item in documents], top_n, return_documents)


def rank(scores: np.ndarray, top_n: int | None) -> list[int]:
    """Document indexes, best score first (ties keep the documents' order), at most top_n."""
    order = np.argsort(-scores, kind="stable")
    return [int(index) for index in order[: top_n if top_n is not None else len(order)]]


@admitted(queue_slot=True)
async def rerank(request: web.Request) -> web.Response:
    body = decode_rerank_request(await read_json_object(request))
    check_input_count(len(body.documents), request.app[SETTINGS])
    stored = request.app[STORE].get(body.model)
    if not stored.facts.is_reranker:
        raise InvalidInput(f"{stored.name} is an embedding model, not a reranker: use /api/embed")
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
