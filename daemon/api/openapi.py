"""GET /openapi.json: an OpenAPI 3.1 description of every route emberd serves.

The document is built once, when the app is, by a pure function: each route's request body (types,
required fields, enums), its answers, and its errors. An error's status comes from the error table
(daemon.api.app's ERROR_STATUS), and each status is described by the error classes that map to it,
so the document cannot drift from the table. tests/test_openapi.py holds the document to the app's
routes both ways; tests/reliability/fuzz_routes.py draws its requests from it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from aiohttp import web

from daemon import __version__
from daemon.api.access import OPEN_PATHS
from daemon.api.common import (
    JSON_CONTENT_TYPE,
    LLAMA_VERSION_HEADER,
    MODEL_DIGEST_HEADER,
    TRUNCATED_HEADER,
    error_body,
)
from daemon.api.openai import ENCODING_FORMATS
from daemon.api.tokens import MAX_DETOKENIZE_TOKENS
from daemon.errors import (
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
    NotEmbeddingModel,
    Overloaded,
    RunnerCrashed,
    ShuttingDown,
    TooManyInputs,
    Unauthorized,
    UnknownModel,
    UnreadableManifest,
)
from daemon.names import MAX_NAME_LENGTH
from daemon.prompts import INPUT_TYPE_PROMPTS, MAX_PROMPT_CHARS

OPENAPI_PATH: Final = "/openapi.json"
Schema = dict[str, Any]
ErrorTable = Sequence[tuple[type[EmberdError], int]]

# -- schema helpers ---------------------------------------------------------------------------------


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(properties: dict[str, Schema], required: Sequence[str] = (), *, closed: bool = True, **extra: Any) -> Schema:
    """An object schema. Answers are closed (every field documented); request bodies are open, as
    the daemon ignores fields it does not know."""
    schema: Schema = {"type": "object", "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    if closed:
        schema.setdefault("additionalProperties", False)
    return schema


def body(properties: dict[str, Schema], required: Sequence[str] = (), **extra: Any) -> Schema:
    return obj(properties, required, closed=False, **extra)


def array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


def typed(kind: str | list[str], description: str = "", **extra: Any) -> Schema:
    schema: Schema = {"type": kind, **extra}
    if description:
        schema["description"] = description
    return schema


STRING: Final = typed("string")
INTEGER: Final = typed("integer")
NUMBER: Final = typed("number")
BOOLEAN: Final = typed("boolean")
NANOSECONDS: Final = typed("integer", "nanoseconds", minimum=0)


def model_field(description: str = "a model name: an alias, name:tag or hf.co/{owner}/{repo}[:{quant}]") -> Schema:
    return typed(
        "string", description, minLength=1, maxLength=MAX_NAME_LENGTH, examples=["all-minilm", "hf.co/owner/repo:Q8_0"]
    )


# Older Ollama clients send `name` where newer ones send `model`.
LEGACY_NAME: Final = {**model_field("older clients' spelling of `model`"), "deprecated": True}
GO_DURATION_PATTERN: Final = r"^\s*[+-]?(0|((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+)\s*$"
KEEP_ALIVE: Final = {
    "description": "how long the model stays loaded after this request: seconds, or a Go duration; "
    "negative = forever, 0 = unload when idle; absent leaves it as it is",
    "oneOf": [typed("string", pattern=GO_DURATION_PATTERN, examples=["5m", "1h30m", "-1m", "300ms", "0"]), NUMBER],
}
PROMPT_NAME: Final = typed("string", "one of the model's prompts, put before every input (see /api/show)")
SPLIT_LONG_INPUTS: Final = typed(
    "boolean", "inputs over the context are embedded in overlapping windows and pooled, not cut", default=False
)
WINDOWS: Final = typed("integer", "windows the input was split into (with split_long_inputs)", minimum=1)
VECTOR: Final = array(NUMBER, description="float32 values")


def _options() -> Schema:
    def option(kind: str, description: str, **extra: Any) -> Schema:
        return typed([kind, "null"], description + "; null = unset", **extra)

    return body(
        {
            "num_ctx": option("integer", "tokens an input may have (at most the trained context); 0 = all", minimum=0),
            "num_batch": option("integer", "token budget of one llama.cpp decode", minimum=1, maximum=16384),
            "num_thread": option("integer", "llama.cpp threads; 0 = shared among busy runners", minimum=0, maximum=512),
            "num_gpu": option("integer", "layers offloaded to a GPU; -1 = all"),
            "main_gpu": option("integer", "as in llama.cpp", minimum=0),
            "use_mmap": option("boolean", "as in llama.cpp"),
        },
        description="runner options; unknown keys (generation options clients send along) are ignored",
    )


# -- request bodies ---------------------------------------------------------------------------------

EMBED_REQUEST: Final = body(
    {
        "model": model_field(),
        "name": LEGACY_NAME,
        "input": {
            "description": 'one text or several; absent, "" or [] only loads the model (with keep_alive 0, '
            "unloads it). At most max_inputs (EMBERD_MAX_INPUTS) texts: more get 413",
            "anyOf": [STRING, array(STRING)],
        },
        "truncate": typed("boolean", "cut inputs over the context (keeping the beginning); false: a 400", default=True),
        "dimensions": typed("integer", "keep the first d values, renormalized; 0 = all", minimum=0),
        "keep_alive": KEEP_ALIVE,
        "options": ref("Options"),
        "prompt_name": PROMPT_NAME,
        "split_long_inputs": SPLIT_LONG_INPUTS,
    },
    ["model"],
)
LEGACY_EMBED_REQUEST: Final = body(
    {
        "model": model_field(),
        "name": LEGACY_NAME,
        "prompt": typed("string", "the text; empty only loads the model"),
        "keep_alive": KEEP_ALIVE,
        "options": ref("Options"),
    },
    ["model"],
)
TOKEN_IDS: Final = array(
    typed("integer", minimum=0),
    minItems=1,
    description="token ids: OpenAI's cl100k_base (the default) or the model's own (openai_token_ids = model)",
)
OPENAI_EMBED_REQUEST: Final = body(
    {
        "model": model_field(),
        "input": {
            "description": "a text, texts, token ids, or lists of token ids; at most max_inputs inputs (more: 413)",
            "oneOf": [STRING, array(STRING, minItems=1), TOKEN_IDS, array(TOKEN_IDS, minItems=1)],
        },
        "encoding_format": typed(
            "string", "float (default) or base64 (little-endian float32); case-insensitive", enum=list(ENCODING_FORMATS)
        ),
        "dimensions": typed("integer", "keep the first d values, renormalized", minimum=1),
        "user": STRING,
        "prompt_name": PROMPT_NAME,
        "input_type": typed("string", "picks the model's query or document prompt", enum=list(INPUT_TYPE_PROMPTS)),
        "split_long_inputs": SPLIT_LONG_INPUTS,
    },
    ["model", "input"],
)
RERANK_REQUEST: Final = body(
    {
        "model": model_field("a reranker: a GGUF with llama.cpp's rank pooling"),
        "query": STRING,
        "documents": array(
            {"anyOf": [STRING, body({"text": STRING}, ["text"])]},
            description="texts, or {text} objects; at most max_inputs (more: 413)",
        ),
        "top_n": typed("integer", "at most this many results, best first", minimum=1),
        "return_documents": typed("boolean", default=False),
    },
    ["model", "query", "documents"],
)
TOKENIZE_REQUEST: Final = body(
    {
        "model": model_field(),
        "content": STRING,
        "add_special": typed("boolean", "the special tokens the model puts around an input", default=True),
    },
    ["model", "content"],
)
DETOKENIZE_REQUEST: Final = body(
    {"model": model_field(), "tokens": array(INTEGER, maxItems=MAX_DETOKENIZE_TOKENS)},
    ["model", "tokens"],
)
NAMED_MODEL: Final = body({"model": model_field(), "name": LEGACY_NAME}, ["model"])
PULL_REQUEST: Final = body(
    {
        "model": model_field(),
        "name": LEGACY_NAME,
        "stream": typed("boolean", "false: one JSON object at the end instead of NDJSON progress", default=True),
    },
    ["model"],
)
# The converter's output types (daemon.convert.OUTPUT_TYPES, which the daemon imports only to convert).
QUANTIZE_TYPES: Final = ["f32", "f16", "q8_0"]
CREATE_REQUEST: Final = body(
    {
        "model": model_field(),
        "name": LEGACY_NAME,
        "from": typed("string", "a GGUF file or a Hugging Face model directory on the daemon's machine", minLength=1),
        "quantize": typed(
            "string", "output type when converting a directory (case-insensitive)", enum=QUANTIZE_TYPES, default="f16"
        ),
        "stream": typed("boolean", "false: one JSON object at the end instead of NDJSON progress", default=True),
        "prompts": obj(
            {}, additionalProperties=typed("string", maxLength=MAX_PROMPT_CHARS), description="prompt name -> text"
        ),
        "default_prompt_name": typed("string", "one of prompts, applied when a request names none"),
    },
    ["model", "from"],
)
GENERATE_REQUEST: Final = body(
    {
        "model": model_field(),
        "name": LEGACY_NAME,
        "keep_alive": KEEP_ALIVE,
        "prompt": typed("string", "must be absent or empty: emberd only unloads here"),
    },
    ["model"],
)

# -- answers ----------------------------------------------------------------------------------------

DETAILS: Final = obj(
    {
        "parent_model": STRING,
        "format": typed("string", const="gguf"),
        "family": STRING,
        "families": array(STRING),
        "parameter_size": typed("string", examples=["22.7M"]),
        "quantization_level": typed("string", examples=["F16", "Q8_0"]),
    },
    ["format", "family", "families", "parameter_size", "quantization_level"],
)
TAG_FIELDS: Final = {
    "name": STRING,
    "model": STRING,
    "modified_at": typed("string", format="date-time"),
    "size": typed("integer", "bytes", minimum=0),
    "digest": typed("string", "sha256 of the GGUF file, hex"),
    "details": ref("ModelDetails"),
    "capabilities": array(STRING),
}
TAG: Final = obj(TAG_FIELDS, list(TAG_FIELDS))
PS_FIELDS: Final = {
    **TAG_FIELDS,
    "size": typed("integer", "bytes the scheduler counts for it", minimum=0),
    "expires_at": typed("string", "when it unloads if idle (far in the future: never)", format="date-time"),
    "size_vram": typed("integer", minimum=0),
    "context_length": typed("integer", "tokens an input may have", minimum=0),
}
LOADED: Final = obj(PS_FIELDS, list(PS_FIELDS))
EMBED_ANSWER: Final = obj(
    {
        "model": typed("string", "the request's model, as sent"),
        "embeddings": array(VECTOR, description="one L2-normalized vector an input, in input order"),
        "total_duration": NANOSECONDS,
        "load_duration": NANOSECONDS,
        "prompt_eval_count": typed("integer", "tokens embedded, special tokens included", minimum=0),
        "windows": array(WINDOWS, description="with split_long_inputs: windows per input"),
    },
    ["model", "embeddings"],
    description='with no input, only {"model", "embeddings": []}',
)
LEGACY_EMBED_ANSWER: Final = obj({"embedding": VECTOR}, ["embedding"])
OPENAI_EMBED_ANSWER: Final = obj(
    {
        "object": typed("string", const="list"),
        "data": array(
            obj(
                {
                    "object": typed("string", const="embedding"),
                    "embedding": {"oneOf": [VECTOR, typed("string", "base64 of little-endian float32")]},
                    "index": typed("integer", minimum=0),
                    "windows": WINDOWS,
                },
                ["object", "embedding", "index"],
            )
        ),
        "model": STRING,
        "usage": ref("Usage"),
    },
    ["object", "data", "model", "usage"],
)
USAGE: Final = obj(
    {"prompt_tokens": typed("integer", minimum=0), "total_tokens": typed("integer", minimum=0)},
    ["prompt_tokens", "total_tokens"],
)
RERANK_ANSWER: Final = obj(
    {
        "id": STRING,
        "model": STRING,
        "results": array(
            obj(
                {
                    "index": typed("integer", "the document's position in the request", minimum=0),
                    "relevance_score": NUMBER,
                    "document": obj({"text": STRING}, ["text"]),
                },
                ["index", "relevance_score"],
            ),
            description="best score first",
        ),
        "usage": ref("Usage"),
        "meta": obj({"billed_units": obj({"search_units": INTEGER})}),
    },
    ["id", "model", "results", "usage"],
)
MODEL_OBJECT: Final = obj(
    {
        "id": STRING,
        "object": typed("string", const="model"),
        "created": typed("integer", "unix seconds"),
        "owned_by": STRING,
    },
    ["id", "object", "created", "owned_by"],
)
SHOW_ANSWER: Final = obj(
    {
        "license": STRING,
        "modelfile": STRING,
        "parameters": STRING,
        "template": STRING,
        "details": ref("ModelDetails"),
        "model_info": typed("object", "the GGUF's metadata (arrays as null) and general.parameter_count"),
        "capabilities": array(STRING),
        "modified_at": typed("string", format="date-time"),
        "prompts": obj({}, additionalProperties=STRING),
        "default_prompt_name": typed(["string", "null"]),
    },
    ["details", "model_info", "capabilities", "modified_at", "prompts", "default_prompt_name"],
)
STATUS_LINE: Final = obj(
    {
        "status": typed("string", examples=["pulling manifest", "verifying sha256 digest", "success"]),
        "digest": STRING,
        "total": typed("integer", minimum=0),
        "completed": typed("integer", minimum=0),
    },
    ["status"],
)
STREAM_LINE: Final = {
    "description": "one line of application/x-ndjson; the last is {status: success}, or an error that "
    "came after the stream began",
    "oneOf": [ref("StatusLine"), ref("Error")],
}
SUCCESS: Final = obj({"status": typed("string", const="success")}, ["status"])


@dataclass(frozen=True)
class Answer:
    """A 2xx answer: a description, and a schema per media type (none: an empty body)."""

    description: str
    content: dict[str, Schema] = field(default_factory=dict)
    headers: tuple[str, ...] = ()


def json_answer(description: str, schema: Schema, headers: tuple[str, ...] = ()) -> Answer:
    return Answer(description, {"application/json": schema}, headers)


EMBEDDING_HEADERS: Final = (MODEL_DIGEST_HEADER, LLAMA_VERSION_HEADER)
HEADER_DESCRIPTIONS: Final = {
    TRUNCATED_HEADER: "how many inputs were cut to the context",
    MODEL_DIGEST_HEADER: "sha256 of the model file that made the vectors",
    LLAMA_VERSION_HEADER: "the llama.cpp build that made them",
}

# -- routes -----------------------------------------------------------------------------------------

ADMISSION: Final = (Overloaded, ShuttingDown)
MODEL_LOOKUP: Final = (InvalidModelName, UnknownModel, UnreadableManifest)
# An embedding request may pull its model first (auto_pull), then loads it and runs it.
AUTO_PULL: Final = (HubUnavailable, DownloadFailed, InsufficientDisk, BlobMissing)
RUNNING: Final = (NotEmbeddingModel, MemoryBusy, InsufficientMemory, ModelLoadFailed, RunnerCrashed)
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
    request: Schema | None = None  # a JSON body
    errors: tuple[type[EmberdError], ...] = ()
    other_answers: dict[int, Answer] = field(default_factory=dict)  # not errors: /readyz's 503


ROUTES: Final = (
    Route(
        "get",
        "/",
        "root",
        "ollama",
        "the text Ollama clients probe for",
        Answer("Ollama is running", {"text/plain": typed("string", const="Ollama is running")}),
    ),
    Route("get", "/api/version", "version", "ollama", "emberd's version", json_answer("the version", ref("Version"))),
    Route(
        "post",
        "/api/embed",
        "embed",
        "ollama",
        "embed texts",
        json_answer("the vectors", EMBED_ANSWER, (TRUNCATED_HEADER, *EMBEDDING_HEADERS)),
        EMBED_REQUEST,
        EMBEDDING_ERRORS,
    ),
    Route(
        "post",
        "/api/embeddings",
        "embeddingsLegacy",
        "ollama",
        "embed one text, the model's pooled vector as is (Ollama's legacy route)",
        json_answer("the vector", LEGACY_EMBED_ANSWER, EMBEDDING_HEADERS),
        LEGACY_EMBED_REQUEST,
        EMBEDDING_ERRORS,
    ),
    Route(
        "post",
        "/api/generate",
        "generate",
        "ollama",
        "only the unload idiom of `ollama stop`: {model, keep_alive: 0}",
        json_answer(
            "the model was unloaded",
            obj(
                {
                    "model": STRING,
                    "created_at": typed("string", format="date-time"),
                    "response": typed("string", const=""),
                    "done": typed("boolean", const=True),
                    "done_reason": typed("string", const="unload"),
                },
                ["model", "created_at", "response", "done", "done_reason"],
            ),
        ),
        GENERATE_REQUEST,
        (InvalidInput, *MODEL_LOOKUP),
    ),
    Route(
        "post",
        "/api/create",
        "create",
        "models",
        "register a GGUF file, or convert a Hugging Face BERT directory",
        Answer(
            "progress lines then success (stream), or one object (stream: false)",
            {"application/x-ndjson": ref("StreamLine"), "application/json": ref("Success")},
        ),
        CREATE_REQUEST,
        (InvalidInput, InvalidModelName, UnknownModel, InvalidModelFile, InsufficientDisk, BlobMissing),
    ),
    Route("get", "/api/tags", "tags", "models", "the models in the store", json_answer("models", ref("ModelList"))),
    Route("get", "/api/ps", "ps", "models", "the loaded models", json_answer("loaded models", ref("LoadedList"))),
    Route(
        "post",
        "/api/pull",
        "pull",
        "models",
        "download a model from the Hub",
        Answer(
            "progress lines then success (stream), or one object (stream: false)",
            {"application/x-ndjson": ref("StreamLine"), "application/json": ref("Success")},
        ),
        PULL_REQUEST,
        (InvalidInput, InvalidModelName, UnknownModel, NotEmbeddingModel, *AUTO_PULL),
    ),
    Route(
        "post",
        "/api/show",
        "show",
        "models",
        "a model's details, GGUF metadata and prompts",
        json_answer("the model", SHOW_ANSWER),
        NAMED_MODEL,
        (InvalidInput, *MODEL_LOOKUP),
    ),
    Route(
        "delete",
        "/api/delete",
        "delete",
        "models",
        "remove a model (unloaded first if loaded)",
        Answer("removed: an empty body"),
        NAMED_MODEL,
        (InvalidInput, *MODEL_LOOKUP),
    ),
    Route(
        "post",
        "/v1/embeddings",
        "openaiEmbeddings",
        "openai",
        "embed texts or token ids (OpenAI)",
        json_answer("the vectors", OPENAI_EMBED_ANSWER, EMBEDDING_HEADERS),
        OPENAI_EMBED_REQUEST,
        EMBEDDING_ERRORS,
    ),
    Route(
        "get",
        "/v1/models",
        "openaiModels",
        "openai",
        "the models in the store (OpenAI)",
        json_answer("models", obj({"object": typed("string", const="list"), "data": array(ref("OpenAIModel"))})),
    ),
    Route(
        "get",
        "/v1/models/{model}",
        "openaiModel",
        "openai",
        "one model (OpenAI); the name may hold slashes (hf.co/owner/repo:tag)",
        json_answer("the model", ref("OpenAIModel")),
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
            json_answer("results, best first", RERANK_ANSWER, EMBEDDING_HEADERS),
            RERANK_REQUEST,
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
        "/api/tokenize",
        "tokenize",
        "tokens",
        "the model's own tokens for a text",
        json_answer("token ids", obj({"model": STRING, "tokens": array(INTEGER)}, ["model", "tokens"])),
        TOKENIZE_REQUEST,
        (InvalidInput, *MODEL_LOOKUP, *ADMISSION, ModelLoadFailed, RunnerCrashed),
    ),
    Route(
        "post",
        "/api/detokenize",
        "detokenize",
        "tokens",
        "the text of token ids (special tokens left out)",
        json_answer("the text", obj({"model": STRING, "content": STRING}, ["model", "content"])),
        DETOKENIZE_REQUEST,
        (InvalidInput, *MODEL_LOOKUP, *ADMISSION, ModelLoadFailed, RunnerCrashed),
    ),
    Route(
        "get",
        "/healthz",
        "healthz",
        "operations",
        "alive: the event loop turns (touches neither the store nor a runner)",
        json_answer("alive", obj({"status": typed("string", const="alive")}, ["status"])),
    ),
    Route(
        "get",
        "/readyz",
        "readyz",
        "operations",
        "ready to serve, for load balancers",
        json_answer("serving", obj({"status": typed("string", const="ready")}, ["status"])),
        other_answers={
            503: json_answer(
                "starting (--ensure-model), or draining after a stop signal",
                obj({"status": typed("string", enum=["starting", "draining"])}, ["status"]),
            )
        },
    ),
    Route(
        "get",
        "/metrics",
        "metrics",
        "operations",
        "Prometheus metrics",
        Answer("Prometheus' text format 0.0.4", {"text/plain": STRING}),
    ),
    Route(
        "get",
        OPENAPI_PATH,
        "openapi",
        "operations",
        "this document",
        json_answer("OpenAPI 3.1", typed("object")),
    ),
)

COMPONENT_SCHEMAS: Final = {
    "Error": obj({"error": STRING}, ["error"], description="Ollama's error body"),
    "OpenAIError": obj(
        {
            "error": obj(
                {
                    "message": STRING,
                    "type": typed("string", enum=["invalid_request_error", "not_found_error", "api_error"]),
                    "param": typed("null"),
                    "code": typed(["string", "null"]),
                },
                ["message", "type", "param", "code"],
            )
        },
        ["error"],
        description="OpenAI's error body, on the /v1/ routes",
    ),
    "Options": _options(),
    "Usage": USAGE,
    "ModelDetails": DETAILS,
    "ModelList": obj({"models": array(TAG)}, ["models"]),
    "LoadedList": obj({"models": array(LOADED)}, ["models"]),
    "OpenAIModel": MODEL_OBJECT,
    "Version": obj({"version": STRING}, ["version"]),
    "StatusLine": STATUS_LINE,
    "StreamLine": STREAM_LINE,
    "Success": SUCCESS,
}

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
    """Ollama's {"error": "..."}, or OpenAI's body where common.error_body gives it."""
    return ref("OpenAIError") if isinstance(error_body(path, 400, "")["error"], dict) else ref("Error")


def _answer(answer: Answer, with_body: bool) -> Schema:
    response: Schema = {"description": answer.description}
    if answer.content and with_body:
        response["content"] = {media: {"schema": schema} for media, schema in answer.content.items()}
    if answer.headers:
        response["headers"] = {
            name: {"description": HEADER_DESCRIPTIONS[name], "schema": STRING} for name in answer.headers
        }
    return response


def operation(route: Route, error_status: ErrorTable, head: bool = False) -> Schema:
    """One OpenAPI operation; `head` is the HEAD aiohttp answers for a GET route (no bodies)."""
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
                "schema": model_field("a model name; slashes stay as they are"),
            }
        ]
    if route.request is not None:
        document["requestBody"] = {"required": True, "content": {"application/json": {"schema": route.request}}}
    return document


def build_document(error_status: ErrorTable) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route in ROUTES (a GET route also answers HEAD)."""
    paths: dict[str, Schema] = {}
    for route in ROUTES:
        item = paths.setdefault(route.path, {})
        item[route.method] = operation(route, error_status)
        if route.method == "get":
            item["head"] = operation(route, error_status, head=True)
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
            "schemas": COMPONENT_SCHEMAS,
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "only with api_keys_file set"}
            },
        },
        "security": [{}, {"apiKey": []}],
    }
    return copy.deepcopy(document)  # the schemas above are shared by routes: the caller gets its own


def add_routes(app: web.Application, error_status: ErrorTable) -> None:
    """GET (and HEAD) /openapi.json: the document, serialized once."""
    document = orjson.dumps(build_document(error_status))

    async def serve(_request: web.Request) -> web.Response:
        return web.Response(body=document, headers={"Content-Type": JSON_CONTENT_TYPE})

    app.router.add_get(OPENAPI_PATH, serve)
