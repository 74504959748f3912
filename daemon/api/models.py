"""Every route's request body and answer, declared once as msgspec Structs.

The request models decode and type-check a body in one pass (msgspec; see
benchmarks/bench_decode.py for the choice against pydantic), with the error messages the
dialects have always given: a wrong type is an InvalidInput whose message comes from the model's
`problems` table. What a type cannot say (a model name's rules, a Go duration, a prompt's name)
is checked where it always was, after decoding, and only described here, in `extra_json_schema`,
so that /openapi.json (daemon.api.openapi, generated from these models) still says it.

The answer models describe what the handlers send (they build plain dicts, which orjson writes
with the vectors straight from numpy); tests/test_openapi.py checks real answers against them.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, ClassVar, Final, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from daemon.adapters import INPUT_TYPE_TASKS, MAX_TASK_NAME_CHARS
from daemon.errors import InvalidInput, MissingBody
from daemon.names import MAX_NAME_LENGTH
from daemon.prompts import MAX_PROMPT_CHARS
from daemon.typed_vectors import EMBEDDING_TYPES

# What /v1/embeddings may send vectors as (encoding_format): OpenAI's two, and emberd's typed vectors.
ENCODING_FORMATS: Final = EMBEDDING_TYPES
# Cohere's truncate values (START: keep the end of the text).
COHERE_TRUNCATE: Final = ("NONE", "START", "END")
# The converter's output types (daemon.convert.OUTPUT_TYPES, which the daemon imports only to convert).
QUANTIZE_TYPES: Final = ("f32", "f16", "bf16", "q8_0")
# Ids a detokenize request may carry (a context's worth of any model served here, and then some).
MAX_DETOKENIZE_TOKENS: Final = 1 << 20
GO_DURATION_PATTERN: Final = r"^\s*[+-]?(0|((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+)\s*$"

# -- field types ------------------------------------------------------------------------------------

# A model's name: its rules (daemon.names) are checked when it is looked up, with their own messages;
# an empty one has each dialect's own status. The bounds here describe them.
ModelName = Annotated[
    str,
    Meta(
        description="a model name: an alias, name:tag or hf.co/{owner}/{repo}[:{quant}]",
        extra_json_schema={
            "minLength": 1,
            "maxLength": MAX_NAME_LENGTH,
            "examples": ["all-minilm", "hf.co/owner/repo:Q8_0"],
        },
    ),
]
LegacyName = Annotated[
    str,
    Meta(
        description="older clients' spelling of `model`",
        extra_json_schema={"minLength": 1, "maxLength": MAX_NAME_LENGTH, "deprecated": True},
    ),
]
# Seconds, or a Go duration parsed by config.parse_go_duration_s (its messages are Go's).
KeepAlive = Annotated[
    Annotated[
        str, Meta(extra_json_schema={"pattern": GO_DURATION_PATTERN, "examples": ["5m", "1h30m", "-1m", "300ms", "0"]})
    ]
    | float,
    Meta(
        description="how long the model stays loaded after this request: seconds, or a Go duration; "
        "negative = forever, 0 = unload when idle; absent leaves it as it is"
    ),
]
PromptName = Annotated[
    str,
    Meta(
        description="one of the model's prompts, put before every input, or one of its tasks (then as `task`); "
        "see /api/show"
    ),
]
Task = Annotated[
    str,
    Meta(
        description="one of the model's task adapters (jina-embeddings-v3: retrieval.query, retrieval.passage, "
        "separation, classification, text-matching): its LoRA adapter is applied and its prompt_prefix put before "
        "every input; absent: the model's default task, else the base model (see /api/show's adapters)",
        extra_json_schema={"maxLength": MAX_TASK_NAME_CHARS, "examples": ["retrieval.query"]},
    ),
]
SplitLongInputs = Annotated[
    bool,
    Meta(description="inputs over the context are embedded in overlapping windows and pooled, not cut (default false)"),
]
# Runner options: daemon.options.parse_options checks them (it takes 2048.0 for an integer, as
# Ollama does, and ignores generation options); the Options model below describes them.
RunnerOptions = Annotated[
    dict[str, Any],
    Meta(
        description="runner options; unknown keys (generation options clients send along) are ignored",
        extra_json_schema={"$ref": "#/components/schemas/Options"},
    ),
]
Stream = Annotated[bool, Meta(description="false: one JSON object at the end instead of NDJSON progress")]
Quantize = Annotated[
    str,
    Meta(
        description="output type when converting a directory (case-insensitive; default f16)",
        extra_json_schema={"enum": list(QUANTIZE_TYPES)},
    ),
]
Count = Annotated[int, Meta(ge=0)]
# An ISO 8601 time, as the handlers write it (datetime.isoformat).
Timestamp = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]
Nanoseconds = Annotated[int, Meta(ge=0, description="nanoseconds")]
Vector = Annotated[list[float], Meta(description="float32 values")]
IntVector = Annotated[list[int], Meta(description="int8 or uint8 values, or bytes of packed signs")]
Base64Vector = Annotated[str, Meta(description="base64 of the vector's little-endian float32 bytes")]
EmbeddingType = Annotated[
    str,
    Meta(
        description="float; int8 or uint8 (the model's calibrated ranges, 255 steps a dimension); binary or "
        "ubinary (signs packed 8 to a byte, binary less 128); base64 (float32 little-endian)",
        extra_json_schema={"enum": list(EMBEDDING_TYPES)},
    ),
]
Windows = Annotated[int, Meta(ge=1, description="windows the input was split into (with split_long_inputs)")]
# Not bounded when decoded: an id outside the vocabulary gets the vocabulary's own message.
TokenId = Annotated[int, Meta(extra_json_schema={"minimum": 0})]
TokenIds = Annotated[
    list[TokenId],
    Meta(
        min_length=1,
        description="token ids: OpenAI's cl100k_base (the default) or the model's own (openai_token_ids = model)",
    ),
]

# -- decoding ---------------------------------------------------------------------------------------


class Body(Struct, kw_only=True):
    """A request body. Unknown fields are ignored, and null is the same as absent."""

    # Field path ("documents[].text", "input[]", "input") -> the message of a wrong type there; the
    # longest matching prefix wins. `bounds` is the same for a value out of its declared bounds.
    problems: ClassVar[dict[str, str]] = {}
    bounds: ClassVar[dict[str, str]] = {}
    # Fields a request must have, checked by the handler: their absence has a dialect's own status.
    required: ClassVar[tuple[str, ...]] = ()


class Named(Body, kw_only=True):
    """A body naming a model; older Ollama clients send `name` where newer ones send `model`."""

    model: ModelName | None = None
    name: LegacyName | None = None
    required: ClassVar[tuple[str, ...]] = ("model",)

    @property
    def model_name(self) -> str:
        """The model as sent (may be empty: the dialect decides what that means)."""
        return self.model if self.model is not None else self.name or ""


NAMED_PROBLEMS: Final = {"model": "model must be a string", "name": "model must be a string"}

BodyType = TypeVar("BodyType", bound=Body)
_PATH = re.compile(r" - at `\$\.?(.*)`$")
_INDEX = re.compile(r"\[[^\]]*\]")


@functools.cache
def _decoder(kind: type[BodyType]) -> msgspec.json.Decoder[BodyType]:
    return msgspec.json.Decoder(kind)


def problem_message(kind: type[Body], error: msgspec.ValidationError) -> str:
    """The message a client gets for a body msgspec refused: the model's own for that field (for a
    wrong type, or a value out of its bounds), else msgspec's, naming the field."""
    text = str(error)
    found = _PATH.search(text)
    if found is None or not found.group(1):
        return "request body must be a JSON object" if text.startswith("Expected `object`") else text
    path = _INDEX.sub("[]", found.group(1))
    wrong_type = ", got `" in text or "missing required field" in text
    table = kind.problems if wrong_type else kind.bounds
    prefixes = [path[:end] for end in range(len(path), 0, -1) if end == len(path) or path[end] in ".["]
    for prefix in prefixes:
        if prefix in table:
            return table[prefix]
    return f"{found.group(1)}: {text[: found.start()]}"


