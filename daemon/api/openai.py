"""OpenAI's dialect: /v1/models (errors use OpenAI's body, see api.app.error_body)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from aiohttp import web

from daemon.api.common import STORE, json_response
from daemon.store import StoredModel


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
    models = await asyncio.to_thread(request.app[STORE].list)
    return json_response({"object": "list", "data": [_model_object(model) for model in models]})


async def get_model(request: web.Request) -> web.Response:
    model = await asyncio.to_thread(request.app[STORE].get, request.match_info["model"])
    return json_response(_model_object(model))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    # Hub names hold slashes: hf.co/owner/repo:tag.
    app.router.add_get("/v1/models/{model:.+}", get_model)
