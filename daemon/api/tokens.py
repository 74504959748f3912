"""/api/tokenize and /api/detokenize: the model's own tokenizer, for chunkers that count tokens.

*emberd goes further:* Ollama has neither. A model that is not loaded is not loaded whole for this
(see daemon.vocabularies).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from daemon.api.common import (
    SETTINGS,
    VOCABULARIES,
    admitted,
    check_request_tokens,
    json_response,
    model_name,
    read_json_object,
    require_type,
)
from daemon.errors import InvalidInput
from daemon.memory import input_tokens_bound

# Ids a detokenize request may carry (a context's worth of any model served here, and then some).
MAX_DETOKENIZE_TOKENS = 1 << 20


def _model(document: dict[str, Any]) -> str:
    name = model_name(document)
    if not name.strip():
        raise InvalidInput("model is required")
    return name


@admitted(queue_slot=True)
async def tokenize(request: web.Request) -> web.Response:
    """{"model", "content", "add_special": true} -> {"model", "tokens": [...]}; add_special false
    leaves out the special tokens the model puts around an input ([CLS] ... [SEP])."""
    document = await read_json_object(request)
    name = _model(document)
    content = require_type(document, "content", str, "a string")
    if content is None:
        raise InvalidInput("content is required")
    add_special = require_type(document, "add_special", bool, "true or false")
    check_request_tokens(
        input_tokens_bound([content]), request.app[SETTINGS], "content (UTF-8 bytes and special tokens)"
    )
    tokens = await request.app[VOCABULARIES].tokenize(name, content, add_special is not False)
    return json_response({"model": name, "tokens": tokens})


@admitted(queue_slot=True)
async def detokenize(request: web.Request) -> web.Response:
    """{"model", "tokens": [...]} -> {"model", "content"}; special tokens are left out."""
    document = await read_json_object(request)
    name = _model(document)
    tokens = document.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise InvalidInput("tokens must be an array of integers")
    if len(tokens) > MAX_DETOKENIZE_TOKENS:
        raise InvalidInput(f"tokens: at most {MAX_DETOKENIZE_TOKENS} ids")
    check_request_tokens(len(tokens), request.app[SETTINGS], "the ids")
    content = await request.app[VOCABULARIES].detokenize(name, tokens)
    return json_response({"model": name, "content": content})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/tokenize", tokenize)
    app.router.add_post("/api/detokenize", detokenize)