def decode_body(body: bytes | bytearray, kind: type[BodyType]) -> BodyType:
    """A request's body decoded and type-checked into its model (InvalidInput, or MissingBody)."""
    if not body.strip():
        raise MissingBody("missing request body")
    try:
        decoded: BodyType = _decoder(kind).decode(body)
    except msgspec.ValidationError as error:
        raise InvalidInput(problem_message(kind, error)) from None
    except msgspec.DecodeError as error:
        raise InvalidInput(f"invalid JSON in request body: {error}") from None
    except RecursionError:  # arrays nested thousands deep in a field of any JSON (options)
        raise InvalidInput("invalid JSON in request body: nested too deeply") from None
    return decoded


# -- request bodies ---------------------------------------------------------------------------------


class EmbedRequest(Named, kw_only=True):
    """POST /api/embed."""

    input: (
        Annotated[
            str | list[str],
            Meta(
                description='one text or several; absent, "" or [] only loads the model (with keep_alive 0, '
                "unloads it). At most max_inputs (EMBERD_MAX_INPUTS) texts: more get 413"
            ),
        ]
        | None
    ) = None
    truncate: (
        Annotated[
            bool, Meta(description="cut inputs over the context (keeping the beginning); false: a 400 (default true)")
        ]
        | None
    ) = None
    dimensions: (
        Annotated[
            int, Meta(description="keep the first d values, renormalized; 0 = all", extra_json_schema={"minimum": 0})
        ]
        | None
    ) = None
    normalize: (
        Annotated[
            bool,
            Meta(
                description="false: the pooled vectors as the model gives them, cut to dimensions without "
                "renormalizing (TEI's field; default true: unit length)"
            ),
        ]
        | None
    ) = None
    embedding_type: EmbeddingType | None = None
    keep_alive: KeepAlive | None = None
    options: RunnerOptions | None = None
    prompt_name: PromptName | None = None
    task: Task | None = None
    split_long_inputs: SplitLongInputs | None = None
    problems: ClassVar[dict[str, str]] = {
        **NAMED_PROBLEMS,
        "embedding_type": "embedding_type must be a string",
        "normalize": "normalize must be true or false",
        "input": "invalid input type",
        "task": "task must be a string",
        "truncate": "truncate must be true or false",
        "dimensions": "dimensions must be an integer",
        "keep_alive": "keep_alive must be a duration string or a number of seconds",
        "options": "options must be an object",
        "prompt_name": "prompt_name must be a string",
        "split_long_inputs": "split_long_inputs must be true or false",
        "outputs": "outputs must be an array of dense, sparse and colbert",
    }
    outputs: (
        Annotated[
            list[Literal["dense", "sparse", "colbert"]],
            Meta(
                description="which of BGE-M3's outputs to answer (default [dense]): sparse and colbert need a model "
                "with its heads, and come from one decode with dense"
            ),
        ]
        | None
    ) = None

    @property
    def texts(self) -> list[str]:
        if not self.input:
            return []
        return [self.input] if isinstance(self.input, str) else self.input


