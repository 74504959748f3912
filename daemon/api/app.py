"""The aiohttp application: routes, the error table, and the lifetimes of the store and scheduler."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from daemon import __version__
from daemon.api import ollama
from daemon.api.common import SCHEDULER, SETTINGS, STORE, json_response
from daemon.config import Settings
from daemon.errors import (
    ContextExceeded,
    EmberdError,
    InsufficientMemory,
    InvalidInput,
    ModelLoadFailed,
    NotEmbeddingModel,
    Overloaded,
    RunnerCrashed,
    ShuttingDown,
    UnknownModel,
)
from daemon.memory import MemoryProbe
from daemon.options import LlamaParams
from daemon.runner.client import RunnerProcess
from daemon.scheduler import RunnerFactory, Scheduler
from daemon.store import ModelStore, StoredModel

log = logging.getLogger(__name__)

# One table: domain error -> HTTP status, most specific class first.
OLLAMA_ERROR_STATUS: list[tuple[type[EmberdError], int]] = [
    (ContextExceeded, 400),
    (InvalidInput, 400),
    (UnknownModel, 404),
    (NotEmbeddingModel, 501),
    (Overloaded, 503),
    (ShuttingDown, 503),
    (InsufficientMemory, 507),
    (ModelLoadFailed, 500),
    (RunnerCrashed, 500),
]


def status_for(error: EmberdError) -> int:
    for error_type, status in OLLAMA_ERROR_STATUS:
        if isinstance(error, error_type):
            return status
    return 500


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except EmberdError as error:
        status = status_for(error)
        if status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.path, status, error.message)
        return json_response({"error": error.message}, status=status)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return json_response({"error": error.reason.lower()}, status=error.status)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return json_response({"error": "internal server error"}, status=500)
    response.headers.setdefault("Server", f"emberd/{__version__}")
    return response


def default_runner_factory(settings: Settings) -> RunnerFactory:
    async def start(model: StoredModel, params: LlamaParams) -> RunnerProcess:
        return await RunnerProcess.start(model.blob_path, params, model.name, settings.load_timeout_s)

    return start


def build_app(
    settings: Settings,
    runner_factory: RunnerFactory | None = None,
    memory_probe: MemoryProbe | None = None,
) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[error_middleware])
    store = ModelStore(settings.home)
    app[SETTINGS] = settings
    app[STORE] = store

    async def scheduler_lifetime(app: web.Application) -> AsyncIterator[None]:
        store.open()
        scheduler = Scheduler(
            settings,
            store,
            runner_factory or default_runner_factory(settings),
            memory_probe or MemoryProbe(),
        )
        app[SCHEDULER] = scheduler
        yield
        await scheduler.close(settings.shutdown_timeout_s)

    app.cleanup_ctx.append(scheduler_lifetime)
    ollama.add_routes(app)
    return app
