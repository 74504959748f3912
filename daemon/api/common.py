"""What every dialect shares: JSON in and out, typed app state, request bodies read into their models."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from aiohttp import web

from daemon.api.models import BodyType, decode_body
from daemon.calibration import Calibrator
from daemon.config import Settings, parse_go_duration_s
from daemon.errors import InvalidInput, Overloaded, TooManyInputs, TooManyTokens
from daemon.hub import HubClient
from daemon.jobs import JobExecutor
from daemon.metrics import Metrics
from daemon.pulls import PullManager
from daemon.scheduler import Scheduler
from daemon.store import ModelStore, StoredModel
from daemon.vocabularies import Vocabularies


@dataclass
class Lifecycle:
    """Where the daemon is in its life, as /readyz reports it, and the HTTP requests in progress
    (the shutdown sequence waits for them)."""

    ready: bool = False  # listening, and the models of --ensure-model are in the store
    draining: bool = False  # a stop signal came: finishing what was accepted
    in_progress: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    body_bytes: int = 0  # request bodies held, as admitted (see admitted): declared, or read so far

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining

    def request_started(self) -> None:
        self.in_progress += 1
        self.idle.clear()

    def request_finished(self) -> None:
        self.in_progress -= 1
        if self.in_progress == 0:
            self.idle.set()


@dataclass
class RequestStats:
    """What the access log and /metrics say about an embedding request."""

    model: str
    inputs: int
    tokens: int = 0
    queue_ms: float = 0.0
    inference_ms: float = 0.0


T = TypeVar("T")


class BackgroundCall:
    """What the embedding path needs of an HTTP request (its app, a place for its stats), for work
    no HTTP request carries: a batch's lines (daemon.batches.processor)."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self._values: dict[object, Any] = {}

    def __setitem__(self, key: web.RequestKey[Any], value: Any) -> None:
        self._values[key] = value

    def __getitem__(self, key: web.RequestKey[T]) -> T:
        value: T = self._values[key]
        return value


# Who asks the embedding path: an HTTP request, or background work.
Caller = web.Request | BackgroundCall

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", ModelStore)
SCHEDULER = web.AppKey("scheduler", Scheduler)
HUB = web.AppKey("hub", HubClient)
PULLS = web.AppKey("pulls", PullManager)
JOBS = web.AppKey("jobs", JobExecutor)
METRICS = web.AppKey("metrics", Metrics)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
VOCABULARIES = web.AppKey("vocabularies", Vocabularies)
CALIBRATOR = web.AppKey("calibrator", Calibrator)
REQUEST_STATS = web.RequestKey("request_stats", RequestStats)

JSON_CONTENT_TYPE = "application/json; charset=utf-8"
TRUNCATED_HEADER = "X-Emberd-Truncated-Inputs"
# What produced a vector, on every embedding answer: a client can tell when vectors it stored were
# made by another model file or another llama.cpp.
MODEL_DIGEST_HEADER = "X-Emberd-Model-Digest"
LLAMA_VERSION_HEADER = "X-Emberd-Llama-Cpp"
# How many of an embedding request's inputs the vector cache answered (daemon/cache.py).
CACHE_HITS_HEADER = "X-Emberd-Cache-Hits"
EXPOSED_HEADERS = (TRUNCATED_HEADER, MODEL_DIGEST_HEADER, LLAMA_VERSION_HEADER, CACHE_HITS_HEADER)
MAX_KEEP_ALIVE_S = 100 * 365 * 24 * 3600.0


_OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "not_found_error",
    413: "invalid_request_error",
}
_OPENAI_ERROR_CODES = {401: "invalid_api_key"}


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    response = web.Response(body=body, status=status, headers=headers)
    response.headers["Content-Type"] = JSON_CONTENT_TYPE
    return response


# TEI's routes (daemon.api.tei) answer errors in TEI's body: {"error", "error_type"}.
TEI_PATHS = ("/embed_all", "/embed_sparse")


def tei_error_type(status: int) -> str:
    """TEI's error_type for an emberd status (TEI's ErrorType names)."""
    return "Overloaded" if status == 503 else "Backend" if status >= 500 else "Validation"


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """Ollama's {"error": message}, OpenAI's {"error": {...}} on the /v1/ routes, Cohere's
    {"message"} on the /v2/ ones, or TEI's {"error", "error_type"} on TEI's."""
    if path in TEI_PATHS:
        return {"error": message, "error_type": tei_error_type(status)}
    if path.startswith("/v2/"):
        return {"message": message}
    if path.startswith("/v1/"):
        kind = _OPENAI_ERROR_TYPES.get(status, "api_error")
        return {"error": {"message": message, "type": kind, "param": None, "code": _OPENAI_ERROR_CODES.get(status)}}
    return {"error": message}