TruncationDirection = Annotated[
    Literal["right", "left", "Right", "Left"],
    Meta(description="which end a cut input loses (TEI's field): right (default) its end, left its start"),
]
TEIInputs = Annotated[
    str | list[str],
    Meta(description="one text or several; at most max_inputs (EMBERD_MAX_INPUTS) texts: more get 413"),
]


class TEIRequest(Named, kw_only=True):
    """TEI's fields of a request on every token (/embed_all, /embed_sparse), with a `model` field:
    emberd serves several models."""

    inputs: TEIInputs | None = None
    truncate: Annotated[bool, Meta(description="cut inputs over the context; default false: a 400")] | None = None
    truncation_direction: TruncationDirection | None = None
    prompt_name: PromptName | None = None
    problems: ClassVar[dict[str, str]] = {
        **NAMED_PROBLEMS,
        "inputs": "inputs must be a string or an array of strings",
        "truncate": "truncate must be true or false",
        "truncation_direction": "truncation_direction must be right or left",
        "prompt_name": "prompt_name must be a string",
    }
    required: ClassVar[tuple[str, ...]] = ("model", "inputs")

    @property
    def texts(self) -> list[str]:
        if self.inputs is None:
            return []
        return [self.inputs] if isinstance(self.inputs, str) else self.inputs


class TokenVectorsRequest(TEIRequest, kw_only=True):
    """POST /embed_all (TEI's): every token's vector."""

    normalize: (
        Annotated[bool, Meta(description="unit-length token vectors (default false: as the model gives them)")] | None
    ) = None
    problems: ClassVar[dict[str, str]] = {**TEIRequest.problems, "normalize": "normalize must be true or false"}


class SparseRequest(TEIRequest, kw_only=True):
    """POST /embed_sparse (TEI's): a model with BGE-M3's sparse head."""


class LegacyEmbedRequest(Named, kw_only=True):
    """POST /api/embeddings."""

    prompt: Annotated[str, Meta(description="the text; empty only loads the model")] | None = None
    keep_alive: KeepAlive | None = None
    options: RunnerOptions | None = None
    problems: ClassVar[dict[str, str]] = {
        **NAMED_PROBLEMS,
        "prompt": "prompt must be a string",
        "keep_alive": EmbedRequest.problems["keep_alive"],
        "options": EmbedRequest.problems["options"],
    }


