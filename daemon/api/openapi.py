"""GET /openapi.json: an OpenAPI 3.1 description of every route emberd serves, generated.

The document is built once, when the app is, by a pure function: each route's request body and
answers are the models of daemon.api.models (their JSON Schemas come from msgspec, from the same
declarations that decode the requests), and each route's errors come from the error table
(daemon.api.app's ERROR_STATUS): each status is described by the error classes that map to it, so
the document cannot drift from the table. tests/test_openapi.py holds the document to the app's
routes both ways; tests/reliability/fuzz_routes.py draws its requests from it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import orjson
from aiohttp import web

from daemon import __version__
from daemon.api import models
from daemon.api.access import OPEN_PATHS
from daemon.api.common import (
    CACHE_HITS_HEADER,
    JSON_CONTENT_TYPE,
    LLAMA_VERSION_HEADER,
    MODEL_DIGEST_HEADER,
    TRUNCATED_HEADER,
    error_body,
)
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
    InvalidEmbedding,
    InvalidInput,
    InvalidModelFile,
    InvalidModelName,
    MemoryBusy,
    MissingBody,
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

OPENAPI_PATH: Final = "/openapi.json"
Schema = dict[str, Any]
ErrorTable = Sequence[tuple[type[EmberdError], int]]
# A 2xx answer's body: a model of daemon.api.models, or (text, and this document) a plain schema.
Content = type[msgspec.Struct] | Schema
REF_TEMPLATE: Final = "#/components/schemas/{name}"


def ref(name: str) -> Schema:
    return {"$ref": REF_TEMPLATE.format(name=name)}


# One line of application/x-ndjson: progress, or an error that came after the stream began.
STREAM_LINE: Final = {
    "description": "one line of application/x-ndjson; the last is {status: success}, or an error that "
    "came after the stream began",
    "oneOf": [ref("StatusLine"), ref("Error")],
}
STREAMED: Final[dict[str, Content]] = {"application/x-ndjson": ref("StreamLine"), "application/json": models.Success}


@dataclass(frozen=True)
class Answer:
    """A 2xx answer: a description, and a schema per media type (none: an empty body)."""

    description: str
    content: dict[str, Content] = field(default_factory=dict)
    headers: tuple[str, ...] = ()


def json_answer(description: str, model: type[msgspec.Struct], headers: tuple[str, ...] = ()) -> Answer:
    return Answer(description, {"application/json": model}, headers)


EMBEDDING_HEADERS: Final = (MODEL_DIGEST_HEADER, LLAMA_VERSION_HEADER, CACHE_HITS_HEADER)
HEADER_DESCRIPTIONS: Final = {
    TRUNCATED_HEADER: "how many inputs were cut to the context",
    MODEL_DIGEST_HEADER: "sha256 of the model file that made the vectors",
    LLAMA_VERSION_HEADER: "the llama.cpp build that made them",
    CACHE_HITS_HEADER: "how many inputs the vector cache answered (0 with the cache off)",
}

# -- routes -----------------------------------------------------------------------------------------

UPLOAD_FORM: Final = {
    "type": "object",
    "properties": {
        "purpose": {"type": "string", "enum": ["batch"]},
        "file": {"type": "string", "format": "binary", "description": "JSONL: one /v1/embeddings request a line"},
    },
    "required": ["purpose", "file"],
}

ADMISSION: Final = (Overloaded, ShuttingDown)
MODEL_LOOKUP: Final = (InvalidModelName, UnknownModel, UnreadableManifest)
# An embedding request may pull its model first (auto_pull), then loads it and runs it.
AUTO_PULL: Final = (HubUnavailable, DownloadFailed, InsufficientDisk, BlobMissing)
RUNNING: Final = (
    NotEmbeddingModel,
    MemoryBusy,
    InsufficientMemory,
    ModelNotLoadable,
    ModelLoadFailed,
    RunnerCrashed,
)
EMBEDDING_ERRORS: Final = (
    InvalidInput,
    ContextExceeded,
    InvalidEmbedding,
    TooManyInputs,
    *MODEL_LOOKUP,
    *ADMISSION,
    *AUTO_PULL,
    *RUNNING,
)


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    operation_id: str
    tag: str
    summary: str
    answer: Answer
    request: type[models.Body] | None = None  # a JSON body
    errors: tuple[type[EmberdError], ...] = ()
    other_answers: dict[int, Answer] = field(default_factory=dict)  # not errors: /readyz's 503
    form: Schema | None = None  # a multipart/form-data body (an upload), instead of `request`


ROUTES: Final = (
    Route(
        "get",
        "/",
        "root",
        "ollama",
        "the text Ollama clients probe for",
        Answer("Ollama is running", {"text/plain": {"type": "string", "const": "Ollama is running"}}),
    ),
    Route("get", "/api/version", "version", "ollama", "emberd's version", json_answer("the version", models.Version)),
    Route(
        "post",
        "/api/embed",
        "embed",
        "ollama",
        "embed texts",
        json_answer("the vectors", models.EmbedAnswer, (TRUNCATED_HEADER, *EMBEDDING_HEADERS)),
        models.EmbedRequest,
        EMBEDDING_ERRORS,
    ),
    Route(
        "post",
        "/api/embeddings",
        "embeddingsLegacy",
        "ollama",
        "embed one text, the model's pooled vector as is (Ollama's legacy route)",
        json_answer("the vector", models.LegacyEmbedAnswer, EMBEDDING_HEADERS),
        models.LegacyEmbedRequest,
        EMBEDDING_ERRORS,
    ),
    Route(
        "post",
        "/api/generate",
        "generate",
        "ollama",
        "only the unload idiom of `ollama stop`: {model, keep_alive: 0}",
        json_answer("the model was unloaded", models.Unloaded),
        models.GenerateRequest,
        (InvalidInput, *MODEL_LOOKUP),
    ),
    Route(
        "post",
        "/api/create",
        "create",
        "models",
        "register a GGUF file, or convert a Hugging Face BERT directory",
        Answer("progress lines then success (stream), or one object (stream: false)", STREAMED),
        models.CreateRequest,
        (InvalidInput, InvalidModelName, UnknownModel, InvalidModelFile, InsufficientDisk, BlobMissing),
    ),
    Route("get", "/api/tags", "tags", "models", "the models in the store", json_answer("models", models.ModelList)),
    Route("get", "/api/ps", "ps", "models", "the loaded models", json_answer("loaded models", models.LoadedList)),
    Route(
        "post",
        "/api/pull",
        "pull",
        "models",
        "download a model from the Hub",
        Answer("progress lines then success (stream), or one object (stream: false)", STREAMED),
        models.PullRequest,
        (InvalidInput, InvalidModelName, UnknownModel, NotEmbeddingModel, InvalidModelFile, *AUTO_PULL),
    ),
    Route(
        "post",
        "/api/show",
        "show",
        "models",
        "a model's details, GGUF metadata and prompts",
        json_answer("the model", models.ShowAnswer),
        models.NamedModel,
        (InvalidInput, *MODEL_LOOKUP),
    ),
    Route(
        "delete",
        "/api/delete",
        "delete",
        "models",
        "remove a model (unloaded first if loaded)",
        Answer("removed: an empty body"),
        models.NamedModel,
        (InvalidInput, *MODEL_LOOKUP),
    ),
    Route(
        "post",
        "/v1/embeddings",
        "openaiEmbeddings",
        "openai",
        "embed texts or token ids (OpenAI)",
        json_answer("the vectors", models.OpenAIEmbedAnswer, EMBEDDING_HEADERS),
        models.OpenAIEmbedRequest,
        EMBEDDING_ERRORS,
    ),
    Route(
        "post",
        "/v1/files",
        "uploadFile",
        "batch",
        "upload a batch's input lines (OpenAI's Files API), streamed to disk",
        json_answer("the file", models.FileObject),
        None,
        (InvalidInput, UploadTooLarge, InsufficientDisk, BatchDatabaseUnavailable),
        form=UPLOAD_FORM,
    ),
    Route(
        "get",
        "/v1/files",
        "listFiles",
        "batch",
        "the files uploaded and written",
        json_answer("files", models.FileList),
        None,
        (BatchDatabaseUnavailable,),
    ),
    Route(
        "get",
        "/v1/files/{file_id}",
        "getFile",
        "batch",
        "one file",
        json_answer("the file", models.FileObject),
        None,
        (UnknownObject, BatchDatabaseUnavailable),
    ),
    Route(
        "delete",
        "/v1/files/{file_id}",
        "deleteFile",
        "batch",
        "delete a file",
        json_answer("deleted", models.FileDeleted),
        None,
        (UnknownObject, BatchDatabaseUnavailable),
    ),
    Route(
        "get",
        "/v1/files/{file_id}/content",
        "fileContent",
        "batch",
        "a file's lines (a batch's input, output or errors)",
        Answer("JSONL", {"application/octet-stream": {"type": "string", "format": "binary"}}),
        None,
        (UnknownObject, BatchDatabaseUnavailable),
    ),
    Route(
        "post",
        "/v1/batches",
        "createBatch",
        "batch",
        "embed a file of /v1/embeddings requests in the background (OpenAI's Batch API)",
        json_answer("the batch", models.BatchObject),
        models.BatchCreateRequest,
        (InvalidInput, UnknownObject, BatchDatabaseUnavailable, *ADMISSION),
    ),
    Route(
        "get",
        "/v1/batches",
        "listBatches",
        "batch",
        "batches, newest first",
        json_answer("batches", models.BatchList),
        None,
        (InvalidInput, BatchDatabaseUnavailable),
    ),
    Route(
        "get",
        "/v1/batches/{batch_id}",
        "getBatch",
        "batch",
        "one batch: its status and request_counts",
        json_answer("the batch", models.BatchObject),
        None,
        (UnknownObject, BatchDatabaseUnavailable),
    ),
    Route(
        "post",
        "/v1/batches/{batch_id}/cancel",
        "cancelBatch",
        "batch",
        "cancel a batch: what is done is kept",
        json_answer("the batch", models.BatchObject),
        None,
        (UnknownObject, BatchDatabaseUnavailable),
    ),
    Route(
        "post",
        "/v2/embed",
        "cohereEmbed",
        "cohere",
        "embed texts as typed vectors: float, int8, uint8, binary, ubinary, base64 (Cohere's embed v2)",
        json_answer("the vectors, one list per type", models.CohereEmbedAnswer, (TRUNCATED_HEADER, *EMBEDDING_HEADERS)),
        models.CohereEmbedRequest,
        EMBEDDING_ERRORS,
    ),
    Route(
        "get",
        "/v1/models",
        "openaiModels",
        "openai",
        "the models in the store (OpenAI)",
        json_answer("models", models.OpenAIModelList),
    ),
    Route(
        "get",
        "/v1/models/{model}",
        "openaiModel",
        "openai",
        "one model (OpenAI); the name may hold slashes (hf.co/owner/repo:tag)",
        json_answer("the model", models.OpenAIModel),
        None,
        MODEL_LOOKUP,
    ),
    *(
        Route(
            "post",
            path,
            operation_id,
            "rerank",
            f"score documents against a query ({dialect})",
            json_answer("results, best first", models.RerankAnswer, EMBEDDING_HEADERS),
            models.RerankRequest,
            EMBEDDING_ERRORS,
        )
        for path, operation_id, dialect in (
            ("/api/rerank", "rerank", "llama.cpp's server"),
            ("/v1/rerank", "rerankV1", "Jina"),
            ("/v2/rerank", "rerankV2", "Cohere"),
        )
    ),
    Route(
        "post",
        "/embed_all",
        "embedAll",
        "tei",
        "every token's vector of each input, special tokens included (TEI's, with a model field)",
        Answer(
            "per input, per token, its vector",
            {
                "application/json": {
                    "type": "array",
                    "items": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                }
            },
            EMBEDDING_HEADERS,
        ),
        models.TokenVectorsRequest,
        EMBEDDING_ERRORS,
    ),
    Route(
        "post",
        "/embed_sparse",
        "embedSparse",
        "tei",
        "BGE-M3's sparse (lexical) weights of each input (TEI's, with a model field)",
        Answer(
            "per input, its tokens' weights (special tokens left out), by token id",
            {"application/json": {"type": "array", "items": {"type": "array", "items": ref("SparseValue")}}},
            EMBEDDING_HEADERS,
        ),
        models.SparseRequest,
        EMBEDDING_ERRORS,
    ),
    Route(
        "post",
        "/api/tokenize",
        "tokenize",
        "tokens",
        "the model's own tokens for a text",
        json_answer("token ids", models.Tokens),
        models.TokenizeRequest,
        (InvalidInput, *MODEL_LOOKUP, *ADMISSION, ModelNotLoadable, ModelLoadFailed, RunnerCrashed),
    ),
    Route(
        "post",
        "/api/detokenize",
        "detokenize",
        "tokens",
        "the text of token ids (special tokens left out)",
        json_answer("the text", models.Detokenized),
        models.DetokenizeRequest,
        (InvalidInput, *MODEL_LOOKUP, *ADMISSION, ModelNotLoadable, ModelLoadFailed, RunnerCrashed),
    ),
    Route(
        "get",
        "/healthz",
        "healthz",
        "operations",
        "alive: the event loop turns (touches neither the store nor a runner)",
        json_answer("alive", models.Alive),
    ),
    Route(
        "get",
        "/readyz",
        "readyz",
        "operations",
        "ready to serve, for load balancers",
        json_answer("serving", models.Ready),
        other_answers={503: json_answer("starting (--ensure-model), or draining after a stop signal", models.NotReady)},
    ),
    Route(
        "get",
        "/metrics",
        "metrics",
        "operations",
        "Prometheus metrics",
        Answer("Prometheus' text format 0.0.4", {"text/plain": {"type": "string"}}),
    ),
    Route(
        "get",
        OPENAPI_PATH,
        "openapi",
        "operations",
        "this document",
        Answer("OpenAPI 3.1", {"application/json": {"type": "object"}}),
    ),
)
# Models the document names though no route holds them directly: the error bodies, a line of a
# progress stream, and the runner options a request's `options` refers to.
NAMED_MODELS: Final = (
    models.Error,
    models.OpenAIError,
    models.TEIError,
    models.CohereError,
    models.SparseValue,
    models.StatusLine,
    models.Options,
)


NULL: Final = {"type": "null"}


def without_null(schema: Schema) -> Schema:
    """A request field's schema without msgspec's null branch: a body's null is taken as absent,
    and the document says what to send."""
    branches = schema.get("anyOf", [])
    if NULL not in branches:
        return schema
    rest = [branch for branch in branches if branch != NULL]
    outer = {key: value for key, value in schema.items() if key != "anyOf" and (key, value) != ("default", None)}
    return {**outer, **rest[0]} if len(rest) == 1 else {**outer, "anyOf": rest}


def nullable(schema: Schema) -> Schema:
    """msgspec's `{anyOf: [{type: T, ...}, {type: null}]}` as `{type: [T, "null"], ...}`."""
    branches = schema.get("anyOf", [])
    if len(branches) != 2 or NULL not in branches:
        return schema
    (kept,) = [branch for branch in branches if branch != NULL]
    if not isinstance(kept.get("type"), str) or "enum" in kept:
        return schema
    outer = {key: value for key, value in schema.items() if key != "anyOf" and (key, value) != ("default", None)}
    return {**outer, **kept, "type": [kept["type"], "null"]}


