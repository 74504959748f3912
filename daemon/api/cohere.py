"""Cohere's embed v2: POST /v2/embed, with typed vectors and truncate NONE/START/END (errors use
Cohere's {"message"} body, see api.common.error_body). Rerank v2 is daemon.api.rerank's."""

from __future__ import annotations

import uuid

from aiohttp import web

from daemon.api.common import SETTINGS, TRUNCATED_HEADER, admitted, check_input_count, json_response, read_model
from daemon.api.embedding import embed_inputs
from daemon.api.models import COHERE_TRUNCATE, CohereEmbedRequest
from daemon.api.typed import requested_types, typed_embeddings
from daemon.errors import InvalidInput
from daemon.vectors import finish_embeddings

# Cohere's input types that pick a model's prompt or task; "image" and others are not served.
COHERE_INPUT_TYPES = ("search_query", "search_document", "classification", "clustering")


@admitted(queue_slot=True)
async def embed(request: web.Request) -> web.Response:
    body = await read_model(request, CohereEmbedRequest)
    name = body.model_name
    if not name.strip():
        raise InvalidInput("model is required")
    if body.images or body.inputs:
        raise InvalidInput("emberd embeds texts: send them in texts (images and inputs are not served)")
    if body.texts is None:
        raise InvalidInput("texts is required")
    if body.input_type is not None and body.input_type not in COHERE_INPUT_TYPES:
        raise InvalidInput(f"input_type must be one of {', '.join(COHERE_INPUT_TYPES)}; got {body.input_type!r}")
    truncate = (body.truncate or "END").upper()
    if truncate not in COHERE_TRUNCATE:
        raise InvalidInput(f"truncate must be NONE, START or END; got {body.truncate!r}")
    normalized = body.normalize is not False
    types = requested_types(
        body.embedding_types or ["float"], "embedding_types", normalized, body.output_dimension is not None
    )
    texts = body.texts
    check_input_count(len(texts), request.app[SETTINGS])
    embedded = await embed_inputs(
        request,
        name,
        texts,
        truncate != "NONE",
        {},
        None,
        input_type=body.input_type,
        keep_end=truncate == "START",
        max_tokens=body.max_tokens,
    )
    vectors = finish_embeddings(embedded.vectors, body.output_dimension, normalized) if texts else embedded.vectors
    answer = {
        "id": str(uuid.uuid4()),
        "response_type": "embeddings_by_type",
        "embeddings": await typed_embeddings(request.app, name, vectors, types)
        if texts
        else {kind: [] for kind in types},
        "texts": texts,
        "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": embedded.token_count}},
    }
    return json_response(answer, headers={TRUNCATED_HEADER: str(embedded.truncated_count), **embedded.provenance})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v2/embed", embed)
