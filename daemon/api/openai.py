"""OpenAI's dialect: /v1/embeddings and /v1/models (errors use OpenAI's body, see api.common.error_body)."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from aiohttp import web

from daemon.api.common import (
    SETTINGS,
    STORE,
    admitted,
    check_input_count,
    json_response,
    list_stored_models,
    model_name,
    read_json_object,
    require_type,
)
from daemon.api.embedding import embed_inputs
from daemon.errors import InvalidInput
from daemon.store import StoredModel
from daemon.token_ids import decode_cl100k
from daemon.vectors import finish_embeddings

ENCODING_FORMATS = ("float", "base64")


@dataclass(frozen=True)
class OpenAIEmbedRequest:
    model: str
    texts: list[str]
    token_lists: list[list[int]]  # set instead of texts when the input is token ids
    encoding_format: str
    dimensions: int | None
    prompt_name: str | None  # TEI's name: one of the model's prompts
    input_type: str | None  # Cohere's and Voyage's: "query" or "document" picks that prompt
    split_long_inputs: bool  # inputs over the context in overlapping windows, pooled (not cut)


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decode_openai_request(document: dict[str, Any]) -> OpenAIEmbedRequest:
    """Validate a /v1/embeddings body: a string, strings, token ids, or lists of token ids."""
    name = model_name(document)
    if not name.strip():
        raise InvalidInput("model is required")
    raw = document.get("input")
    texts: list[str] = []
    token_lists: list[list[int]] = []
    if isinstance(raw, str):
        texts = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(item, str) for item in raw):
        texts = raw
    elif isinstance(raw, list) and raw and all(_is_token(item) for item in raw):
        token_lists = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(item, list) and item for item in raw):
        if not all(_is_token(token) for item in raw for token in item):
            raise InvalidInput("invalid input")
        token_lists = raw
    else:
        raise InvalidInput("invalid input")
    encoding_format = (require_type(document, "encoding_format", str, "float or base64") or "float").lower()
    if encoding_format not in ENCODING_FORMATS:
        raise InvalidInput(f"invalid encoding_format {document['encoding_format']!r}: use float or base64")
    dimensions = require_type(document, "dimensions", int, "an integer")
    if dimensions is not None and dimensions <= 0:
        raise InvalidInput("dimensions must be a positive integer")
    require_type(document, "user", str, "a string")
    prompt_name = require_type(document, "prompt_name", str, "a string")
    input_type = require_type(document, "input_type", str, "a string")
    split = require_type(document, "split_long_inputs", bool, "true or false") or False
    return OpenAIEmbedRequest(name, texts, token_lists, encoding_format, dimensions, prompt_name, input_type, split)


def encode_vector(vector: np.ndarray, encoding_format: str) -> Any:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector


@admitted(queue_slot=True)
async def embeddings(request: web.Request) -> web.Response:
    embed_request = decode_openai_request(await read_json_object(request))
    check_input_count(len(embed_request.texts) + len(embed_request.token_lists), request.app[SETTINGS])
    inputs: list[str | list[int]] = list(embed_request.texts)
    if embed_request.token_lists:
        if request.app[SETTINGS].openai_token_ids == "cl100k_base":
            inputs = list(await asyncio.to_thread(lambda: [decode_cl100k(t) for t in embed_request.token_lists]))
        else:
            inputs = list(embed_request.token_lists)
    embedded = await embed_inputs(
        request,
        embed_request.model,
        inputs,
        True,
        {},
        None,
        embed_request.prompt_name,
        embed_request.input_type,
        embed_request.split_long_inputs,
    )
    vectors = finish_embeddings(embedded.vectors, embed_request.dimensions)
    data = [
        {"object": "embedding", "embedding": encode_vector(vector, embed_request.encoding_format), "index": index}
        for index, vector in enumerate(vectors)
    ]
    if embed_request.split_long_inputs:
        for item, windows in zip(data, embedded.windows, strict=True):
            item["windows"] = windows
    usage = {"prompt_tokens": embedded.token_count, "total_tokens": embedded.token_count}
    return json_response(
        {"object": "list", "data": data, "model": embed_request.model, "usage": usage}, headers=embedded.provenance
    )


def _model_object(model: StoredModel) -> dict[str, Any]:
    base, _, tag = model.name.partition(":")
    owner = base.split("/")[-2] if "/" in base else "library"
    return {
        "id": base if tag == "latest" else model.name,
        "object": "model",
        "created": int(datetime.fromisoformat(model.modified_at).timestamp()),
        "owned_by": owner,
    }


async def list_models(request: web.Request) -> web.Response:
    models = await list_stored_models(request.app)
    return json_response({"object": "list", "data": [_model_object(model) for model in models]})


async def get_model(request: web.Request) -> web.Response:
    model = await asyncio.to_thread(request.app[STORE].get, request.match_info["model"])
    return json_response(_model_object(model))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    # Hub names hold slashes: hf.co/owner/repo:tag.
    app.router.add_get("/v1/models/{model:.+}", get_model)