class OpenAIEmbedRequest(Named, kw_only=True):
    """POST /v1/embeddings: a text, texts, token ids, or lists of token ids."""

    # One array type only (msgspec decodes unions by JSON kind): the handler sorts an array's items
    # into texts, ids, or lists of ids, and refuses a mix.
    input: (
        Annotated[
            str | list[str | TokenId | TokenIds],
            Meta(
                description="a text, texts (at least one), token ids, or lists of token ids, not mixed; "
                "at most max_inputs inputs (more: 413)",
                extra_json_schema={"minItems": 1},
            ),
        ]
        | None
    ) = None
    encoding_format: (
        Annotated[
            str,
            Meta(
                description="float (default) or base64 (little-endian float32), or emberd's int8, uint8, "
                "binary, ubinary (as /v2/embed's embedding_types); case-insensitive",
                extra_json_schema={"enum": list(ENCODING_FORMATS)},
            ),
        ]
        | None
    ) = None
    dimensions: Annotated[int, Meta(ge=1, description="keep the first d values, renormalized")] | None = None
    user: str | None = None
    prompt_name: PromptName | None = None
    input_type: (
        Annotated[
            str,
            Meta(
                description="picks the model's query or document prompt, or its task adapter: query and "
                "search_query retrieval.query, document and search_document retrieval.passage, classification "
                "classification, clustering separation (a model without it: the text as it is)",
                extra_json_schema={"enum": list(INPUT_TYPE_TASKS)},
            ),
        ]
        | None
    ) = None
    task: Task | None = None
    split_long_inputs: SplitLongInputs | None = None
    problems: ClassVar[dict[str, str]] = {
        **NAMED_PROBLEMS,
        "input": "invalid input",
        "task": "task must be a string",
        "encoding_format": "encoding_format must be float or base64",
        "dimensions": "dimensions must be an integer",
        "user": "user must be a string",
        "prompt_name": "prompt_name must be a string",
        "input_type": "input_type must be a string",
        "split_long_inputs": "split_long_inputs must be true or false",
    }
    bounds: ClassVar[dict[str, str]] = {"input": "invalid input", "dimensions": "dimensions must be a positive integer"}
    required: ClassVar[tuple[str, ...]] = ("model", "input")


class CohereEmbedRequest(Named, kw_only=True):
    """POST /v2/embed: Cohere's embed v2, texts only."""

    texts: (
        Annotated[
            list[str],
            Meta(description="the texts; at most max_inputs (EMBERD_MAX_INPUTS): more get 413"),
        ]
        | None
    ) = None
    input_type: (
        Annotated[
            str,
            Meta(
                description="search_query or search_document picks the model's query or document prompt (or task "
                "adapter), classification and clustering theirs; a model without them embeds the text as it is",
                extra_json_schema={"enum": ["search_query", "search_document", "classification", "clustering"]},
            ),
        ]
        | None
    ) = None
    embedding_types: (
        Annotated[list[EmbeddingType], Meta(description="one list of vectors in the answer per type (default float)")]
        | None
    ) = None
    truncate: (
        Annotated[
            str,
            Meta(
                description="END (default) cuts the end of a text over the context, START its start; NONE: a 400",
                extra_json_schema={"enum": list(COHERE_TRUNCATE)},
            ),
        ]
        | None
    ) = None
    output_dimension: (
        Annotated[int, Meta(ge=1, description="keep the first d values, renormalized (float types only)")] | None
    ) = None
    max_tokens: (
        Annotated[int, Meta(ge=1, description="cut each text to this many tokens (truncate says which end)")] | None
    ) = None
    normalize: (
        Annotated[bool, Meta(description="false: the pooled vectors as the model gives them (TEI's field)")] | None
    ) = None
    images: Annotated[list[str], Meta(description="images (data URIs): not served, a 400")] | None = None
    inputs: Annotated[list[dict[str, Any]], Meta(description="mixed content: not served, a 400")] | None = None
    problems: ClassVar[dict[str, str]] = {
        **NAMED_PROBLEMS,
        "texts": "texts must be an array of strings",
        "input_type": "input_type must be a string",
        "embedding_types": "embedding_types must be an array of strings",
        "truncate": "truncate must be NONE, START or END",
        "output_dimension": "output_dimension must be an integer",
        "max_tokens": "max_tokens must be an integer",
        "normalize": "normalize must be true or false",
    }
    bounds: ClassVar[dict[str, str]] = {
        "output_dimension": "output_dimension must be a positive integer",
        "max_tokens": "max_tokens must be a positive integer",
    }
    required: ClassVar[tuple[str, ...]] = ("model", "texts")


