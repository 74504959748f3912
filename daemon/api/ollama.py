"""Ollama's dialect: /api/embed, /api/embeddings (legacy), /api/create, /api/pull, /api/show,
/api/delete, /api/tags, /api/ps, /api/generate (unload only), /api/version, GET /."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from msgspec import UNSET

from daemon import __version__
from daemon.api import tei
from daemon.api.common import (
    CALIBRATOR,
    JOBS,
    PULLS,
    SCHEDULER,
    SETTINGS,
    STORE,
    TRUNCATED_HEADER,
    admitted,
    check_input_count,
    json_response,
    list_stored_models,
    parse_keep_alive_s,
    read_model,
    stored_model,
)
from daemon.api.embedding import embed_inputs
from daemon.api.models import (
    CreateRequest,
    EmbedRequest,
    GenerateRequest,
    LegacyEmbedRequest,
    NamedModel,
    PullRequest,
)
from daemon.api.typed import requested_types, typed_embeddings
from daemon.errors import (
    EmberdError,
    InvalidInput,
    InvalidModelFile,
    NotEmbeddingModel,
    UnknownModel,
    UnsupportedModelFile,
)
from daemon.gguf_info import cached_gguf_facts, format_parameter_size, read_gguf_facts
from daemon.heads import load_heads
from daemon.names import canonical_name
from daemon.options import parse_options
from daemon.prompts import check_prompts
from daemon.scheduler import LoadedModel
from daemon.store import AdapterSource, StoredModel
from daemon.vectors import check_finite, finish_embeddings

log = logging.getLogger(__name__)
# Ollama shows a model kept forever as expiring in the far future.
_FOREVER = datetime(2318, 1, 1, tzinfo=UTC).isoformat()


# -- /api/embed -------------------------------------------------------------------------------------


@admitted(queue_slot=True)
async def embed(request: web.Request) -> web.Response:
    started_ns = time.perf_counter_ns()
    body = await read_model(request, EmbedRequest)
    name = body.model_name
    if not name.strip():
        raise UnknownModel(f"model '{name}' not found")
    texts = body.texts
    keep_alive_s = parse_keep_alive_s(body.keep_alive)
    options = parse_options(body.options)
    check_input_count(len(texts), request.app[SETTINGS])
    normalized = body.normalize is not False
    # emberd's field for Cohere's types: one type, so `embeddings` stays one list of vectors.
    (embedding_type,) = requested_types(
        [body.embedding_type or "float"], "embedding_type", normalized, bool(body.dimensions)
    )
    empty_answer = {"model": name, "embeddings": []}
    if not texts and keep_alive_s == 0:
        stored = await stored_model(request.app, name)
        await request.app[SCHEDULER].unload_canonical(stored.name)  # the unload idiom: never load to unload
        return json_response(empty_answer)
    if texts and body.outputs is not None and set(body.outputs) != {"dense"}:  # BGE-M3's heads
        return await tei.embed_outputs(request, body, options, keep_alive_s, started_ns)
    embedded = await embed_inputs(
        request,
        name,
        texts,
        body.truncate is not False,
        options,
        keep_alive_s,
        body.prompt_name,
        split_long_inputs=bool(body.split_long_inputs),
        task=body.task,
    )
    if not texts:
        return json_response(empty_answer)  # the preload idiom
    vectors = finish_embeddings(embedded.vectors, body.dimensions, normalized)
    if embedding_type != "float":
        vectors = (await typed_embeddings(request.app, name, vectors, [embedding_type]))[embedding_type]
    return json_response(
        {
            "model": name,
            "embeddings": vectors,
            "total_duration": time.perf_counter_ns() - started_ns,
            "load_duration": embedded.load_duration_ns,
            "prompt_eval_count": embedded.token_count,
            **({"windows": embedded.windows} if body.split_long_inputs else {}),
        },
        headers={TRUNCATED_HEADER: str(embedded.truncated_count), **embedded.provenance},
    )


@admitted(queue_slot=True)
async def legacy_embeddings(request: web.Request) -> web.Response:
    """/api/embeddings: {"model", "prompt"} -> {"embedding": [...]}, the model's pooled vector as
    is (not normalised here), no truncation; an empty prompt only loads the model."""
    body = await read_model(request, LegacyEmbedRequest)
    name = body.model_name
    if not name.strip():
        raise InvalidInput("model is required")
    prompt = body.prompt or ""
    embedded = await embed_inputs(
        request,
        name,
        [prompt] if prompt else [],
        False,
        parse_options(body.options),
        parse_keep_alive_s(body.keep_alive),
    )
    if not prompt:
        return json_response({"embedding": []})
    check_finite(embedded.vectors)
    return json_response({"embedding": embedded.vectors[0]}, headers=embedded.provenance)


@admitted(queue_slot=False)
async def generate(request: web.Request) -> web.Response:
    """Only the unload idiom `ollama stop` uses ({"model", "keep_alive": 0} and no prompt):
    emberd serves embedding models, which cannot generate."""
    body = await read_model(request, GenerateRequest)
    name = body.model_name
    if not name.strip():
        raise UnknownModel(f"model '{name}' not found")
    model = await stored_model(request.app, name)
    keep_alive_s = parse_keep_alive_s(body.keep_alive)
    if keep_alive_s == 0 and not body.prompt:
        await request.app[SCHEDULER].unload_canonical(model.name)
        created_at = datetime.now(UTC).isoformat()
        return json_response(
            {"model": name, "created_at": created_at, "response": "", "done": True, "done_reason": "unload"}
        )
    raise InvalidInput(f'"{name}" does not support generate')


# -- model descriptions -----------------------------------------------------------------------------


def model_details(model: StoredModel) -> dict[str, Any]:
    facts = model.facts
    return {
        "parent_model": "",
        "format": "gguf",
        "family": facts.architecture,
        "families": [facts.architecture],
        "parameter_size": format_parameter_size(facts.parameter_count),
        "quantization_level": facts.file_type,
    }


def _tag_entry(model: StoredModel) -> dict[str, Any]:
    return {
        "name": model.name,
        "model": model.name,
        "modified_at": model.modified_at,
        "size": model.size_bytes,
        "digest": model.digest.removeprefix("sha256:"),
        "details": model_details(model),
        "capabilities": ["embedding"],
    }


def _ps_entry(loaded: LoadedModel) -> dict[str, Any]:
    # What the scheduler counts for it (held now, and growth allowed), with its device part: the
    # device part alone is size_vram.
    size = loaded.size_bytes
    expires = (
        _FOREVER
        if loaded.expires_at_wall_s is None and loaded.keep_alive_s < 0
        else datetime.fromtimestamp(loaded.expires_at_wall_s or time.time(), UTC).isoformat()
    )
    return {
        **_tag_entry(loaded.model),
        "size": size,
        "expires_at": expires,
        "size_vram": loaded.device_bytes,  # 0 and 0 layers without a device
        "context_length": loaded.params.limit_tokens,
        "gpu_layers": loaded.offloaded_layers,
        "gpu_device": loaded.device.name if loaded.device is not None else "",
    }


async def tags(request: web.Request) -> web.Response:
    models = await list_stored_models(request.app)
    return json_response({"models": [_tag_entry(model) for model in models]})


async def ps(request: web.Request) -> web.Response:
    return json_response({"models": [_ps_entry(loaded) for loaded in request.app[SCHEDULER].measured()]})


# -- /api/create ------------------------------------------------------------------------------------


@admitted(queue_slot=False)
async def create(request: web.Request) -> web.StreamResponse:
    """Register a local GGUF file or convert a Hugging Face directory: {"model", "from", "quantize"}."""
    body = await read_model(request, CreateRequest)
    name = canonical_name(body.model_name)
    source_text = body.source
    if not source_text:
        raise InvalidInput('"from" is required: the path of a GGUF file or a Hugging Face model directory')
    from daemon.convert import OUTPUT_TYPES  # the converter's imports, when a model is created

    output_type = (body.quantize or "f16").lower()
    if output_type not in OUTPUT_TYPES:
        raise InvalidInput(f"unsupported quantize {output_type!r}; use one of {', '.join(OUTPUT_TYPES)}")
    stream = body.stream
    prompts = check_prompts(body.prompts or {}, body.default_prompt_name, "create")
    source = Path(source_text).expanduser()
    store = request.app[STORE]
    adapters = _adapter_sources(body.adapters)
    default_task = body.default_task
    if default_task is not None and not adapters:
        raise InvalidInput("default_task names one of the adapters' tasks, and there are no adapters")
    try:
        source_facts = await asyncio.to_thread(store.check_source, source)
        architecture = source_facts.architecture if source_facts else None
        # A GGUF file's tensors are known: its adapters' are checked against them before anything streams.
        model = source if source_facts is not None else None
        await asyncio.to_thread(store.check_adapter_sources, adapters, architecture, default_task, model)
    except NotEmbeddingModel as error:
        raise InvalidModelFile(error.message) from None
    if source.is_file() and body.quantize is not UNSET:
        raise InvalidInput("quantize applies to Hugging Face directories; a GGUF file is stored as it is")

    jobs = request.app[JOBS]  # a conversion is a long job: its own bounded threads, cancelled at shutdown
    calibrate = request.app[SETTINGS].calibrate_on_store
    if stream is False:
        await jobs.run(
            lambda token: store.create(
                name, source, output_type, token=token, prompts=prompts, adapters=adapters, default_task=default_task
            )
        )
        if calibrate:
            await request.app[CALIBRATOR].after_store(name)
        return json_response({"status": "success"})

    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    statuses: asyncio.Queue[str | None] = asyncio.Queue()

    def progress(status: str) -> None:
        loop.call_soon_threadsafe(statuses.put_nowait, status)

    work = asyncio.ensure_future(
        jobs.run(
            lambda token: store.create(name, source, output_type, progress, token, prompts, adapters, default_task)
        )
    )

    # Progress lines are queued from the thread before the work's own completion, so the end marker
    # added on completion comes after all of them. The outcome is retrieved even if the client left.
    def ended(done: asyncio.Future[Any]) -> None:
        if not done.cancelled():
            done.exception()  # retrieved here: its outcome is also written to the stream, if still open
        statuses.put_nowait(None)

    work.add_done_callback(ended)
    while (status := await statuses.get()) is not None:
        await response.write(orjson.dumps({"status": status}) + b"\n")
    try:
        work.result()
        if calibrate:
            await response.write(orjson.dumps({"status": "calibrating int8 and uint8 ranges"}) + b"\n")
            await request.app[CALIBRATOR].after_store(name)
        final: dict[str, Any] = {"status": "success"}
    except EmberdError as error:
        final = {"error": error.message}
    except Exception as error:  # the stream has begun: a bug must still end it with an error line
        log.exception("create of %s failed", name)
        final = {"error": f"create failed: {error}"}
    await response.write(orjson.dumps(final) + b"\n")
    await response.write_eof()
    return response


def _adapter_sources(adapters: dict[str, str] | list[str] | None) -> list[AdapterSource]:
    """CreateRequest.adapters as (path, task): a task named by the request, or by the file's header."""
    if adapters is None:
        return []
    if isinstance(adapters, dict):
        return [(Path(path).expanduser(), task) for task, path in adapters.items()]
    return [(Path(path).expanduser(), None) for path in adapters]


