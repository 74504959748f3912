"""The aiohttp application: routes, the error table, and the lifetimes of the store and scheduler."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from daemon import __version__
from daemon.api import batches, cohere, docs, ollama, openai, openapi, ops, rerank, tei, tokens
from daemon.api.access import (
    API_KEYS,
    ApiKeys,
    add_cors_headers,
    api_key_middleware,
    cors_preflight_middleware,
    host_guard_middleware,
    origin_guard_middleware,
)
from daemon.api.common import (
    CALIBRATOR,
    HUB,
    JOBS,
    LIFECYCLE,
    METRICS,
    PULLS,
    REQUEST_STATS,
    RETRY_AFTER_S,
    SCHEDULER,
    SETTINGS,
    STORE,
    VOCABULARIES,
    Lifecycle,
    error_response,
)
from daemon.api.embedding import VECTOR_CACHE, cache_events
from daemon.batches.database import open_batch_database
from daemon.batches.processor import BatchProcessor
from daemon.cache import open_vector_cache
from daemon.calibration import Calibrator
from daemon.config import Settings
from daemon.errors import (
    BatchDatabaseUnavailable,
    BlobMissing,
    ContextExceeded,
    DownloadFailed,
    EmberdError,
    ForbiddenHost,
    HubUnavailable,
    InsufficientDisk,
    InsufficientMemory,
    InvalidInput,
    MemoryBusy,
    ModelLoadFailed,
    ModelNotLoadable,
    NotEmbeddingModel,
    Overloaded,
    RunnerCrashed,
    ShuttingDown,
    TooManyInputs,
    Unauthorized,
    UnknownModel,
    UnknownObject,
    UnreadableManifest,
    UploadTooLarge,
)
from daemon.hub import AliasEntry, HubClient, load_aliases
from daemon.jobs import JobExecutor
from daemon.logs import log_request
from daemon.memory import MemoryProbe
from daemon.memory.probe import DeviceProbe
from daemon.metrics import DaemonState, Metrics, RunnerState
from daemon.options import LlamaParams
from daemon.pulls import PullManager
from daemon.pulls import disk_free_bytes as disk_free
from daemon.runner.client import RunnerProcess, vocabulary_refusal
from daemon.scheduler import RunnerFactory, Scheduler
from daemon.store import ModelStore, StoredModel
from daemon.vocabularies import Vocabularies

log = logging.getLogger(__name__)
# The aliases file of a clone or an editable install (the README's way to run emberd).
DEFAULT_MODELS_FILE = Path(__file__).resolve().parents[2] / "configs" / "models.toml"

# One table: domain error -> HTTP status, most specific class first. Both dialects share it;
# only the body differs (see error_body).
ERROR_STATUS: list[tuple[type[EmberdError], int]] = [
    (ContextExceeded, 400),
    (TooManyInputs, 413),
    (UploadTooLarge, 413),
    (InvalidInput, 400),
    (Unauthorized, 401),
    (ForbiddenHost, 403),
    (UnknownModel, 404),
    (UnknownObject, 404),
    (NotEmbeddingModel, 501),
    (DownloadFailed, 502),
    (BlobMissing, 409),
    (UnreadableManifest, 409),
    (ModelNotLoadable, 409),  # a stored model this llama.cpp cannot load: like a manifest this emberd cannot read
    (Overloaded, 503),
    (ShuttingDown, 503),
    (MemoryBusy, 503),
    (HubUnavailable, 503),
    (BatchDatabaseUnavailable, 503),
    (InsufficientMemory, 507),
    (InsufficientDisk, 507),
    (ModelLoadFailed, 500),
    (RunnerCrashed, 500),
]


def status_for(error: EmberdError) -> int:
    for error_type, status in ERROR_STATUS:
        if isinstance(error, error_type):
            return status
    return 500


# nginx's code for "the client closed the connection before the answer", in logs and metrics.
CLIENT_CLOSED_REQUEST = 499


def route_of(request: web.Request) -> str:
    """The route's pattern ("/v1/models/{model}"), so metrics and logs have few distinct values."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: counts requests in progress (the drain waits for them), then one log line and
    the request counter for each answer."""
    lifecycle = request.app[LIFECYCLE]
    lifecycle.request_started()
    started_s = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as error:
        status = error.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED_REQUEST  # the client disconnected before its answer
        raise
    finally:
        lifecycle.request_finished()
        route = route_of(request)
        request.app[METRICS].request_answered(route, status)
        fields: dict[str, Any] = {"method": request.method, "route": route, "status": status}
        stats = request.get(REQUEST_STATS)
        if stats is not None:
            fields.update(
                model=stats.model,
                inputs=stats.inputs,
                tokens=stats.tokens,
                queue_ms=round(stats.queue_ms, 2),
                inference_ms=round(stats.inference_ms, 2),
            )
        fields.update(total_ms=round((time.perf_counter() - started_s) * 1e3, 2), remote=request.remote)
        log_request(fields)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except EmberdError as error:
        status = status_for(error)
        if status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.path, status, error.message)
        # Back-pressure says when to come back (a queue slot, or room for a body, frees up soon).
        retry = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(error, Overloaded) else None
        return error_response(request, status, error.message, retry)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return error_response(request, error.status, error.reason.lower())
    except ConnectionResetError:
        # The client left (a streamed pull or create, say): nothing to answer, and no bug.
        log.info("the client of %s %s left before its answer ended", request.method, request.path)
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return error_response(request, 500, "internal server error")
    return response


async def add_server_header(_request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp has put its own ("Python/3.11 aiohttp/...") in before this hook runs.
    response.headers["Server"] = f"emberd/{__version__}"


def default_runner_factory(settings: Settings) -> RunnerFactory:
    async def start(model: StoredModel, params: LlamaParams) -> RunnerProcess:
        gone = UnknownModel(f'model "{model.name}" not found: its file is gone (deleted while it loaded)')
        try:
            before = model.blob_path.stat()
        except FileNotFoundError:
            raise gone from None
        try:
            adapters = [(adapter.task, adapter.blob_path) for adapter in model.adapters]
            return await RunnerProcess.start(
                model.blob_path, params, model.name, settings.load_timeout_s, adapters=adapters
            )
        except ModelLoadFailed:
            # Deleted (emberd rm) after its manifest was read and before the runner opened the file,
            # perhaps created again since (another file): the model this request found is gone, as
            # for a request that came a moment later. Not a failed load.
            try:
                after = model.blob_path.stat()
            except FileNotFoundError:
                raise gone from None
            # The inode number of a deleted file may be reused at once: its change time tells them apart.
            if (after.st_dev, after.st_ino, after.st_ctime_ns) != (before.st_dev, before.st_ino, before.st_ctime_ns):
                raise gone from None
            raise

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
    device_probe: DeviceProbe | None = None,
) -> web.Application:
    # Middlewares run in this order, the first outermost: every answer is counted and logged, a
    # foreign Host, a page of another origin or an unknown key is refused before any work (and before
    # the body is read), and domain errors become statuses.
    middlewares = [
        observe_middleware,
        host_guard_middleware,
        origin_guard_middleware,
        cors_preflight_middleware,
        api_key_middleware,
        error_middleware,
    ]
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=middlewares)
    app.on_response_prepare.append(add_cors_headers)
    app.on_response_prepare.append(add_server_header)
    store = ModelStore(settings.home, functools.partial(vocabulary_refusal, timeout_s=settings.load_timeout_s))
    hub = HubClient(settings.hub_endpoint, settings.hub_offline, read_aliases(settings))
    metrics = Metrics()
    app[SETTINGS] = settings
    app[STORE] = store
    app[HUB] = hub
    app[METRICS] = metrics
    app[LIFECYCLE] = Lifecycle()
    if settings.api_keys_file:
        app[API_KEYS] = ApiKeys(Path(settings.api_keys_file))

    async def scheduler_lifetime(app: web.Application) -> AsyncIterator[None]:
        store.open()
        scheduler = Scheduler(
            settings,
            store,
            runner_factory or default_runner_factory(settings),
            memory_probe or MemoryProbe(),
            metrics=metrics,
            device_probe=device_probe,
        )
        jobs = JobExecutor(settings.max_jobs)
        app[SCHEDULER] = scheduler
        app[VOCABULARIES] = vocabularies = Vocabularies(
            settings, scheduler, runner_factory or default_runner_factory(settings)
        )
        app[JOBS] = jobs
        vector_cache = open_vector_cache(
            settings.cache, settings.home, settings.cache_max_bytes, settings.cache_url, cache_events(metrics)
        )
        if vector_cache is not None:
            app[VECTOR_CACHE] = vector_cache
        app[CALIBRATOR] = calibrator = Calibrator(store, scheduler)
        after_publish = calibrator.after_store if settings.calibrate_on_store else None
        app[PULLS] = PullManager(store, hub, jobs, disk_free_bytes or disk_free, metrics.pulled, after_publish)
        batch_database = open_batch_database(settings)  # SQLite, or a fleet's PostgreSQL
        await batch_database.open()
        processor = BatchProcessor(
            app, batch_database, status_for, settings.batch_chunks_in_flight, settings.batch_lease_s
        )
        app[batches.BATCHES] = batches.Batches(batch_database, processor)
        await processor.start()
        metrics.watch_state(lambda: daemon_state(app))
        yield
        # Shutdown: long jobs stop at their next chunk, then requests drain and runners stop, all by
        # one deadline: the shutdown sequence's (service.shut_down), when it ran first.
        deadline_s = scheduler.stop_deadline_s(settings.shutdown_timeout_s)
        await processor.stop()  # a chunk in flight is not recorded: it runs again after a restart
        jobs.cancel_all()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline_s):
                await app[PULLS].wait_finished()
        # Shielded: past the deadline, the vocabulary runners (stdin closed) go on exiting by themselves.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline_s):
                await asyncio.shield(vocabularies.close())
        await scheduler.close(settings.shutdown_timeout_s)
        jobs.close()
        await batch_database.close()
        if vector_cache is not None:  # its writes under way finish first
            await vector_cache.close()

    app.cleanup_ctx.append(scheduler_lifetime)
    ollama.add_routes(app)
    openai.add_routes(app)
    cohere.add_routes(app)
    batches.add_routes(app)
    tokens.add_routes(app)
    rerank.add_routes(app)
    tei.add_routes(app)
    ops.add_routes(app)
    openapi.add_routes(app, ERROR_STATUS)
    docs.add_routes(app)
    return app


def daemon_state(app: web.Application) -> DaemonState:
    """What /metrics reads at scrape time."""
    scheduler = app[SCHEDULER]
    runners = [RunnerState(e.name, e.refcount, e.counted_bytes, e.device_bytes) for e in scheduler.measured()]
    return DaemonState(runners, scheduler.admitted, app[JOBS].running, app[LIFECYCLE].serving)