class BatchCreateRequest(Body, kw_only=True):
    """POST /v1/batches (OpenAI's Batch API, for /v1/embeddings)."""

    input_file_id: Annotated[str, Meta(description="a file uploaded with purpose batch")] | None = None
    endpoint: (
        Annotated[str, Meta(description="/v1/embeddings", extra_json_schema={"enum": ["/v1/embeddings"]})] | None
    ) = None
    completion_window: Annotated[str, Meta(description="24h", extra_json_schema={"enum": ["24h"]})] | None = None
    metadata: Annotated[dict[str, str], Meta(description="up to 16 pairs, kept with the batch")] | None = None
    problems: ClassVar[dict[str, str]] = {
        "input_file_id": "input_file_id must be a string",
        "endpoint": "endpoint must be a string",
        "completion_window": "completion_window must be a string",
        "metadata": "metadata must be an object of strings",
    }
    required: ClassVar[tuple[str, ...]] = ("input_file_id", "endpoint", "completion_window")


class RerankDocument(Struct):
    """Cohere's and Jina's document object."""

    text: str


class RerankRequest(Named, kw_only=True):
    """POST /api/rerank, /v1/rerank, /v2/rerank."""

    model: Annotated[str, Meta(description="a reranker: a GGUF with llama.cpp's rank pooling")] | None = None
    query: str | None = None
    documents: (
        Annotated[
            list[str | RerankDocument], Meta(description="texts, or {text} objects; at most max_inputs (more: 413)")
        ]
        | None
    ) = None
    top_n: Annotated[int, Meta(ge=1, description="at most this many results, best first")] | None = None
    return_documents: Annotated[bool, Meta(description="default false")] | None = None
    problems: ClassVar[dict[str, str]] = {
        **NAMED_PROBLEMS,
        "query": "query must be a string",
        "documents": "documents must be an array",
        "documents[]": 'documents must be strings (or {"text": ...} objects)',
        "top_n": "top_n must be an integer",
        "return_documents": "return_documents must be true or false",
    }
    bounds: ClassVar[dict[str, str]] = {"top_n": "top_n must be a positive integer"}
    required: ClassVar[tuple[str, ...]] = ("model", "query", "documents")

    @property
    def texts(self) -> list[str]:
        return [item if isinstance(item, str) else item.text for item in self.documents or []]


class TokenizeRequest(Named, kw_only=True):
    """POST /api/tokenize."""

    content: str | None = None
    add_special: (
        Annotated[bool, Meta(description="the special tokens the model puts around an input (default true)")] | None
    ) = None
    problems: ClassVar[dict[str, str]] = {
        **NAMED_PROBLEMS,
        "content": "content must be a string",
        "add_special": "add_special must be true or false",
    }
    required: ClassVar[tuple[str, ...]] = ("model", "content")


class DetokenizeRequest(Named, kw_only=True):
    """POST /api/detokenize."""

    tokens: Annotated[list[int], Meta(max_length=MAX_DETOKENIZE_TOKENS)] | None = None
    problems: ClassVar[dict[str, str]] = {**NAMED_PROBLEMS, "tokens": "tokens must be an array of integers"}
    bounds: ClassVar[dict[str, str]] = {"tokens": f"tokens: at most {MAX_DETOKENIZE_TOKENS} ids"}
    required: ClassVar[tuple[str, ...]] = ("model", "tokens")


class NamedModel(Named, kw_only=True):
    """POST /api/show, DELETE /api/delete."""

    problems: ClassVar[dict[str, str]] = NAMED_PROBLEMS


class PullRequest(Named, kw_only=True):
    """POST /api/pull."""

    stream: Stream | None = None
    problems: ClassVar[dict[str, str]] = {**NAMED_PROBLEMS, "stream": "stream must be true or false"}


