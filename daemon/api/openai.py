"""OpenAI's dialect: /v1/embeddings and /v1/models (errors use OpenAI's body, see api.common.error_body)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiohttp import web

from daemon.api.common import (
    SETTINGS,
    Caller,
    admitted,
    check_input_count,
    json_response,
    list_stored_models,
    read_model,
    stored_model,
)
from daemon.api.embedding import embed_inputs
from daemon.api.models import ENCODING_FORMATS, OpenAIEmbedRequest
from daemon.api.typed import requested_types, typed_embeddings
from daemon.errors import InvalidInput
from daemon.store import StoredModel
from daemon.token_ids import decode_cl100k
from daemon.vectors import finish_embeddings


@dataclass(frozen=True)
class EmbedInputs:
    """A /v1/embeddings input sorted by kind: texts, or lists of token ids."""

    texts: list[str]
    token_lists: list[list[int]]


def sort_inputs(raw: str | list[str | int | list[int]] | None) -> EmbedInputs:
    """A string, strings, token ids, or lists of token ids (OpenAIEmbedRequest.input); not a mix."""
    if isinstance(raw, str):
        return EmbedInputs([raw], [])
    items = raw or []
    if items and all(isinstance(item, str) for item in items):
        return EmbedInputs([item for item in items if isinstance(item, str)], [])
    if items and all(isinstance(item, int) for item in items):
        return EmbedInputs([], [[item for item in items if isinstance(item, int)]])
    if items and all(isinstance(item, list) for item in items):
        return EmbedInputs([], [item for item in items if isinstance(item, list)])
    raise InvalidInput("invalid input")


@admitted(queue_slot=True)
async def embeddings(request: web.Request) -> web.Response:
    answer, headers = await answer_embeddings(request, await read_model(request, OpenAIEmbedRequest))
    return json_response(answer, headers=headers)


async def answer_embeddings(
    request: Caller, body: OpenAIEmbedRequest, background: bool = False
) -> tuple[dict[str, Any], dict[str, str]]:
    """/v1/embeddings' answer and headers for a body: an HTTP request's, or a batch line's
    (`background`: below interactive requests, see daemon.batches)."""
    name = body.model_name
    if not name.strip():
        raise InvalidInput("model is required")
    sorted_inputs = sort_inputs(body.input)
    encoding_format = (body.encoding_format or "float").lower()
    if encoding_format not in ENCODING_FORMATS:
        raise InvalidInput(
            f"invalid encoding_format {body.encoding_format!r}: use float or base64 (or int8, uint8, binary, ubinary)"
        )
    requested_types([encoding_format], "encoding_format", True, body.dimensions is not None)
    token_lists = sorted_inputs.token_lists
    check_input_count(len(sorted_inputs.texts) + len(token_lists), request.app[SETTINGS])
    inputs: list[str | list[int]] = list(sorted_inputs.texts)
    if token_lists:
        if request.app[SETTINGS].openai_token_ids == "cl100k_base":
            inputs = list(await asyncio.to_thread(lambda: [decode_cl100k(t) for t in token_lists]))
        else:
            inputs = list(token_lists)
    embedded = await embed_inputs(
        request,
        name,
        inputs,
        True,
        {},
        None,
        body.prompt_name,
        body.input_type,
        bool(body.split_long_inputs),
        body.task,
        background=background,
    )
    vectors = finish_embeddings(embedded.vectors, body.dimensions)
    typed = (await typed_embeddings(request.app, name, vectors, [encoding_format]))[encoding_format]
    data = [{"object": "embedding", "embedding": vector, "index": index} for index, vector in enumerate(typed)]
    if body.split_long_inputs:
        for item, windows in zip(data, embedded.windows, strict=True):
            item["windows"] = windows
    usage = {"prompt_tokens": embedded.token_count, "total_tokens": embedded.token_count}
    return {"object": "list", "data": data, "model": name, "usage": usage}, embedded.provenance


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
    model = await stored_model(request.app, request.match_info["model"])
    return json_response(_model_object(model))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    # Hub names hold slashes: hf.co/owner/repo:tag.
    app.router.add_get("/v1/models/{model:.+}", get_model)