def error_response(
    request: web.Request, status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response(error_body(request.path, status, message), status=status, headers=headers)


def check_request_tokens(bound_tokens: int, settings: Settings, what: str) -> None:
    """max_request_tokens, checked against a bound on the request's tokens known before anything is
    tokenized; `what` says what was counted."""
    if bound_tokens > settings.max_request_tokens:
        raise TooManyTokens(
            f"request too large: {what} may make up to {bound_tokens} tokens, and the limit is "
            f"{settings.max_request_tokens} (max_request_tokens); send less in each request"
        )


def check_input_count(count: int, settings: Settings) -> None:
    """max_inputs, checked before anything is tokenized or loaded."""
    if count > settings.max_inputs:
        raise TooManyInputs(
            f"too many inputs: {count} in one request, the limit is {settings.max_inputs} (max_inputs); "
            "send them in several requests"
        )


# What a 503 for back-pressure (Overloaded) asks a client to wait before it tries again.
RETRY_AFTER_S = 1


def body_fits(held_bytes: int, more_bytes: int, budget_bytes: int) -> bool:
    """Whether `more_bytes` of request body fit beside the `held_bytes` held (0: no budget)."""
    return budget_bytes == 0 or held_bytes + more_bytes <= budget_bytes


@dataclass
class BodyAllowance:
    """The bytes of bodies_in_flight one request holds: its Content-Length from admission, or a
    chunked body's bytes as they are read; given back when its handler ends."""

    lifecycle: Lifecycle
    budget_bytes: int
    taken_bytes: int = 0

    def take(self, more_bytes: int) -> None:
        if not body_fits(self.lifecycle.body_bytes, more_bytes, self.budget_bytes):
            raise Overloaded(
                f"server busy, please try again: the request bodies in flight would pass {self.budget_bytes} "
                "bytes (bodies_in_flight)"
            )
        self.lifecycle.body_bytes += more_bytes
        self.taken_bytes += more_bytes

    def give_back(self) -> None:
        self.lifecycle.body_bytes -= self.taken_bytes
        self.taken_bytes = 0


BODY_ALLOWANCE = web.RequestKey("body_allowance", BodyAllowance)
Answer = TypeVar("Answer", bound=web.StreamResponse)
Handler = Callable[[web.Request], Awaitable[Answer]]


def admitted(queue_slot: bool) -> Callable[[Handler[Answer]], Handler[Answer]]:
    """A handler whose request is admitted before its body is read: a queue slot (`queue_slot`: the
    routes that embed or tokenize, see Scheduler.admit) and its Content-Length within
    bodies_in_flight, both held until the handler returns. Past either, or past max_body_bytes, the
    answer (503 with Retry-After, or 413) comes at once: the body is never read, so many large
    bodies sent at once cannot grow the daemon by their sum."""

    def decorate(handler: Handler[Answer]) -> Handler[Answer]:
        @functools.wraps(handler)
        async def admit(request: web.Request) -> Answer:
            settings = request.app[SETTINGS]
            declared_bytes = request.content_length or 0
            if settings.max_body_bytes and declared_bytes > settings.max_body_bytes:
                raise web.HTTPRequestEntityTooLarge(max_size=settings.max_body_bytes, actual_size=declared_bytes)
            async with contextlib.AsyncExitStack() as held:
                if queue_slot:
                    await held.enter_async_context(request.app[SCHEDULER].admit())
                allowance = BodyAllowance(request.app[LIFECYCLE], settings.bodies_in_flight_bytes)
                held.callback(allowance.give_back)
                allowance.take(declared_bytes)
                request[BODY_ALLOWANCE] = allowance
                return await handler(request)

        return admit

    return decorate


async def _read_body(request: web.Request) -> bytes | bytearray:
    """The request's body, within its allowance (a chunked body's bytes are taken as they arrive)."""
    allowance = request.get(BODY_ALLOWANCE)
    if allowance is None:
        raise RuntimeError(f"{request.path}: a body read by a handler that is not admitted()")
    if request.content_length is not None:
        return await request.read()  # taken whole at admission; aiohttp stops at the declared length
    max_bytes = request.app[SETTINGS].max_body_bytes
    body = bytearray()
    async for chunk in request.content.iter_any():
        if max_bytes and len(body) + len(chunk) > max_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=len(body) + len(chunk))
        allowance.take(len(chunk))
        body += chunk
    return body


async def read_model(request: web.Request, kind: type[BodyType]) -> BodyType:
    """The request's body, read once the request is admitted (see admitted), decoded and
    type-checked into its model (daemon.api.models)."""
    return decode_body(await _read_body(request), kind)


def parse_keep_alive_s(raw: Any) -> float | None:
    """Ollama's keep_alive: a number of seconds or a Go duration; negative means forever.

    None (absent) leaves a loaded model's keep_alive as it is.
    """
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise InvalidInput("keep_alive must be a duration string or a number of seconds")
    if isinstance(raw, str):
        try:
            seconds = parse_go_duration_s(raw.strip())
        except ValueError as error:
            raise InvalidInput(str(error)) from None
    else:
        seconds = float(raw)
    # Past a century the difference from "forever" is moot, and such timestamps overflow.
    return -1.0 if seconds < 0 or seconds > MAX_KEEP_ALIVE_S else seconds


# The one rule for the store's reads: they read files (a manifest; the manifests folder's walk),
# so they block, and a handler never makes them on the loop, where a slow disk would hold every
# request. Handlers read through these two, which run them on the loop's default executor (its
# threads are started and counted by daemon.service.start_io_threads).
async def stored_model(app: web.Application, name: str) -> StoredModel:
    """The stored model for a name; UnknownModel if there is none."""
    return await asyncio.to_thread(app[STORE].get, name)


async def list_stored_models(app: web.Application) -> list[StoredModel]:
    """The store's models, for /api/tags and /v1/models."""
    return await asyncio.to_thread(app[STORE].list)