class CreateRequest(Named, kw_only=True):
    """POST /api/create."""

    source: (
        Annotated[
            str,
            Meta(
                description="a GGUF file or a Hugging Face model directory on the daemon's machine",
                extra_json_schema={"minLength": 1},
            ),
        ]
        | None
    ) = msgspec.field(default=None, name="from")
    # UNSET: absent, which a GGUF file needs (quantize applies to directories only).
    quantize: Quantize | UnsetType | None = UNSET
    stream: Stream | None = None
    prompts: (
        Annotated[dict[str, Annotated[str, Meta(max_length=MAX_PROMPT_CHARS)]], Meta(description="prompt name -> text")]
        | None
    ) = None
    default_prompt_name: (
        Annotated[str, Meta(description="one of prompts, applied when a request names none")] | None
    ) = None
    adapters: (
        Annotated[
            dict[str, str] | list[str],
            Meta(
                description="task adapters (LoRA GGUFs on the daemon's machine, such as llama.cpp writes for "
                "jina-embeddings-v3): task name -> path, or paths whose headers name their tasks "
                "(adapter.lora.task_name); each of the model's architecture"
            ),
        ]
        | None
    ) = None
    default_task: (
        Annotated[str, Meta(description="one of the adapters' tasks, applied when a request names none")] | None
    ) = None
    problems: ClassVar[dict[str, str]] = {
        **NAMED_PROBLEMS,
        "adapters": "create: adapters must map task names to paths, or list paths",
        "default_task": "create: default_task must be a string",
        "from": "from must be a path on the daemon's machine",
        "quantize": "quantize must be a string",
        "stream": "stream must be true or false",
        "prompts": f"create: prompts must map names to texts of at most {MAX_PROMPT_CHARS} characters",
        "default_prompt_name": "create: default_prompt_name must be a string",
    }
    bounds: ClassVar[dict[str, str]] = {"prompts": problems["prompts"]}
    required: ClassVar[tuple[str, ...]] = ("model", "from")


class GenerateRequest(Named, kw_only=True):
    """POST /api/generate: only the unload idiom."""

    keep_alive: KeepAlive | None = None
    prompt: Annotated[str, Meta(description="must be absent or empty: emberd only unloads here")] | None = None
    problems: ClassVar[dict[str, str]] = {
        **NAMED_PROBLEMS,
        "keep_alive": EmbedRequest.problems["keep_alive"],
        "prompt": "prompt must be a string",
    }


class Options(Struct, kw_only=True):
    """Runner options; null = unset. Unknown keys (generation options clients send along) are ignored."""

    num_ctx: (
        Annotated[int, Meta(ge=0, description="tokens an input may have (at most the trained context); 0 = all")] | None
    ) = None
    num_batch: Annotated[int, Meta(ge=1, le=16384, description="token budget of one llama.cpp decode")] | None = None
    num_thread: (
        Annotated[int, Meta(ge=0, le=512, description="llama.cpp threads; 0 = shared among busy runners")] | None
    ) = None
    num_gpu: Annotated[int, Meta(description="layers offloaded to a GPU; -1 = all")] | None = None
    main_gpu: Annotated[int, Meta(ge=0, description="as in llama.cpp")] | None = None
    use_mmap: Annotated[bool, Meta(description="as in llama.cpp")] | None = None


# -- answers ----------------------------------------------------------------------------------------


class Answer(Struct, kw_only=True, forbid_unknown_fields=True):
    """An answer: every field it may carry is declared (the document's schemas are closed)."""


class Error(Answer, kw_only=True):
    """Ollama's error body."""

    error: str


class OpenAIErrorDetail(Answer, kw_only=True):
    message: str
    type: Literal["invalid_request_error", "not_found_error", "api_error"]
    param: None
    code: str | None


class OpenAIError(Answer, kw_only=True):
    """OpenAI's error body, on the /v1/ routes."""

    error: OpenAIErrorDetail


class ModelDetails(Answer, kw_only=True):
    parent_model: str | UnsetType = UNSET
    format: Literal["gguf"]
    family: str
    families: list[str]
    parameter_size: Annotated[str, Meta(examples=["22.7M"])]
    quantization_level: Annotated[str, Meta(examples=["F16", "Q8_0"])]


class StoredModelEntry(Answer, kw_only=True):
    name: str
    model: str
    modified_at: Timestamp
    size: Annotated[int, Meta(ge=0, description="bytes")]
    digest: Annotated[str, Meta(description="sha256 of the GGUF file, hex")]
    details: ModelDetails
    capabilities: list[str]


class LoadedModelEntry(Answer, kw_only=True):
    name: str
    model: str
    modified_at: Timestamp
    size: Annotated[int, Meta(ge=0, description="bytes the scheduler counts for it, its GPU part included")]
    digest: Annotated[str, Meta(description="sha256 of the GGUF file, hex")]
    details: ModelDetails
    capabilities: list[str]
    expires_at: Annotated[Timestamp, Meta(description="when it unloads if idle (far in the future: never)")]
    size_vram: Annotated[int, Meta(ge=0, description="bytes it holds on its GPU (0: none)")]
    context_length: Annotated[int, Meta(ge=0, description="tokens an input may have")]
    gpu_layers: Annotated[
        int, Meta(ge=0, description="emberd: layers offloaded to the GPU, the output layer counted (0: none)")
    ] = 0
    gpu_device: Annotated[str, Meta(description='emberd: the GPU that holds them ("Vulkan0", "CUDA0"; "": none)')] = ""