def model_schemas() -> tuple[dict[type[msgspec.Struct], Schema], Schema]:
    """(each request model -> its schema, inline in its operation), and the components: every
    other model, by name (answers, their parts, errors, options)."""
    kinds: list[type[msgspec.Struct]] = list(NAMED_MODELS)
    for route in ROUTES:
        answers = [route.answer, *route.other_answers.values()]
        kinds += [content for answer in answers for content in answer.content.values() if isinstance(content, type)]
        if route.request is not None:
            kinds.append(route.request)
    kinds = list(dict.fromkeys(kinds))
    _refs, components = msgspec.json.schema_components(kinds, ref_template=REF_TEMPLATE)
    bodies: dict[type[msgspec.Struct], Schema] = {}
    for name, schema in list(components.items()):
        schema.pop("title", None)  # the component's name says it
        if not schema.get("required", True):
            del schema["required"]
        kind = getattr(models, name)
        if issubclass(kind, models.Body):
            # Inline in its operation. What a body must carry is checked by its handler, whose status
            # for a missing field is its dialect's (no model: a 404 on /api/embed, a 400 on /v1/).
            properties = {key: without_null(value) for key, value in schema["properties"].items()}
            bodies[kind] = {**components.pop(name), "properties": properties, "required": list(kind.required)}
        elif "properties" in schema:
            schema["properties"] = {key: nullable(value) for key, value in schema["properties"].items()}
    return bodies, components