# -- pull, show, delete -----------------------------------------------------------------------------


@admitted(queue_slot=False)
async def pull(request: web.Request) -> web.StreamResponse:
    """Ollama's pull: NDJSON progress lines, or one object with stream:false."""
    body = await read_model(request, PullRequest)
    name = body.model_name
    canonical_name(name)  # an invalid name is a 400 before anything streams
    stream = body.stream
    pulls = request.app[PULLS]
    if stream is False:
        await pulls.pull(name)
        return json_response({"status": "success"})
    job = pulls.start(name)  # a name the Hub cannot serve, or offline mode, fails here: a plain error
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    try:
        async for event in job.follow():
            await response.write(orjson.dumps(event) + b"\n")
    except EmberdError as error:
        await response.write(orjson.dumps({"error": error.message}) + b"\n")
    await response.write_eof()
    return response


@admitted(queue_slot=False)
async def show(request: web.Request) -> web.Response:
    name = (await read_model(request, NamedModel)).model_name
    model = await stored_model(request.app, name)
    try:
        facts = await asyncio.to_thread(cached_gguf_facts, model.blob_path)  # read again only if the file changed
    except UnsupportedModelFile:  # stored before a check that refuses it: shown all the same (a load says why)
        facts = await asyncio.to_thread(read_gguf_facts, model.blob_path, False)
    model_info = {**facts.metadata, "general.parameter_count": facts.parameter_count}
    return json_response(
        {
            "license": str(facts.metadata.get("general.license", "")),
            "modelfile": f"# emberd model {model.name}\nFROM {model.blob_path}\n",
            "parameters": "",
            "template": "",
            "details": model_details(model),
            "model_info": model_info,
            "capabilities": facts.capabilities,
            "modified_at": model.modified_at,
            **model.prompts.as_manifest(),  # "prompts": {name: text}, "default_prompt_name"
            **_adapters_shown(model),
            **(await _heads_shown(model)),
        }
    )