class ModelList(Answer, kw_only=True):
    models: list[StoredModelEntry]


class LoadedList(Answer, kw_only=True):
    models: list[LoadedModelEntry]


class Version(Answer, kw_only=True):
    version: str


class EmbedAnswer(Answer, kw_only=True):
    """With no input, only {"model", "embeddings": []}."""

    model: Annotated[str, Meta(description="the request's model, as sent")]
    embeddings: Annotated[
        list[Vector | Base64Vector],
        Meta(
            description="one vector an input, in input order: L2-normalized unless normalize is false; as "
            "embedding_type says (int8, uint8, binary, ubinary: integers; base64: a string)"
        ),
    ]
    total_duration: Nanoseconds | UnsetType = UNSET
    load_duration: Nanoseconds | UnsetType = UNSET
    prompt_eval_count: (
        Annotated[int, Meta(ge=0, description="tokens embedded, special tokens included")] | UnsetType
    ) = UNSET
    windows: Annotated[list[Windows], Meta(description="with split_long_inputs: windows per input")] | UnsetType = UNSET
    sparse: (
        Annotated[
            list[list[SparseValue]],
            Meta(description="with outputs [sparse]: per input, its tokens' weights by token id (BGE-M3's)"),
        ]
        | UnsetType
    ) = UNSET
    colbert: (
        Annotated[
            list[list[Vector]],
            Meta(description="with outputs [colbert]: per input, a unit vector for each token after the first"),
        ]
        | UnsetType
    ) = UNSET


class SparseValue(Answer, kw_only=True):
    """A token's weight in a sparse (lexical) vector: BGE-M3's, as TEI answers it."""

    index: Annotated[int, Meta(ge=0, description="the token id")]
    value: Annotated[float, Meta(description="its weight: relu(sparse_linear(h)), the largest over its occurrences")]


class TEIError(Answer, kw_only=True):
    """TEI's error body, on TEI's routes (/embed_all, /embed_sparse)."""

    error: str
    error_type: Literal["Validation", "Overloaded", "Backend"]


class LegacyEmbedAnswer(Answer, kw_only=True):
    embedding: Vector


class Usage(Answer, kw_only=True):
    prompt_tokens: Count
    total_tokens: Count


class OpenAIEmbedding(Answer, kw_only=True):
    object: Literal["embedding"]
    embedding: Vector | Annotated[str, Meta(description="base64 of little-endian float32")]
    index: Count
    windows: Windows | UnsetType = UNSET


class OpenAIEmbedAnswer(Answer, kw_only=True):
    object: Literal["list"]
    data: list[OpenAIEmbedding]
    model: str
    usage: Usage


class RerankedDocument(Answer, kw_only=True):
    text: str


class RerankResult(Answer, kw_only=True):
    index: Annotated[int, Meta(ge=0, description="the document's position in the request")]
    relevance_score: float
    document: RerankedDocument | UnsetType = UNSET


class BilledUnits(Answer, kw_only=True):
    search_units: int | UnsetType = UNSET


class RerankMeta(Answer, kw_only=True):
    billed_units: BilledUnits | UnsetType = UNSET


class RerankAnswer(Answer, kw_only=True):
    id: str
    model: str
    results: Annotated[list[RerankResult], Meta(description="best score first")]
    usage: Usage
    meta: RerankMeta | UnsetType = UNSET


class CohereEmbeddingsByType(Answer, kw_only=True):
    """One list per requested type, one vector per text in each."""

    float_: list[Vector] | UnsetType = msgspec.field(default=UNSET, name="float")
    int8: list[IntVector] | UnsetType = UNSET
    uint8: list[IntVector] | UnsetType = UNSET
    binary: list[IntVector] | UnsetType = UNSET
    ubinary: list[IntVector] | UnsetType = UNSET
    base64: list[Base64Vector] | UnsetType = UNSET


class CohereApiVersion(Answer, kw_only=True):
    version: Literal["2"]


class CohereBilledUnits(Answer, kw_only=True):
    input_tokens: Annotated[int, Meta(ge=0, description="tokens embedded, special tokens included")]


class CohereMeta(Answer, kw_only=True):
    api_version: CohereApiVersion
    billed_units: CohereBilledUnits