# -- the document -----------------------------------------------------------------------------------


def status_of(error: type[EmberdError], error_status: ErrorTable) -> int:
    """The status the error table gives an error class (its first entry the class falls under)."""
    return next((status for kind, status in error_status if issubclass(error, kind)), 500)


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if text and text.strip() else ""


def error_reasons(route: Route, error_status: ErrorTable) -> dict[int, list[str]]:
    """Status -> what gives it, for one route: its own errors, the access checks every route has,
    and the body size limit."""
    errors: list[type[EmberdError]] = [ForbiddenHost]
    if route.path not in OPEN_PATHS:
        errors.append(Unauthorized)
    if route.request is not None:
        errors.append(MissingBody)
    errors += [error for error in route.errors if error not in errors]
    reasons: dict[int, list[str]] = {}
    for error in errors:
        reasons.setdefault(status_of(error, error_status), []).append(f"{error.__name__}: {_first_line(error.__doc__)}")
    reasons.setdefault(403, []).append(
        "a page of another origin: an Origin that is not emberd's own, a loopback page or in cors_origins"
    )
    if route.request is not None:
        reasons.setdefault(413, []).append("the body is larger than max_body_bytes (EMBERD_MAX_BODY_BYTES)")
        reasons.setdefault(503, []).append(
            "the bodies in flight would pass bodies_in_flight (EMBERD_BODIES_IN_FLIGHT): Retry-After says when to retry"
        )
    return dict(sorted(reasons.items()))


