"""The aiohttp application: routes, the error table, and the lifetimes of the store and scheduler."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from daemon import __version__
from daemon.api import ollama, openai
from daemon.api.common import HUB, PULLS, SCHEDULER, SETTINGS, STORE, json_response
from daemon.config import Settings
from daemon.errors import (
    ContextExceeded,
    DownloadFailed,
    EmberdError,
    HubUnavailable,
    InsufficientDisk,
    InsufficientMemory,
    InvalidInput,
    ModelLoadFailed,
    NotEmbeddingModel,
    Overloaded,
    RunnerCrashed,
    ShuttingDown,
    UnknownModel,
)
from daemon.hub import AliasEntry, HubClient, load_aliases
from daemon.memory import MemoryProbe
from daemon.options import LlamaParams
from daemon.pulls import PullManager
from daemon.pulls import disk_free_bytes as disk_free
from daemon.runner.client import RunnerProcess
from daemon.scheduler import RunnerFactory, Scheduler
from daemon.store import ModelStore, StoredModel

log = logging.getLogger(__name__)
# The aliases file of a clone or an editable install (the README's way to run emberd).
DEFAULT_MODELS_FILE = Path(__file__).resolve().parents[2] / "configs" / "models.toml"

# One table: domain error -> HTTP status, most specific class first. Both dialects share it;
# only the body differs (see error_body).
ERROR_STATUS: list[tuple[type[EmberdError], int]] = [
    (ContextExceeded, 400),
    (InvalidInput, 400),
    (UnknownModel, 404),
    (NotEmbeddingModel, 501),
    (DownloadFailed, 502),
    (Overloaded, 503),
    (ShuttingDown, 503),
    (HubUnavailable, 503),
    (InsufficientMemory, 507),
    (InsufficientDisk, 507),
    (ModelLoadFailed, 500),
    (RunnerCrashed, 500),
]
_OPENAI_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error"}


def status_for(error: EmberdError) -> int:
    for error_type, status in ERROR_STATUS:
        if isinstance(error, error_type):
            return status
    return 500


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """Ollama's {"error": message}, or OpenAI's {"error": {...}} on the /v1/ routes."""
    if path.startswith("/v1/"):
        kind = _OPENAI_ERROR_TYPES.get(status, "api_error")
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return {"error": message}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except EmberdError as error:
        status = status_for(error)
        if status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.path, status, error.message)
        return json_response(error_body(request.path, status, error.message), status=status)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return json_response(error_body(request.path, error.status, error.reason.lower()), status=error.status)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return json_response(error_body(request.path, 500, "internal server error"), status=500)
    response.headers.setdefault("Server", f"emberd/{__version__}")
    return response


def default_runner_factory(settings: Settings) -> RunnerFactory:
    async def start(model: StoredModel, params: LlamaParams) -> RunnerProcess:
        return await RunnerProcess.start(model.blob_path, params, model.name, settings.load_timeout_s)

    return start


def read_aliases(settings: Settings) -> dict[str, AliasEntry]:
    """The configured aliases file (an error if it is missing), else the clone's configs/models.toml
    (none when emberd runs from a plain wheel install: hf.co/ names still work)."""
    if settings.models_file:
        return load_aliases(Path(settings.models_file))
    if not DEFAULT_MODELS_FILE.is_file():
        log.warning("no %s: model aliases are off; set models_file to enable them", DEFAULT_MODELS_FILE)
        return {}
    return load_aliases(DEFAULT_MODELS_FILE)


def build_app(
    settings: Settings,
    runner_factory: RunnerFactory | None = None,
    memory_probe: MemoryProbe | None = None,
    disk_free_bytes: Callable[[Path], int] | None = None,
) -> web.Application:
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[error_middleware])
    store = ModelStore(settings.home)
    hub = HubClient(settings.hub_endpoint, settings.hub_offline, read_aliases(settings))
    app[SETTINGS] = settings
    app[STORE] = store
    app[HUB] = hub

    async def scheduler_lifetime(app: web.Application) -> AsyncIterator[None]:
        store.open()
        scheduler = Scheduler(
            settings,
            store,
            runner_factory or default_runner_factory(settings),
            memory_probe or MemoryProbe(),
        )
        app[SCHEDULER] = scheduler
        pulls = PullManager(store, hub, disk_free_bytes or disk_free)
        app[PULLS] = pulls
        yield
        await pulls.close()
        await scheduler.close(settings.shutdown_timeout_s)

    app.cleanup_ctx.append(scheduler_lifetime)
    ollama.add_routes(app)
    openai.add_routes(app)
    return app