async def _heads_shown(model: StoredModel) -> dict[str, Any]:
    """A model's BGE-M3 heads for /api/show (nothing for a model without them)."""
    if model.heads is None:
        return {}
    shown: dict[str, Any] = {
        "outputs": ["sparse", "colbert"],
        "digest": model.heads.digest.removeprefix("sha256:"),
        "size": model.heads.size_bytes,
    }
    with contextlib.suppress(InvalidModelFile):  # shown all the same; a request for sparse or colbert says why
        shown["colbert_dimensions"] = (await asyncio.to_thread(load_heads, model.heads.blob_path)).colbert_dimensions
    return {"heads": shown}


def _adapters_shown(model: StoredModel) -> dict[str, Any]:
    """A model's task adapters for /api/show (nothing for a model without them)."""
    if not model.adapters:
        return {}
    adapters = [
        {
            "task": adapter.task,
            "prompt_prefix": adapter.prompt_prefix,
            "alpha": adapter.alpha,
            "digest": adapter.digest.removeprefix("sha256:"),
            "size": adapter.size_bytes,
        }
        for adapter in model.adapters
    ]
    return {"adapters": adapters, "default_task": model.default_task}


@admitted(queue_slot=False)
async def delete(request: web.Request) -> web.Response:
    name = (await read_model(request, NamedModel)).model_name
    store = request.app[STORE]
    model = await stored_model(request.app, name)
    await request.app[SCHEDULER].unload_canonical(model.name, "deleted")  # a loaded model is unloaded first
    await asyncio.to_thread(store.delete, model.name)  # UnknownModel if another delete came first
    return web.Response(status=200)


# -- small endpoints --------------------------------------------------------------------------------


async def root(_request: web.Request) -> web.Response:
    # Clients probe this exact text to detect an Ollama-compatible server.
    return web.Response(text="Ollama is running", content_type="text/plain")


async def version(_request: web.Request) -> web.Response:
    return json_response({"version": __version__})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", root)  # aiohttp answers HEAD for every GET route
    app.router.add_get("/api/version", version)
    app.router.add_post("/api/embed", embed)
    app.router.add_post("/api/embeddings", legacy_embeddings)
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/create", create)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/pull", pull)
    app.router.add_post("/api/show", show)
    app.router.add_delete("/api/delete", delete)