def error_schema(path: str) -> Schema:
    """Ollama's {"error": "..."}, or OpenAI's, Cohere's or TEI's body where common.error_body gives it."""
    body = error_body(path, 400, "")
    if "error_type" in body:
        return ref("TEIError")
    if "message" in body:
        return ref("CohereError")
    return ref("OpenAIError") if isinstance(body["error"], dict) else ref("Error")


def _content_schema(content: Content) -> Schema:
    return ref(content.__name__) if isinstance(content, type) else content


def _answer(answer: Answer, with_body: bool) -> Schema:
    response: Schema = {"description": answer.description}
    if answer.content and with_body:
        response["content"] = {media: {"schema": _content_schema(kind)} for media, kind in answer.content.items()}
    if answer.headers:
        response["headers"] = {
            name: {"description": HEADER_DESCRIPTIONS[name], "schema": {"type": "string"}} for name in answer.headers
        }
    return response


def operation(
    route: Route, error_status: ErrorTable, bodies: dict[type[msgspec.Struct], Schema], head: bool = False
) -> Schema:
    """One OpenAPI operation, its request body's schema from `bodies` (see model_schemas); `head` is
    the HEAD aiohttp answers for a GET route (no bodies)."""
    responses: Schema = {"200": _answer(route.answer, not head)}
    for status, answer in route.other_answers.items():
        responses[str(status)] = _answer(answer, not head)
    for status, reasons in error_reasons(route, error_status).items():
        response: Schema = {"description": "\n".join(f"- {reason}" for reason in reasons)}
        if not head:
            response["content"] = {"application/json": {"schema": error_schema(route.path)}}
        responses[str(status)] = response
    document: Schema = {
        "operationId": route.operation_id + ("Head" if head else ""),
        "tags": [route.tag],
        "summary": ("the headers of GET: " if head else "") + route.summary,
        "responses": responses,
    }
    if "{model}" in route.path:
        document["parameters"] = [
            {
                "name": "model",
                "in": "path",
                "required": True,
                "schema": {
                    **msgspec.json.schema(models.ModelName),
                    "description": "a model name; slashes stay as they are",
                },
            }
        ]
    others = [name for name in re.findall(r"\{(\w+)\}", route.path) if name != "model"]
    if others:
        document["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in others
        ]
    if route.request is not None:
        schema = bodies[route.request]
        document["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    if route.form is not None:
        document["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": route.form}}}
    return document