class CohereEmbedAnswer(Answer, kw_only=True):
    id: str
    response_type: Literal["embeddings_by_type"]
    embeddings: CohereEmbeddingsByType
    texts: list[str]
    meta: CohereMeta


class CohereError(Answer, kw_only=True):
    """Cohere's error body, on the /v2/ routes."""

    message: str


class FileObject(Answer, kw_only=True):
    id: str
    object: Literal["file"]
    bytes: Annotated[int, Meta(ge=0)]
    created_at: Annotated[int, Meta(description="unix seconds")]
    filename: str
    purpose: Annotated[str, Meta(description="batch (uploaded), batch_output (a batch's output or errors)")]
    status: Literal["processed"]
    status_details: None


class FileList(Answer, kw_only=True):
    object: Literal["list"]
    data: list[FileObject]
    has_more: bool


class FileDeleted(Answer, kw_only=True):
    id: str
    object: Literal["file"]
    deleted: bool


class BatchRequestCounts(Answer, kw_only=True):
    total: Count
    completed: Count
    failed: Count


class BatchError(Answer, kw_only=True):
    code: str
    message: str
    param: str | None
    line: int | None


class BatchErrors(Answer, kw_only=True):
    object: Literal["list"]
    data: list[BatchError]


class BatchObject(Answer, kw_only=True):
    id: str
    object: Literal["batch"]
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
    ]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None


class BatchList(Answer, kw_only=True):
    object: Literal["list"]
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class OpenAIModel(Answer, kw_only=True):
    id: str
    object: Literal["model"]
    created: Annotated[int, Meta(description="unix seconds")]
    owned_by: str


class OpenAIModelList(Answer, kw_only=True):
    object: Literal["list"] | UnsetType = UNSET
    data: list[OpenAIModel] | UnsetType = UNSET


class AdapterEntry(Answer, kw_only=True):
    task: str
    prompt_prefix: Annotated[str, Meta(description="put before each input of this task")]
    alpha: Annotated[float, Meta(description="adapter.lora.alpha (0: none)")]
    digest: Annotated[str, Meta(description="sha256 of the adapter's GGUF file, hex")]
    size: Annotated[int, Meta(ge=0, description="bytes")]


class HeadsEntry(Answer, kw_only=True):
    outputs: Annotated[
        list[Literal["sparse", "colbert"]], Meta(description="what /api/embed's outputs may ask of it besides dense")
    ]
    colbert_dimensions: (
        Annotated[int, Meta(ge=1, description="the width of each ColBERT vector (absent: the blob is unreadable)")]
        | UnsetType
    ) = UNSET
    digest: Annotated[str, Meta(description="sha256 of the heads blob, hex")]
    size: Annotated[int, Meta(ge=0, description="bytes")]


class ShowAnswer(Answer, kw_only=True):
    license: str | UnsetType = UNSET
    modelfile: str | UnsetType = UNSET
    parameters: str | UnsetType = UNSET
    template: str | UnsetType = UNSET
    details: ModelDetails
    model_info: Annotated[
        dict[str, Any], Meta(description="the GGUF's metadata (arrays as null) and general.parameter_count")
    ]
    capabilities: list[str]
    modified_at: Timestamp
    prompts: dict[str, str]
    default_prompt_name: str | None
    adapters: Annotated[list[AdapterEntry], Meta(description="its task adapters, if it has any")] | UnsetType = UNSET
    default_task: str | UnsetType | None = UNSET
    heads: Annotated[HeadsEntry, Meta(description="BGE-M3's sparse and ColBERT heads, if it has them")] | UnsetType = (
        UNSET
    )


class StatusLine(Answer, kw_only=True):
    status: Annotated[str, Meta(examples=["pulling manifest", "verifying sha256 digest", "success"])]
    digest: str | UnsetType = UNSET
    total: Count | UnsetType = UNSET
    completed: Count | UnsetType = UNSET


class Success(Answer, kw_only=True):
    status: Literal["success"]


class Unloaded(Answer, kw_only=True):
    model: str
    created_at: Timestamp
    response: Literal[""]
    done: Literal[True]
    done_reason: Literal["unload"]


class Tokens(Answer, kw_only=True):
    model: str
    tokens: list[int]


class Detokenized(Answer, kw_only=True):
    model: str
    content: str


class Alive(Answer, kw_only=True):
    status: Literal["alive"]


class Ready(Answer, kw_only=True):
    status: Literal["ready"]


class NotReady(Answer, kw_only=True):
    status: Literal["starting", "draining"]
