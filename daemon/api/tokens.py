"""/api/tokenize and /api/detokenize: the model's own tokenizer, for chunkers that count tokens.

*emberd goes further:* Ollama has neither. A model that is not loaded is not loaded whole for this
(see daemon.vocabularies).
"""

from __future__ import annotations

from aiohttp import web

from daemon.api.common import (
    SETTINGS,
    VOCABULARIES,
    admitted,
    check_request_tokens,
    json_response,
    read_model,
    stored_model,
)
from daemon.api.models import DetokenizeRequest, Named, TokenizeRequest
from daemon.errors import InvalidInput
from daemon.memory import input_tokens_bound


def _model(body: Named) -> str:
    name = body.model_name
    if not name.strip():
        raise InvalidInput("model is required")
    return name


@admitted(queue_slot=True)
async def tokenize(request: web.Request) -> web.Response:
    """{"model", "content", "add_special": true} -> {"model", "tokens": [...]}; add_special false
    leaves out the special tokens the model puts around an input ([CLS] ... [SEP])."""
    body = await read_model(request, TokenizeRequest)
    name = _model(body)
    content = body.content
    if content is None:
        raise InvalidInput("content is required")
    add_special = body.add_special
    check_request_tokens(
        input_tokens_bound([content]), request.app[SETTINGS], "content (UTF-8 bytes and special tokens)"
    )
    model = await stored_model(request.app, name)
    tokens = await request.app[VOCABULARIES].tokenize(model, content, add_special is not False)
    return json_response({"model": name, "tokens": tokens})


@admitted(queue_slot=True)
async def detokenize(request: web.Request) -> web.Response:
    """{"model", "tokens": [...]} -> {"model", "content"}; special tokens are left out."""
    body = await read_model(request, DetokenizeRequest)
    name = _model(body)
    tokens = body.tokens
    if tokens is None:  # types and bounds are checked by the model
        raise InvalidInput("tokens must be an array of integers")
    check_request_tokens(len(tokens), request.app[SETTINGS], "the ids")
    content = await request.app[VOCABULARIES].detokenize(await stored_model(request.app, name), tokens)
    return json_response({"model": name, "content": content})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/tokenize", tokenize)
    app.router.add_post("/api/detokenize", detokenize)