def build_document(error_status: ErrorTable) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route in ROUTES (a GET route also answers HEAD)."""
    bodies, components = model_schemas()
    paths: dict[str, Schema] = {}
    for route in ROUTES:
        item = paths.setdefault(route.path, {})
        item[route.method] = operation(route, error_status, bodies)
        if route.method == "get":
            item["head"] = operation(route, error_status, bodies, head=True)
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "emberd",
            "version": __version__,
            "summary": "A local embedding daemon: Ollama's embedding API on llama.cpp, plus OpenAI's and reranking",
            "description": "Errors are {error: message} (OpenAI's body on /v1/). Every route answers 403 to "
            "a Host header that is not local while the daemon is bound to loopback and to a page of another "
            "origin (an Origin header not its own, a loopback page's or in cors_origins), and, with api_keys_file "
            "set, 401 without `Authorization: Bearer KEY` (except /, /healthz and /readyz). With "
            "cors_origins set, OPTIONS preflights get 204.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [{"name": tag} for tag in dict.fromkeys(route.tag for route in ROUTES)],
        "paths": paths,
        "components": {
            "schemas": {**components, "StreamLine": STREAM_LINE},
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "only with api_keys_file set"}
            },
        },
        "security": [{}, {"apiKey": []}],
    }
    return copy.deepcopy(document)  # STREAM_LINE and the path parameter's schema are shared: the caller gets its own


def add_routes(app: web.Application, error_status: ErrorTable) -> None:
    """GET (and HEAD) /openapi.json: the document, serialized once."""
    document = orjson.dumps(build_document(error_status))

    async def serve(_request: web.Request) -> web.Response:
        return web.Response(body=document, headers={"Content-Type": JSON_CONTENT_TYPE})

    app.router.add_get(OPENAPI_PATH, serve)
